"""Per-token log-probabilities of the output, taken from logits the engine computes anyway.

Which model's: every token a target pass scored gets the target's log-probability (a step the
target verified, accepted or not, and every token it wrote); a step the draft wrote and scored itself
(``signal_source="draft"``, accepted) has only the draft's, from its decode loop. The values are those
of the model's own distribution, the log-softmax of its logits before temperature, top-k/top-p/min-p
and the repetition penalty (what vLLM reports by default), so they mean the same whatever the
sampling settings. Nothing is computed when ``logprobs`` is off; when on, no extra forward pass runs:
each phase hands over the logits (or the decode loop's records) it already has, on the device, and
the step reads them to the host once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .runner import ModelRunner
from .sampling import raw_logprobs


@dataclass
class TokenLogprob:
    """One output token: its id, its log-probability, and the most probable tokens at its position."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, log-probability), most probable first


class StepLogprobs:
    """The log-probabilities of one step's tokens, in order, gathered where each token was decided."""

    def __init__(self, top: int) -> None:
        self.top = top
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add_logits(self, logits: torch.Tensor, tokens: Sequence[int] | torch.Tensor) -> None:
        """Tokens ``[n]`` chosen after logits ``[n, V]`` (row ``i`` is the distribution token ``i`` came from)."""
        self.add_logprobs(raw_logprobs(logits), tokens)

    def add_logprobs(self, raw: torch.Tensor, tokens: Sequence[int] | torch.Tensor) -> None:
        """Like :meth:`add_logits` with the log-softmax ``raw [n, V]`` already computed."""
        ids = torch.as_tensor(tokens, dtype=torch.long).to(raw.device).reshape(-1)
        chosen = raw.gather(-1, ids[:, None]).squeeze(-1)
        values, top_ids = raw.topk(self.top, dim=-1)
        self._parts.append((ids, chosen, values, top_ids))

    def add_decoded(self, runner: ModelRunner, row: int, start: int, stop: int) -> None:
        """Tokens ``start:stop`` of ``row`` of ``runner``'s decode loop (copied: the loop reuses its buffers).

        The loop must have been started with ``top_logprobs`` >= :attr:`top`.
        """
        state = runner.state
        columns = slice(start, stop)
        self._parts.append(
            (
                state.tokens[row, columns].clone(),
                state.logp[row, columns].clone(),
                state.top_logp[row, columns, : self.top].clone(),
                state.top_ids[row, columns, : self.top].clone(),
            )
        )

    def read(self, n: int) -> list[TokenLogprob]:
        """The first ``n`` tokens' entries (a committed step may be shorter than what was decided)."""
        if not self._parts:
            return []
        device = self._parts[0][0].device

        def joined(i: int, dtype: torch.dtype) -> list[Any]:
            return list(torch.cat([part[i].to(device, dtype) for part in self._parts])[:n].tolist())

        tokens, chosen = joined(0, torch.long), joined(1, torch.float64)
        top_values, top_ids = joined(2, torch.float64), joined(3, torch.long)
        return [
            TokenLogprob(token, logprob, list(zip(ids, values, strict=True)))
            for token, logprob, ids, values in zip(tokens, chosen, top_ids, top_values, strict=True)
        ]
