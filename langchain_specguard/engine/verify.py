"""Verifying a step: one target pass over the kept candidate gives the signals, the verdict, and what to keep.

The pass feeds the last committed token and the step (``k`` tokens at positions ``L-1 ... L+k-2``), so
its logits score every token of the step and its cache ends up holding the step. It runs as one CUDA
graph per length bucket, records the scored layers' step attention in place, and reaches the host once.
When the step is rejected, the same logits say how much of it the target would have written itself
(greedy: the tokens equal to its argmax; sampling: speculative rejection sampling), and which token the
target writes next; :mod:`.write` continues from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from .attention import StepAttention
from .propose import Proposal
from .sampling import greedy, processed_logprobs, raw_logprobs, residual_sample
from .signals import combine_scores, confidence_score, grounding_score

if TYPE_CHECKING:
    from .decoding import Generation


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


def _grounding(record: StepAttention, row: int, k: int, gen: Generation) -> float:
    sink, context, step = (t.double().cpu() for t in record.for_row(row, k))
    return grounding_score(sink, context, step, gen.params.grounding_method)


def target_pass(gen: Generation, proposal: Proposal, record: StepAttention | None) -> torch.Tensor:
    """Target logits ``[k, V]`` over the step (catching the target up first, e.g. after draft-scored steps)."""
    target, draft, ids = gen.runtime.target, gen.runtime.draft, gen.ids
    k, start = len(proposal.tokens), len(ids) - 1
    target.prefill(ids[target.cache.valid : start], target.cache.valid)
    target.tokens_in[:, 0].fill_(ids[-1])
    if k > 1:
        target.tokens_in[:, 1:k].copy_(draft.out_tokens[proposal.row, : k - 1])
    if record is not None:
        record.context_len.fill_(len(ids))
    logits = target.forward(None, start, record, q=k)[0]
    target.cache.valid = start + k
    return logits


def verify(gen: Generation, proposal: Proposal) -> Verdict:
    params, draft = gen.params, gen.runtime.draft
    k, row = len(proposal.tokens), proposal.row
    logits: torch.Tensor | None = None
    raw: torch.Tensor | None = None
    grounding = math.nan  # not measured unless the decision reads it
    if params.signal_source == "target":
        record = gen.runtime.target.record(gen.target_layers) if params.uses_grounding else None
        logits = target_pass(gen, proposal, record)
        step = draft.out_tokens[row, :k].to(logits.device)
        raw = raw_logprobs(logits)
        logp = raw.gather(-1, step[:, None]).squeeze(-1)
        if record is not None:
            grounding = _grounding(record, 0, k, gen)
        forwards = 1
    else:
        logp = draft.out_logp[row, :k]
        if proposal.record is not None:
            grounding = _grounding(proposal.record, row, k, gen)
        forwards = 0
    confidence = confidence_score(logp.double().cpu(), params.confidence_method)
    score = combine_scores(grounding, confidence, params.decision, params.grounding_weight)
    threshold = gen.threshold()
    accepted = threshold < 0 or score >= threshold
    own = target_choices(gen, proposal, logits) if logits is not None and gen.calibrator is not None else None
    # a step made only of the target's own first choices is one it writes itself: its score is a
    # sample of how the target's steps score, whatever this step's verdict (calibration.py)
    if gen.calibrator is not None and own == proposal.tokens:
        gen.calibrator.observe(score)
    # a draft tool call that is not valid JSON, names an unbound tool or breaks its schema (checked in
    # propose, where it also lost the vote to any candidate that fits) is rejected whatever its score
    problem = proposal.problem
    reason: Literal["accepted", "score", "schema"] = "schema" if problem else "accepted" if accepted else "score"
    verdict = Verdict(
        grounding, confidence, score, accepted and problem is None, reason, problem, forwards, k, None, threshold
    )
    if verdict.accepted:
        if logits is not None and params.temperature == 0:  # what the target thinks of it still informs speculation
            keep_prefix(gen, proposal, logits, own)
        if gen.logprobs is not None and raw is not None:
            gen.logprobs.add_logprobs(raw, proposal.tokens)  # the target's, from the verification pass
        elif gen.logprobs is not None:
            gen.logprobs.add_decoded(draft, row, 0, k)  # scored by the draft alone: the draft's
        return verdict
    if logits is None:
        logits = target_pass(gen, proposal, None)
        verdict.target_forwards += 1
    verdict.agree, verdict.next_token = keep_prefix(gen, proposal, logits, own)
    if gen.logprobs is not None:  # the kept tokens and the target's own next one, all scored by this pass
        kept = proposal.tokens[: verdict.agree] + ([] if verdict.next_token is None else [verdict.next_token])
        gen.logprobs.add_logprobs(raw_logprobs(logits[: len(kept)]) if raw is None else raw[: len(kept)], kept)
    for runner in (gen.runtime.target, draft):
        runner.cache.valid = min(runner.cache.valid, len(gen.ids) + verdict.agree)
    return verdict


def _fed(gen: Generation, proposal: Proposal) -> list[int]:
    """What the target's pass over the step fed: row ``i``'s logits follow ``fed[: i + 1]``."""
    return [gen.ids[-1], *proposal.tokens[:-1]]


def target_choices(gen: Generation, proposal: Proposal, logits: torch.Tensor) -> list[int]:
    """The target's own greedy token after each position its pass over the step fed (penalised logits)."""
    seen = gen.seen_rows(gen.runtime.target, (), _fed(gen, proposal), logits.device)
    return greedy(logits, gen.controls, seen).tolist()


