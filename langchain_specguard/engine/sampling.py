"""Sampling without host synchronisation, and the speculative acceptance rule.

Randomness comes in as uniform draws, one per row, made by the caller from the generation's generator
(outside any CUDA graph); a row's token is the inverse CDF of its processed distribution at that draw
(``searchsorted`` over the cumulative probabilities). No ``multinomial``, no host read, one random number
per row (cheap on a CPU too), and the same draws whether the iteration runs eagerly or as a replayed
graph. A row with temperature 0 takes the argmax.
"""

from __future__ import annotations

import torch


def processed_logprobs(logits: torch.Tensor, temperatures: torch.Tensor, top_p: float) -> torch.Tensor:
    """Log-probabilities ``[..., V]`` of the distribution sampling draws from: temperature, then top-p.

    ``temperatures`` broadcasts against ``logits[..., 0]``; rows at temperature 0 get a point mass on
    the argmax (log-probability 0 there, -inf elsewhere).
    """
    temps = temperatures.to(torch.float32)
    scaled = logits.float() / temps.clamp_min(1e-5)[..., None]
    logq = torch.log_softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_lq, order = logq.sort(dim=-1, descending=True)
        probs = sorted_lq.exp()
        outside = probs.cumsum(-1) - probs > top_p  # the first token is always kept
        sorted_lq = sorted_lq.masked_fill(outside, float("-inf"))
        logq = torch.full_like(logq, float("-inf")).scatter(-1, order, sorted_lq)
        logq = torch.log_softmax(logq, dim=-1)
    point = torch.full_like(logq, float("-inf")).scatter(-1, logits.argmax(-1, keepdim=True), 0.0)
    return torch.where((temps == 0)[..., None], point, logq)


def draw(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of non-negative ``weights [..., V]`` by inverse CDF at ``uniform [...]``.

    ``right=True`` never lands on a zero-weight token: the first index whose running total exceeds
    the draw is one that added weight.
    """
    totals = weights.cumsum(dim=-1)
    target = (uniform.to(totals.dtype) * totals[..., -1])[..., None]
    index = torch.searchsorted(totals, target, right=True).squeeze(-1)
    return index.clamp(max=weights.shape[-1] - 1)


def sample(
    logits: torch.Tensor, temperatures: torch.Tensor, top_p: float, uniform: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[B]`` and their log-probability under the processed distribution ``[B]``.

    ``uniform`` ``[B]`` holds U(0, 1) draws; ``None`` means every row is greedy.
    """
    if uniform is None:
        return logits.argmax(dim=-1), torch.zeros(logits.shape[0], device=logits.device)
    logq = processed_logprobs(logits, temperatures, top_p)
    tokens = draw(logq.exp(), uniform)
    return tokens, logq.gather(-1, tokens[:, None]).squeeze(-1)


def residual_sample(logp: torch.Tensor, logq: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """A token from ``max(0, p - q)`` renormalised (where speculative sampling lands after a rejection).

    ``logp``/``logq`` ``[V]`` are processed log-probabilities of the target and the draft; where the
    residual is empty (p == q) it falls back to ``p``.
    """
    residual = (logp.exp() - logq.exp()).clamp_min(0.0)
    weights = torch.where(residual.sum() > 0, residual, logp.exp())
    return draw(weights, uniform)
