"""Attention probabilities for the few layers the grounding score reads.

Asking transformers for ``output_attentions`` forces eager attention on *every* layer and
materialises ``[batch, heads, q, kv]`` for all of them. SpecGuard only needs a handful of layers,
and of those only three numbers per query row: the mass on the attention sink (position 0), the
mass on the context (prompt and verified steps) and the mass on each token of the step being
scored. So the scored layers get a thin attention function that calls the model's usual kernel
(sdpa, eager, flash...) for the output and, only while a :func:`capture` is active, recomputes the
softmax for the new query rows and reduces it on the spot. Every other layer keeps its fast path.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_IMPL_NAME = "specguard_capture"
_BASE_ATTR = "_specguard_base_attn"


@dataclass
class AttentionRecord:
    """Reduced attention of the query rows of one or more forward passes, per scored layer.

    ``context_len`` is the committed length L when the step started: keys ``1..L-1`` are context,
    key 0 is the sink, keys ``>= L`` belong to the step. Step keys are stored in *query space*:
    the key at position ``L - 1 + r`` is the input of query row ``r`` (row 0 is the last committed
    token, so its column is folded into the context).
    """

    layers: tuple[int, ...]
    context_len: int
    sink: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [B, q]
    context: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [B, q]
    step: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [B, q, S]

    def add(self, layer: int, probs: torch.Tensor, first: int) -> None:
        """Reduce head-averaged probabilities ``[B, q, kv]`` whose first query sits at position ``first``.

        Keeps the rows at positions >= L-1 and the keys that exist (a static cache also hands over
        its unwritten, masked tail).
        """
        L = self.context_len
        q = probs.shape[-2]
        probs = probs[:, max(0, (L - 1) - first) :, : first + q]
        self.sink.setdefault(layer, []).append(probs[..., 0])
        self.context.setdefault(layer, []).append(probs[..., 1:L].sum(-1))
        step = probs[..., L - 1 :].clone()
        step[..., 0] = 0.0  # query space: column r is key position L - 1 + r; column 0 is context
        self.step.setdefault(layer, []).append(step)

    def stacked(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every recorded row, in order: ``sink [m, B, Q]``, ``context [m, B, Q]``, ``step [m, B, Q, Q]``.

        Row ``r`` is the query at position ``L - 1 + r``; passes made with batch 1 (the shared prefix
        before candidates fork) are broadcast to ``batch``.
        """
        sinks, contexts, steps = [], [], []
        for layer in self.layers:
            sink = torch.cat([s.expand(batch, -1) for s in self.sink[layer]], dim=1)
            ctx = torch.cat([c.expand(batch, -1) for c in self.context[layer]], dim=1)
            width = sink.shape[1]
            parts = [
                torch.nn.functional.pad(s, (0, max(0, width - s.shape[-1])))[..., :width] for s in self.step[layer]
            ]
            steps.append(torch.cat([p.expand(batch, -1, -1) for p in parts], dim=1))
            sinks.append(sink)
            contexts.append(ctx)
        return torch.stack(sinks), torch.stack(contexts), torch.stack(steps)


_ACTIVE: ContextVar[tuple[int, AttentionRecord] | None] = ContextVar("specguard_capture", default=None)


def _attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """Head-averaged softmax(QK^T) for the query rows: ``[B, q, kv]``, at least in float32."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query.to(dtype)
    k = key.to(dtype)
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_len, kv_len = scores.shape[-2], scores.shape[-1]
    if attention_mask is None:
        offset = kv_len - q_len
        rows = torch.arange(q_len, device=scores.device)[:, None] + offset
        cols = torch.arange(kv_len, device=scores.device)[None, :]
        scores = scores.masked_fill(cols > rows, float("-inf"))
    else:
        mask = attention_mask[..., -q_len:, -kv_len:]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(dtype)
    return torch.softmax(scores, dim=-1).mean(dim=1)


def _first_query_position(attention_mask: torch.Tensor | None, q_len: int, kv_len: int) -> int:
    """Absolute position of the first query row: the last key its mask row allows.

    Without a mask the keys are exactly the positions so far (dynamic cache); a static cache's keys
    run to its capacity, and only the mask says where the queries are.
    """
    if attention_mask is None:
        return kv_len - q_len
    row = attention_mask[0, 0, 0] if attention_mask.dim() == 4 else attention_mask[0, 0]
    allowed = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    return int(allowed.nonzero().max())


def _capturing_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = getattr(module, _BASE_ATTR)(module, query, key, value, attention_mask, **kwargs)
    if torch.compiler.is_compiling():  # compiled decode never captures; keep the graph whole
        return out
    active = _ACTIVE.get()
    if active is not None:
        model_id, record = active
        layer = int(module.layer_idx)  # type: ignore[arg-type]
        if model_id in getattr(module, "_specguard_owners", ()) and layer in record.layers:
            if attention_mask is None and 1 < query.shape[-2] < key.shape[-2]:
                # no mask and several queries means a causal prefill from position 0: the keys past the
                # queries are a static cache's unwritten tail (sdpa slices them off the same way)
                key = key[:, :, : query.shape[-2]]
            probs = _attention_probs(query, key, attention_mask, kwargs.get("scaling"), kwargs.get("softcap"))
            record.add(layer, probs, _first_query_position(attention_mask, query.shape[-2], key.shape[-2]))
    return out


AttentionInterface.register(_IMPL_NAME, _capturing_attention)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer list of a causal LM (``model.model.layers`` for Llama/Qwen/Gemma...)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no `model.layers` decoder list; SpecGuard supports decoder-only "
            "causal LMs laid out like Llama, Qwen, Mistral and Gemma"
        )
    return layers


def instrument(model: torch.nn.Module, layers: tuple[int, ...]) -> None:
    """Route ``layers``' attention through the capturing wrapper (idempotent, output unchanged).

    The attention module reads its implementation from ``self.config``, so each instrumented module
    gets a shallow config copy naming the wrapper; the model-level config, and so the mask building
    and every other layer, keeps the original implementation. Keys arrive at absolute positions
    because the engine's caches keep every position (no sliding-window trimming).
    """
    all_layers = decoder_layers(model)
    owners_key = id(model)
    for index in layers:
        attn = getattr(all_layers[index], "self_attn", None)
        if attn is None or not hasattr(attn, "config"):
            raise TypeError(f"decoder layer {index} of {type(model).__name__} has no `self_attn` to score")
        owners: set[int] = getattr(attn, "_specguard_owners", set())
        owners.add(owners_key)
        attn._specguard_owners = owners
        if getattr(attn, _BASE_ATTR, None) is not None:
            continue
        base_name = attn.config._attn_implementation or "eager"
        if base_name in ALL_ATTENTION_FUNCTIONS:
            base = ALL_ATTENTION_FUNCTIONS[base_name]
        else:  # eager lives in the model's own module, not in the interface
            base = sys.modules[type(attn).__module__].eager_attention_forward
        setattr(attn, _BASE_ATTR, base)
        cfg = copy.copy(attn.config)
        cfg._attn_implementation_internal = _IMPL_NAME
        attn.config = cfg


@contextlib.contextmanager
def capture(model: torch.nn.Module, layers: tuple[int, ...], context_len: int) -> Iterator[AttentionRecord]:
    """Record reduced attention of ``model``'s instrumented ``layers`` for forward passes inside the block."""
    record = AttentionRecord(layers=layers, context_len=context_len)
    token = _ACTIVE.set((id(model), record))
    try:
        yield record
    finally:
        _ACTIVE.reset(token)
