"""Verification signals and consistency selection: plain functions of tensors.

Shapes, for a step of ``k`` tokens scored on ``m`` layers (ordered bottom to top):

- ``sink [m, k]``: attention mass each generating query pays to position 0 (the attention sink);
- ``context [m, k]``: mass on the prompt and the verified steps;
- ``step [m, k, k]``: ``step[l, q, r]`` is the mass query ``q`` pays to the input of query ``r``
  (so ``r <= q``; column 0 is always 0 because query 0's input is the last verified token).

The generating queries of a step are the positions whose outputs predicted the step's tokens:
the last verified token and the step's own tokens but the last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

_EPS = 1e-9


def grounding_mean(sink: torch.Tensor, context: torch.Tensor, step: torch.Tensor) -> float:
    """Share of the non-sink attention that lands on the context, averaged over layers and measured queries.

    The sink is left out of the denominator: many models park most of their attention on the first
    token as a no-op, and how much they park says nothing about what the step builds on. Query 0 is
    left out too (see :func:`grounding_score`).
    """
    del sink
    own = step[:, 1:].sum(-1)
    share = context[:, 1:] / (context[:, 1:] + own).clamp_min(_EPS)
    return float(share.mean())


def grounding_rollout(sink: torch.Tensor, context: torch.Tensor, step: torch.Tensor) -> float:
    """Grounding by attention rollout through the step (Abnar & Zuidema style, residual = 0.5 I).

    Starting from the top scored layer, attention that lands on the step's own tokens is followed
    down through those tokens' rows of the next lower layer, until it reaches the context, the sink
    or the bottom layer. Context tokens are terminal: once information comes from outside the step it
    counts as grounded, so only the step's own rows are needed and the cost is ``O(m k^2)``.

    Mass that reaches the bottom scored layer by the residual alone (a position carrying itself down,
    never attending anywhere) says nothing about where the step looked: the layers below decide where
    it came from, so it is left out of the share rather than counted as the step's own. Otherwise the
    ``0.5^m`` residual would pull every step towards "ungrounded" and uniform attention would score
    about 0.5 whatever the step did. Returns the context share of the non-sink mass that attention
    moved, over the measured queries.
    """
    m, k = context.shape
    dtype = context.dtype
    eye = torch.eye(k, dtype=dtype, device=context.device)
    ctx = torch.zeros(k, dtype=dtype, device=context.device)
    moved = torch.zeros(k, k, dtype=dtype, device=context.device)  # flow that took >= 1 attention hop
    stayed = 1.0  # flow each query carried down by the residual alone (the same on every query)
    for layer in range(m - 1, -1, -1):
        hop = 0.5 * step[layer]  # [k (from), k (to)]
        ctx = ctx + moved @ (0.5 * context[layer]) + stayed * 0.5 * context[layer]
        moved = moved @ (hop + 0.5 * eye) + stayed * hop
        stayed *= 0.5
    own = moved.sum(-1)
    share = ctx[1:] / (ctx[1:] + own[1:]).clamp_min(_EPS)
    return float(share.mean())


def grounding_score(
    sink: torch.Tensor,
    context: torch.Tensor,
    step: torch.Tensor,
    method: Literal["rollout", "mean"] = "rollout",
) -> float:
    """Grounding in [0, 1] with the chosen method; see :func:`grounding_rollout` and :func:`grounding_mean`.

    Only queries 1..k-1 are measured. Query 0 is the last verified token predicting the step's first
    token: it cannot attend to the step, so counting it would add a floor of ``1/k`` (a one-token step
    would always score 1). A one-token step therefore has no grounding (NaN), and is judged on
    confidence alone (:func:`combine_scores`).
    """
    if context.shape[-1] < 2:
        return float("nan")
    if method == "rollout":
        return grounding_rollout(sink, context, step)
    return grounding_mean(sink, context, step)


ConfidenceMethod = Literal["mean", "min", "ratio"]


def confidence_score(logprobs: torch.Tensor, method: ConfidenceMethod = "mean") -> float:
    """How well the scoring model rates the step, in [0, 1], from each token's log-score ``[k]``.

    The log-scores are ``log p(x_i)`` for "mean" and "min", and for "ratio" ``log p(x_i) - log max p``: how
    far the token falls short of the model's own first choice there (0 when it is that choice). A
    probability means one thing on a model that is rarely more than 60% sure and another on one that
    often is 95% sure; a ratio to the model's own choice means the same on both, so one threshold serves
    every pair. "mean": ``exp(mean)``, the geometric-mean probability; it forgives one unlikely token in a
    long step. "min" and "ratio": the worst token's, which does not, and which matters where a single
    token carries the step's content (a digit of a result).
    """
    if logprobs.numel() == 0:
        return float("nan")
    logprobs = logprobs.double()
    return float(torch.exp(logprobs.mean() if method == "mean" else logprobs.min()))


def per_token(method: ConfidenceMethod) -> bool:
    """Whether a step's score is its worst token's, so each token passes or fails the threshold on its own."""
    return method != "mean"


def combine_scores(
    grounding: float,
    confidence: float,
    decision: Literal["confidence", "both", "weighted"] = "both",
    grounding_weight: float = 0.5,
) -> float:
    """One score in [0, 1]: confidence alone, ``min`` of the two ("both must be strong") or their weighted sum.

    A step too short to measure grounding on (one token) is scored on confidence alone; without a
    confidence (an empty step) the score is NaN, and a NaN score is never accepted.
    """
    if math.isnan(confidence):
        return float("nan")
    if decision == "confidence" or math.isnan(grounding):
        return confidence
    if decision == "both":
        return min(grounding, confidence)
    return grounding_weight * grounding + (1.0 - grounding_weight) * confidence


def _ngrams(tokens: Sequence[int], n: int) -> set[tuple[int, ...]]:
    if len(tokens) < n:
        return {tuple(tokens)}
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def consistency_matrix(candidates: Sequence[Sequence[int]], n: int = 2) -> torch.Tensor:
    """Pairwise Jaccard similarity of the candidates' token n-gram sets, ``[c, c]``."""
    grams = [_ngrams(c, n) for c in candidates]
    size = len(grams)
    sim = torch.ones(size, size)
    for i in range(size):
        for j in range(i + 1, size):
            union = len(grams[i] | grams[j])
            value = len(grams[i] & grams[j]) / union if union else 1.0
            sim[i, j] = sim[j, i] = value
    return sim


def select_consistent(candidates: Sequence[Sequence[int]], n: int = 2) -> int:
    """Index of the medoid candidate: the one most similar, in total, to all the others.

    Ties go to the lowest index, so with a greedy candidate first, the greedy one wins ties.
    """
    if not candidates:
        raise ValueError("select_consistent needs at least one candidate")
    if len(candidates) == 1:
        return 0
    totals = consistency_matrix(candidates, n).sum(dim=1)
    best = float(totals.max())
    return int(torch.nonzero(totals >= best - 1e-9)[0])
