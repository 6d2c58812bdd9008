"""Sampling without host synchronisation: the one processed distribution, and the greedy choice.

:func:`processed_logprobs` is the one place where logits become the distribution a token is drawn
from, for the draft's candidates, the target's own tokens and both sides of speculative rejection
sampling alike: repetition penalty, then each row's temperature, then top-k, top-p and min-p, in the
order transformers' ``generate`` applies them, with transformers' own warpers.

Randomness comes in as uniform draws, one per row, made by the caller from the generation's generator
(outside any CUDA graph); a row's token is the inverse CDF of its processed distribution at that draw
(``searchsorted`` over the cumulative probabilities). No ``multinomial``, no host read, one random number
per row (cheap on a CPU too), and the same draws whether the iteration runs eagerly or as a replayed
graph. A row with temperature 0 takes the argmax of its (penalised) logits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessor, MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

if TYPE_CHECKING:
    from .params import SpecGuardParams


@dataclass(frozen=True)
class Controls:
    """What shapes the distribution besides each row's temperature; hashable, so it can key a CUDA graph."""

    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @staticmethod
    def of(params: SpecGuardParams) -> Controls:
        return Controls(params.top_k or 0, params.top_p, params.min_p or 0.0, params.repetition_penalty)

    @property
    def penalised(self) -> bool:
        """Whether the tokens seen so far matter (the decode loop then keeps a mask of them)."""
        return self.repetition_penalty != 1.0

    @functools.cached_property
    def warpers(self) -> tuple[LogitsProcessor, ...]:
        """transformers' warpers in ``generate``'s order, for the filters that are on.

        They only sort, select and mask at fixed shapes (no host reads), so they run inside a captured
        decode iteration as they are. Temperature is not among them: ``TemperatureLogitsWarper`` takes
        one float, and the rows of a batch sample at different temperatures (divided in
        :func:`processed_logprobs`).
        """
        warpers: list[LogitsProcessor] = []
        if self.top_k > 0:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        if self.min_p > 0.0:
            warpers.append(MinPLogitsWarper(self.min_p))
        return tuple(warpers)


NO_CONTROLS = Controls()


def penalise(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Repetition penalty: the logits of ``seen`` tokens divided by ``penalty`` where positive, multiplied where not.

    transformers' ``RepetitionPenaltyLogitsProcessor`` reads the sequence as ``input_ids [B, L]``, and
    ``L`` grows by one every token, which a captured CUDA graph (fixed shapes and addresses) cannot
    replay; each row of a verification pass also sees a different prefix. So the engine keeps the
    tokens seen so far as a mask ``seen [..., V]`` (updated in place by the decode loop) and applies
    the processor's own formula with it (its packed-batch branch uses the same mask form); tested
    equal to the processor.
    """
    if seen is None or penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def _work(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (bfloat16 rounds probabilities too coarsely; float64 stays float64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """The model's own log-probabilities ``[..., V]``: before any penalty, temperature or filter.

    What the confidence signal scores and what ``logprobs`` reports.
    """
    return torch.log_softmax(_work(logits), dim=-1)


def processed_logprobs(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    controls: Controls = NO_CONTROLS,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probabilities ``[..., V]`` of the distribution sampling draws from.

    ``temperatures`` broadcasts against ``logits[..., 0]``; ``seen [..., V]`` marks the tokens the
    repetition penalty applies to. Rows at temperature 0 get a point mass on the argmax of the
    penalised logits (top-k, top-p and min-p never remove the most probable token, so they are no-ops
    there), which is what greedy ``generate`` picks.
    """
    scores = penalise(_work(logits), seen, controls.repetition_penalty)
    temps = temperatures.to(scores.dtype)
    warped = scores / temps.clamp_min(1e-5)[..., None]
    if controls.warpers:
        flat = warped.reshape(-1, warped.shape[-1])  # the warpers scatter along dim 1 of a 2-D batch
        for warper in controls.warpers:
            flat = warper(None, flat)  # (warpers do not read input_ids)
        warped = flat.reshape(warped.shape)
    logq = torch.log_softmax(warped, dim=-1)
    point = torch.full_like(logq, float("-inf")).scatter(-1, scores.argmax(-1, keepdim=True), 0.0)
    return torch.where((temps == 0)[..., None], point, logq)


def greedy(logits: torch.Tensor, controls: Controls = NO_CONTROLS, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The greedy token of each row: the argmax of the penalised logits."""
    return penalise(logits, seen, controls.repetition_penalty).argmax(dim=-1)


def seen_rows(before: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
    """Seen-token masks ``[..., q, V]`` of a pass that fed ``fed [..., q]`` after sequences whose masks are
    ``before [..., V]``.

    Row ``j`` (the logits after feeding ``fed[..., j]``) has seen ``before`` and ``fed[..., :j + 1]``: what
    transformers' ``input_ids`` would hold there. Built with one scatter and no host read; the pairs outside
    the triangle write ``fed[..., 0]``, which every row has seen, so every write sets True.
    """
    q = fed.shape[-1]
    lower = torch.ones(q, q, dtype=torch.bool, device=fed.device).tril()
    spread = fed[..., None, :].expand(*fed.shape[:-1], q, q)
    columns = torch.where(lower, spread, fed[..., :1, None].expand_as(spread))
    marks = torch.zeros(*fed.shape, before.shape[-1], dtype=torch.bool, device=fed.device)
    return before.to(fed.device)[..., None, :] | marks.scatter_(-1, columns, True)


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
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    controls: Controls,
    uniform: torch.Tensor | None,
    seen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[B]`` and their log-probability under the processed distribution ``[B]``.

    ``uniform`` ``[B]`` holds U(0, 1) draws; ``None`` means every row is greedy.
    """
    if uniform is None:
        return greedy(logits, controls, seen), torch.zeros(logits.shape[0], device=logits.device)
    logq = processed_logprobs(logits, temperatures, controls, seen)
    tokens = draw(logq.exp(), uniform)
    return tokens, logq.gather(-1, tokens[:, None]).squeeze(-1)


def residual_sample(logp: torch.Tensor, logq: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """A token from ``max(0, p - q)`` renormalised, per row (where speculative sampling lands after a rejection).

    ``logp``/``logq`` ``[..., V]`` are processed log-probabilities of the target and the draft; where a row's
    residual is empty (p == q) it falls back to ``p``.
    """
    residual = (logp.exp() - logq.exp()).clamp_min(0.0)
    weights = torch.where(residual.sum(-1, keepdim=True) > 0, residual, logp.exp())
    return draw(weights, uniform)
