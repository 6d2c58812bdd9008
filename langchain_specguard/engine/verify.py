"""Verifying the batch's steps: score each kept candidate, decide by the step rule, and say what a rejected step keeps.

1. **Score.** One target pass over every generation's step (:func:`~.judge.judge`: the last committed token and
   the step, ``k`` tokens at positions ``L-1 ... L+k-2``) scores every token of every step; its cache then holds
   the step. It runs as one CUDA graph per bucket, records the scored layers' step attention in place when the
   decision reads grounding, and reaches the host once. A generation whose draft scores its own steps
   (``signal_source="draft"``) reads the draft's log-probabilities instead, and joins the target's pass only when
   its step is rejected.
2. **Decide** (:func:`step_rule`): the step's score against the threshold in force; a broken tool call is
   rejected whatever its score.
3. **Keep.** For a rejected step the same logits say how much of it the target keeps (:func:`~.judge.decide`: its
   own choices, and with a per-token confidence rule the tokens that passed the threshold, up to the first that
   failed) and which token the target writes there; :mod:`.write` continues from there.

What reads the scores (:func:`step_rule`, :func:`judged_verdict`, :func:`passed_by_rule`) takes tensors, so a
served target's answers (:mod:`.served_steps`) are decided by the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from .accept import accept
from .judge import Judgement, Trial, decide, judge
from .propose import Proposal
from .signals import combine_scores, confidence_score, per_token

if TYPE_CHECKING:
    from .generation import Generation
    from .runtimes import Runtime

Reason = Literal["accepted", "score", "schema"]


@dataclass(kw_only=True)
class Verdict:
    grounding: float
    confidence: float
    score: float
    threshold: float  # the acceptance threshold in force
    accepted: bool
    reason: Reason
    detail: str | None = None  # with reason "schema": what was wrong with the draft's tool call
    target_forwards: int = 0
    kept: int = 0  # leading tokens of the step the target keeps (all of them when accepted)
    next_token: int | None = None  # the target's own token after those, when it disagrees within the step
    signals: dict[str, float] = field(default_factory=dict)  # the confidence under each method (StepEvent.signals)
    # what the loop learns from this verification: how many leading tokens the draft had as the target would and
    # whether a disagreement followed (None: nothing to learn), and, for a step made only of the target's own first
    # choices, its score (a sample of how the target's own steps score, for the "auto" threshold)
    agreement_seen: tuple[int, bool] | None = None
    calibration: float | None = None


def verify(runtime: Runtime, gens: list[Generation], proposals: dict[int, Proposal]) -> dict[int, Verdict]:
    """Each generation's verdict on its proposal, by slot."""
    draft = runtime.draft
    verdicts = scored_by_draft(runtime, gens, proposals)
    judged = to_judge(gens, verdicts)
    if not judged:
        return verdicts
    by_target = [g for g in gens if g.params.signal_source == "target"]
    scorer = by_target[0].grounding if by_target else None
    record = scorer.record(runtime.local_target, _context_lens(gens)) if scorer is not None else None
    trials = [
        Trial(gen=g, proposed=proposals[g.slot].tokens, logq=draft.out_logq[proposals[g.slot].row]) for g in judged
    ]
    judgement = judge(runtime, trials, scores=True, record=record)
    assert judgement.logp is not None and judgement.top is not None
    for i, gen in enumerate(judged):
        proposal = proposals[gen.slot]
        k = len(proposal.tokens)
        if gen.params.signal_source == "draft":
            verdicts[gen.slot].target_forwards += 1
            continue
        grounding = scorer.score(record, gen.slot, k) if scorer is not None and record is not None else math.nan
        verdicts[gen.slot] = judged_verdict(
            gen, proposal, judgement.logp[i, :k], judgement.top[i, :k], judgement.choices[i, :k], grounding
        )
    _keep(runtime, judgement, judged, proposals, verdicts)
    return verdicts


def scored_by_draft(runtime: Runtime, gens: list[Generation], proposals: dict[int, Proposal]) -> dict[int, Verdict]:
    """The verdicts of the generations whose draft scores its own steps (``signal_source="draft"``), by slot: its
    decode loop's log-probabilities, one host read, and the target not asked."""
    draft = runtime.draft
    verdicts: dict[int, Verdict] = {}
    by_draft = [g for g in gens if g.params.signal_source == "draft"]
    if not by_draft:
        return verdicts
    rows = torch.tensor([proposals[g.slot].row for g in by_draft], device=draft.device)
    table = draft.out_logp.index_select(0, rows).double().cpu()
    for i, gen in enumerate(by_draft):
        proposal = proposals[gen.slot]
        k = len(proposal.tokens)
        scorer = gen.grounding
        grounding = math.nan
        if scorer is not None and proposal.record is not None:
            grounding = scorer.score(proposal.record, proposal.row, k)
        verdicts[gen.slot] = verdict = step_rule(gen, proposal, table[i, :k], None, grounding)
        if verdict.accepted and gen.logprobs is not None:  # scored by the draft alone: the draft's
            gen.logprobs.add_decoded(draft, proposal.row, 0, k)
    return verdicts


def to_judge(gens: list[Generation], verdicts: dict[int, Verdict]) -> list[Generation]:
    """The generations whose step the target judges: those it scores, then those the draft scored and rejected
    (the target says how much of the step it keeps)."""
    by_target = [g for g in gens if g.params.signal_source == "target"]
    return by_target + [g for g in gens if g.slot in verdicts and not verdicts[g.slot].accepted]