def keep_prefix(
    gen: Generation, proposal: Proposal, logits: torch.Tensor, own: list[int] | None = None
) -> tuple[int, int | None]:
    """How many leading step tokens the target keeps, and its own next token (None if it keeps all ``k``).

    Greedy: the tokens equal to the target's argmax (of its penalised logits; ``own`` when already
    computed by :func:`target_choices`), then the argmax.
    Sampling: speculative rejection sampling, accepting token ``i`` with probability
    ``min(1, p(x_i) / q(x_i))`` and, at the first rejection, drawing from ``max(0, p - q)``, where ``p``
    and ``q`` are the target's and the draft's processed distributions (the same penalty and filters).
    The kept candidate was chosen among several, so with ``n_candidates > 1`` the result is close to,
    not exactly, a sample of the target.
    """
    params, draft, controls = gen.params, gen.runtime.draft, gen.controls
    k, tokens = len(proposal.tokens), proposal.tokens
    if params.temperature == 0:
        top = own if own is not None else target_choices(gen, proposal, logits)
        agree = next((i for i in range(k) if top[i] != tokens[i]), k)
        gen.agreement.observe(agree, agree < k)
        return agree, (top[agree] if agree < k else None)
    fed = _fed(gen, proposal)
    seen = gen.seen_rows(gen.runtime.target, (), fed, logits.device)
    temperature = torch.tensor(params.temperature, dtype=torch.float64, device=logits.device)
    logp = processed_logprobs(logits, temperature, controls, seen)  # [k, V]
    step = torch.tensor(tokens, device=logits.device)
    p = logp.gather(-1, step[:, None]).squeeze(-1)
    q = draft.out_logq[proposal.row, :k].to(logits.device)
    keep = (gen.uniform(k).to(logits.device).log() < p - q).tolist()
    agree = next((i for i in range(k) if not keep[i]), k)
    gen.agreement.observe(agree, agree < k)
    if agree == k:
        return k, None
    start = len(gen.ids) - 1 + agree  # recompute the draft's distribution there (rows are identical)
    draft_logits = draft.forward([fed[agree]], start)[proposal.row, -1]
    draft_seen = gen.seen(draft, tokens[:agree])
    logq = processed_logprobs(draft_logits, temperature.to(draft_logits.device), controls, draft_seen)
    return agree, int(residual_sample(logp[agree], logq.to(logits.device), gen.uniform(1)[0].to(logits.device)))
