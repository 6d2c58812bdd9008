"""The grounding scorer: which model's step attention is recorded, on which layers, and how it is scored.

Verification reads it through one object, so a study of other attention signals subclasses
:class:`GroundingScorer` (its :meth:`~GroundingScorer.score` sees the same recorded attention) and passes the
instance to :func:`~.decoding.generate_steps`, instead of patching the engine. The confidence signals need no
seam of their own: every step reports its confidence under every method its scoring pass allows
(``StepEvent.signals``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from .attention import StepAttention, decoder_layers
from .loading import ModelPair
from .params import SpecGuardParams
from .runner import ModelRunner
from .served_steps import check_served_params
from .signals import grounding_score
from .view import layer_windows


def score_layers(model: PreTrainedModel, requested: Sequence[int] | None) -> tuple[int, ...]:
    """The layers whose attention is scored: the requested ones, or by default the last third.

    On models that mix sliding-window and full-attention layers (Gemma 2/3, ...), the default is the
    full-attention layers of the upper half instead: a sliding layer cannot see a prompt longer than
    its window, so its attention cannot say whether the step builds on that prompt.
    """
    n = len(decoder_layers(model))
    if requested is None:
        windows = layer_windows(model.config.get_text_config())[:n]
        full = [i for i, w in enumerate(windows) if w is None]
        if full and len(full) < n:
            upper = [i for i in full if i >= n // 2]
            return tuple(upper or full[-1:])
        return tuple(range(n - max(1, n // 3), n))
    bad = [i for i in requested if not -n <= i < n]
    if bad or not requested:
        raise ValueError(
            f"score_layers must be non-empty indices in [-{n}, {n - 1}] for this model, got {list(requested)}"
        )
    return tuple(sorted({i % n for i in requested}))


@dataclass(frozen=True)
class GroundingScorer:
    """Attention grounding as a decision reads it: ``source``'s attention on ``layers``, scored by ``method``."""

    source: Literal["draft", "target"]
    layers: tuple[int, ...]
    method: Literal["rollout", "mean"] = "rollout"

    @classmethod
    def of(cls, pair: ModelPair, params: SpecGuardParams) -> GroundingScorer | None:
        """The scorer ``params`` describe, or None when the decision does not read grounding (nothing recorded).

        The requested layers are checked against the scoring model either way: a configuration that names a
        layer the model lacks is an error whether or not this decision reads it. A served target's attention is
        not available (its server returns none): a decision that reads it is an error, and there is nothing to
        check the layers against.
        """
        model = pair.target if params.signal_source == "target" else pair.draft
        if model is None:  # the target is served
            assert pair.served is not None
            check_served_params(params, pair.served.url)
            return None
        layers = score_layers(model, params.score_layers)
        return cls(params.signal_source, layers, params.grounding_method) if params.uses_grounding else None

    def record(self, runner: ModelRunner, context_lens: Sequence[int]) -> StepAttention:
        """``runner``'s buffers for the coming pass's step attention; ``context_lens[s]`` tokens precede slot ``s``'s
        step."""
        record = runner.record(self.layers)
        per_row = [length for length in context_lens for _ in range(runner.width)]
        record.context_len[: len(per_row)].copy_(torch.as_tensor(per_row, dtype=torch.long))
        return record

    def score(self, record: StepAttention, row: int, k: int) -> float:
        """The grounding of the ``k``-token step of batch row ``row`` (NaN: not measurable, e.g. ``k`` = 1)."""
        sink, context, step = (t.double().cpu() for t in record.for_row(row, k))
        return grounding_score(sink, context, step, self.method)
