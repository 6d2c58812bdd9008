"""Verifying a step: one target pass over the kept candidate gives the signals, the verdict, and what to keep.

The pass feeds the last committed token and the step (``k`` tokens at positions ``L-1 ... L+k-2``), so
its logits score every token of the step and its cache ends up holding the step. It runs as one CUDA
graph per length bucket, records the scored layers' step attention in place when the decision reads
grounding, and reaches the host once for the scores. When the step is rejected, the same logits say
how much of it the target keeps (:mod:`.accept`: its own choices, and with a per-token confidence rule
the tokens that passed the threshold, up to the first that failed) and which token the target writes
there; :mod:`.write` continues from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from .accept import Accepted, accept
from .attention import StepAttention
from .propose import Proposal
from .sampling import penalise, processed_logprobs, raw_logprobs
from .signals import combine_scores, confidence_score, per_token

if TYPE_CHECKING:
    from .generation import Generation


@dataclass
class Verdict:
    grounding: float
    confidence: float
    score: float
    accepted: bool
    reason: Literal["accepted", "score", "schema"]
    detail: str | None
    target_forwards: int
    agree: int  # leading tokens of the step the target keeps (all of them when accepted)
    next_token: int | None  # the target's own token after those, when it disagrees within the step
    threshold: float  # the acceptance threshold in force
    signals: dict[str, float] = field(default_factory=dict)  # the confidence under each method (StepEvent.signals)
    # what the loop learns from this verification: how many leading tokens the draft had as the target would and
    # whether a disagreement followed (None: nothing to learn), and, for a step made only of the target's own first
    # choices, its score (a sample of how the target's own steps score, for the "auto" threshold)
    agreement: tuple[int, bool] | None = None
    calibration: float | None = None


def target_pass(gen: Generation, proposal: Proposal, record: StepAttention | None) -> torch.Tensor:
    """Target logits ``[k, V]`` over the step (catching the target up first, e.g. after draft-scored steps)."""
    target, draft, ids = gen.runtime.target, gen.runtime.draft, gen.ids
    k, start = len(proposal.tokens), len(ids) - 1
    target.prefill(ids[target.cache.valid : start], target.cache.valid)
    target.tokens_in[:, 0].fill_(ids[-1])
    if k > 1:
        target.tokens_in[:, 1:k].copy_(draft.out_tokens[proposal.row, : k - 1])
    return target.forward(None, start, record, q=k)[0]


def verify(gen: Generation, proposal: Proposal) -> Verdict:
    params, draft = gen.params, gen.runtime.draft
    k, row = len(proposal.tokens), proposal.row
    logits: torch.Tensor | None = None
    raw: torch.Tensor | None = None
    choices: torch.Tensor | None = None  # the target's own greedy token after each fed position, on the host
    grounding = math.nan  # not measured unless the decision reads it
    scorer = gen.grounding
    if params.signal_source == "target":
        record = scorer.record(gen.runtime.target, len(gen.ids)) if scorer is not None else None
        logits = target_pass(gen, proposal, record)
        raw = raw_logprobs(logits)
        step = draft.out_tokens[row, :k].to(raw.device)
        # each token's log-probability, the best one there and the target's own choice: one host read gives
        # every confidence method and, greedy, the whole accept rule (token ids are exact in float32)
        rows = [
            raw.gather(-1, step[:, None]).squeeze(-1),
            raw.max(dim=-1).values,
            target_choices(gen, proposal, logits),
        ]
        logp, top, chosen = torch.stack([r.to(raw.dtype) for r in rows]).double().cpu()
        choices = chosen.long()
        if scorer is not None and record is not None:
            grounding = scorer.score(record, 0, k)
        forwards = 1
    else:
        logp, top = draft.out_logp[row, :k].double().cpu(), None
        if scorer is not None and proposal.record is not None:
            grounding = scorer.score(proposal.record, row, k)
        forwards = 0
    scores = logp - top if params.confidence_method == "ratio" and top is not None else logp
    confidence = confidence_score(scores, params.confidence_method)
    score = combine_scores(grounding, confidence, params.decision, params.grounding_weight)
    threshold = gen.threshold()
    accepted = threshold < 0 or score >= threshold
    tokens = torch.tensor(proposal.tokens)
    agreed = accept(None, tokens, greedy=True, choices=choices).kept if choices is not None else None
    # a draft tool call that is not valid JSON, names an unbound tool or breaks its schema (checked in
    # propose, where it also lost the vote to any candidate that fits) is rejected whatever its score
    problem = proposal.problem
    reason: Literal["accepted", "score", "schema"] = "schema" if problem else "accepted" if accepted else "score"
    verdict = Verdict(
        grounding, confidence, score, accepted and problem is None, reason, problem, forwards, k, None, threshold
    )
    verdict.signals = confidences(logp, top)
    # a step made only of the target's own first choices is one it writes itself: its score is a
    # sample of how the target's steps score, whatever this step's verdict (calibration.py)
    verdict.calibration = score if agreed == k else None
    if verdict.accepted:
        if agreed is not None and params.temperature == 0:  # how often the draft agrees informs speculation
            verdict.agreement = (agreed, agreed < k)
        if gen.logprobs is not None and raw is not None:
            gen.logprobs.add_logprobs(raw, proposal.tokens)  # the target's, from the verification pass
        elif gen.logprobs is not None:
            gen.logprobs.add_decoded(draft, row, 0, k)  # scored by the draft alone: the draft's
        return verdict
    if logits is None:
        logits = target_pass(gen, proposal, None)
        verdict.target_forwards += 1
    # with a per-token rule, the tokens before the first that failed passed the same test the step did
    passed = None
    if per_token(params.confidence_method) and params.decision == "confidence" and raw is not None and problem is None:
        passed = (scores >= math.log(threshold)) if threshold > 0 else torch.ones(k, dtype=torch.bool)
    if params.temperature == 0:
        if choices is None:  # scored by the draft: the target's choices come from the pass just run
            choices = target_choices(gen, proposal, logits).cpu()
        kept = accept(None, tokens, greedy=True, choices=choices, passed=passed)
    else:
        kept = rejection_sample(gen, proposal, logits, passed)
    if passed is None:  # (tokens passed by the threshold say nothing of how often the draft is the target)
        verdict.agreement = (kept.kept, kept.kept < k)
    verdict.agree, verdict.next_token = kept.kept, kept.token
    if gen.logprobs is not None:  # the kept tokens and the target's own next one, all scored by this pass
        written = proposal.tokens[: kept.kept] + ([] if kept.token is None else [kept.token])
        gen.logprobs.add_logprobs(raw_logprobs(logits[: len(written)]) if raw is None else raw[: len(written)], written)
    return verdict


def confidences(logp: torch.Tensor, top: torch.Tensor | None) -> dict[str, float]:
    """The step's confidence under every method the scoring model's pass allows (what research compares)."""
    found = {method: confidence_score(logp, method) for method in ("mean", "min")}
    if top is not None:
        found["ratio"] = confidence_score(logp - top, "ratio")
    return found


def _fed(gen: Generation, proposal: Proposal) -> list[int]:
    """What the target's pass over the step fed: row ``i``'s logits follow ``fed[: i + 1]``."""
    return [gen.ids[-1], *proposal.tokens[:-1]]


def target_choices(gen: Generation, proposal: Proposal, logits: torch.Tensor) -> torch.Tensor:
    """The target's own greedy token after each position its pass over the step fed (penalised logits)."""
    seen = gen.seen_rows(gen.runtime.target, (), _fed(gen, proposal), logits.device)
    return penalise(logits, seen, gen.controls.repetition_penalty).argmax(dim=-1)


