"""Sampling without host synchronisation, and the speculative acceptance rule.

Randomness comes in as a tensor of Exp(1) noise drawn by the caller from the generation's generator
(outside any CUDA graph), so a sampled token is ``argmax(log q - log noise)`` (the exponential race,
equivalent to drawing from ``q``): no ``multinomial``, no host read, and the same stream of draws
whether the iteration runs eagerly or as a replayed graph. A row with temperature 0 takes the argmax.
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


def sample(
    logits: torch.Tensor, temperatures: torch.Tensor, top_p: float, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[B]`` and their log-probability under the processed distribution ``[B]``.

    ``noise`` ``[B, V]`` holds Exp(1) draws; ``None`` means every row is greedy.
    """
    if noise is None:
        return logits.argmax(dim=-1), torch.zeros(logits.shape[0], device=logits.device)
    logq = processed_logprobs(logits, temperatures, top_p)
    tokens = (logq - noise.log()).argmax(dim=-1)
    return tokens, logq.gather(-1, tokens[:, None]).squeeze(-1)


def residual_sample(logp: torch.Tensor, logq: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A token from ``max(0, p - q)`` renormalised (where speculative sampling lands after a rejection).

    ``logp``/``logq`` ``[V]`` are processed log-probabilities of the target and the draft; where the
    residual is empty (p == q) it falls back to ``p``.
    """
    residual = (logp.exp() - logq.exp()).clamp_min(0.0)
    weights = torch.where(residual.sum() > 0, residual, logp.exp())
    return (weights.log() - noise.log()).argmax(dim=-1)