def judged_verdict(
    gen: Generation,
    proposal: Proposal,
    logp: torch.Tensor,
    top: torch.Tensor,
    choices: torch.Tensor,
    grounding: float,
) -> Verdict:
    """The verdict on a step the target scored: ``logp [k]`` each token's log-probability, ``top [k]`` that of the
    target's first choice there, ``choices [k]`` those choices (from the local target's pass or a server's answer).
    """
    k = len(proposal.tokens)
    verdict = step_rule(gen, proposal, logp, top, grounding)
    verdict.target_forwards = 1
    # how many leading tokens are the target's own choices (greedy, whatever the sampling)
    agreed = accept(torch.tensor([proposal.tokens]), [k], [k], choices=choices[None, :k].cpu())[0].kept
    # a step made only of the target's own first choices is one it writes itself: its score is a sample of
    # how the target's steps score, whatever this step's verdict (calibration.py)
    verdict.calibration = verdict.score if agreed == k else None
    if verdict.accepted and not gen.sampling:  # how often the draft agrees informs speculation
        verdict.agreement_seen = (agreed, agreed < k)
    return verdict


def step_rule(
    gen: Generation, proposal: Proposal, logp: torch.Tensor, top: torch.Tensor | None, grounding: float
) -> Verdict:
    """The step rule: the step's score (its confidence, with grounding when the decision reads it) against the
    threshold in force. A draft tool call that is not valid JSON, names an unbound tool or breaks its schema
    (checked in propose, where it also lost the vote to any candidate that fits) is rejected whatever its score."""
    params = gen.params
    scores = logp - top if params.confidence_method == "ratio" and top is not None else logp
    confidence = confidence_score(scores, params.confidence_method)
    score = combine_scores(grounding, confidence, params.decision, params.grounding_weight)
    threshold = gen.threshold()
    accepted = threshold < 0 or score >= threshold
    problem = proposal.problem
    reason: Reason = "schema" if problem else "accepted" if accepted else "score"
    k = len(proposal.tokens)
    return Verdict(
        grounding=grounding,
        confidence=confidence,
        score=score,
        threshold=threshold,
        accepted=accepted and problem is None,
        reason=reason,
        detail=problem,
        kept=k,
        signals=confidences(logp, top),
    )


def _keep(
    runtime: Runtime,
    judgement: Judgement,
    judged: list[Generation],
    proposals: dict[int, Proposal],
    verdicts: dict[int, Verdict],
) -> None:
    """For every step judged and rejected: how much of it the target keeps, and its own next token; and the
    log-probabilities of what the target scored."""
    rejected = [i for i, g in enumerate(judged) if not verdicts[g.slot].accepted]
    for i, gen in enumerate(judged):
        verdict = verdicts[gen.slot]
        if verdict.accepted and gen.logprobs is not None:
            proposal = proposals[gen.slot]
            if gen.params.signal_source == "target":  # the target's, from the verification pass
                gen.logprobs.add_logits(judgement.logits[i][: len(proposal.tokens)], proposal.tokens)
    if not rejected:
        return
    subset = judgement.subset(rejected)
    assert judgement.logp is not None and judgement.top is not None
    passed = [passed_by_rule(judged[i], proposals[judged[i].slot], verdicts[judged[i].slot], judgement.logp[i],
                             judgement.top[i]) for i in rejected]  # fmt: skip
    for j, (i, kept) in enumerate(zip(rejected, decide(runtime, subset, passed), strict=True)):
        gen = judged[i]
        verdict, proposal = verdicts[gen.slot], proposals[gen.slot]
        if passed[j] is None:  # (tokens passed by the threshold say nothing of how often the draft is the target)
            verdict.agreement_seen = (kept.kept, kept.kept < len(proposal.tokens))
        verdict.kept, verdict.next_token = kept.kept, kept.token
        if gen.logprobs is not None:  # the kept tokens and the target's own next one, all scored by this pass
            written = proposal.tokens[: kept.kept] + ([] if kept.token is None else [kept.token])
            gen.logprobs.add_logits(judgement.logits[i][: len(written)], written)


def passed_by_rule(
    gen: Generation, proposal: Proposal, verdict: Verdict, logp: torch.Tensor, top: torch.Tensor
) -> torch.Tensor | None:
    """With a per-token rule, the tokens before the first that failed passed the same test the step did
    (``logp``, ``top``: as :func:`judged_verdict` takes them, at least ``k`` long)."""
    params = gen.params
    if not (per_token(params.confidence_method) and params.decision == "confidence"):
        return None
    if params.signal_source != "target" or proposal.problem is not None:
        return None
    k = len(proposal.tokens)
    logp = logp[:k]
    scores = logp - top[:k] if params.confidence_method == "ratio" else logp
    threshold = verdict.threshold
    return (scores >= math.log(threshold)) if threshold > 0 else torch.ones(k, dtype=torch.bool)


def confidences(logp: torch.Tensor, top: torch.Tensor | None) -> dict[str, float]:
    """The step's confidence under every method the scoring model's pass allows (what research compares)."""
    found = {method: confidence_score(logp, method) for method in ("mean", "min")}
    if top is not None:
        found["ratio"] = confidence_score(logp - top, "ratio")
    return found


def _context_lens(gens: list[Generation]) -> list[int]:
    """Each slot's committed length (the step's context), empty slots standing at 1."""
    lengths = [1] * (max(g.slot for g in gens) + 1)
    for gen in gens:
        lengths[gen.slot] = len(gen.ids)
    return lengths