def rejection_sample(
    gen: Generation, proposal: Proposal, logits: torch.Tensor, passed: torch.Tensor | None = None
) -> Accepted:
    """Sampling: how many leading step tokens the target keeps by speculative rejection sampling against the
    draft's distribution (both processed with the same penalty and filters), and the token it draws next.

    ``passed`` marks tokens the verification rule passed. The kept candidate was chosen among several, so with
    ``n_candidates > 1`` the result is close to, not exactly, a sample of the target.
    """
    params, draft, controls = gen.params, gen.runtime.draft, gen.controls
    k, tokens = len(proposal.tokens), proposal.tokens
    fed = _fed(gen, proposal)
    seen = gen.seen_rows(gen.runtime.target, (), fed, logits.device)
    temperature = torch.tensor(params.temperature, dtype=torch.float64, device=logits.device)
    logp = processed_logprobs(logits, temperature, controls, seen)  # [k, V]

    def draft_logq_at(i: int) -> torch.Tensor:  # the draft's distribution there, computed again
        draft_logits = draft.forward([fed[i]], len(gen.ids) - 1 + i)[proposal.row, -1]
        draft_seen = gen.seen(draft, tokens[:i])
        return processed_logprobs(draft_logits, temperature.to(draft_logits.device), controls, draft_seen)

    return accept(
        logp,
        torch.tensor(tokens, device=logits.device),
        greedy=False,
        logq=draft.out_logq[proposal.row, :k],
        uniforms=gen.uniform(k + 1),
        passed=passed,
        draft_logq_at=draft_logq_at,
    )
