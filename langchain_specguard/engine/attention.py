"""The attention kernel of the engine's model views, and the attention the grounding score reads.

Every layer of a view (see :mod:`.view`) calls :func:`specguard_attention`: one fused SDPA call with
grouped-query heads packed onto their key/value head (no repeated keys), under a mask the engine built
from explicit positions. It never looks at a host value, so a whole forward pass can be replayed as a
CUDA graph.

The grounding score needs, per scored layer and per query row of a step, three reductions of the
head-averaged attention: the mass on the sink (position 0), on the context (positions ``1..L-1``) and
on each input of the step (positions ``L-1+r``). While a :class:`StepAttention` is active, the scored
layers recompute softmax(QK^T) for the forward's query rows only (never a prompt x prompt matrix) and
write those reductions into the record's preallocated buffers at the rows the engine named, so the
same code runs eagerly or inside a captured graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface

IMPL_NAME = "specguard"


@dataclass
class StepAttention:
    """Reduced attention of a step's query rows, per scored layer and batch row, in buffers of fixed shape.

    Query row ``r`` of batch row ``b`` is the query at position ``L_b - 1 + r`` (``L_b`` = ``context_len[b]``, its
    committed length when the step started; query row 0 is the last committed token). Shapes, for ``m`` scored
    layers, ``B`` batch rows and room for ``T`` query rows:

    - ``sink [m, B, T]``: mass on position 0;
    - ``context [m, B, T]``: mass on positions ``1..L_b-1`` (prompt and verified steps);
    - ``step [m, B, T, T]``: ``step[l, b, q, r]`` is the mass query row ``q`` pays to the input of query row ``r``
      (column 0, the last committed token, counts as context and is folded into ``context``).

    ``rows [q]`` says which query rows the next pass's positions are, and ``batch_rows`` which batch rows it
    runs; the engine sets them (and ``context_len``) before each pass, in place where a captured graph reads them.
    """

    layers: tuple[int, ...]
    sink: torch.Tensor
    context: torch.Tensor
    step: torch.Tensor
    context_len: torch.Tensor  # [B] int64
    rows: torch.Tensor  # [q] int64
    batch_rows: slice = field(default_factory=lambda: slice(None))

    @classmethod
    def allocate(
        cls, layers: tuple[int, ...], batch: int, rows: int, queries: int, device: torch.device, dtype: torch.dtype
    ) -> StepAttention:
        m = len(layers)
        return cls(
            layers=layers,
            sink=torch.zeros(m, batch, rows, device=device, dtype=dtype),
            context=torch.zeros(m, batch, rows, device=device, dtype=dtype),
            step=torch.zeros(m, batch, rows, rows, device=device, dtype=dtype),
            context_len=torch.zeros(batch, dtype=torch.long, device=device),
            rows=torch.arange(queries, dtype=torch.long, device=device),
        )

    def for_row(self, row: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``sink [m, k]``, ``context [m, k]``, ``step [m, k, k]`` of batch row ``row``: the signal inputs."""
        return self.sink[:, row, :k], self.context[:, row, :k], self.step[:, row, :k, :k]

    def add(self, layer: int, probs: torch.Tensor) -> None:
        """Reduce head-averaged probabilities ``[b, q, S]`` of the current query rows into the buffers."""
        index = self.layers.index(layer)
        batch, queries, size = probs.shape
        width = self.step.shape[-1]
        keys = torch.arange(size, device=probs.device)
        last = self.context_len[self.batch_rows][:, None] - 1  # [b, 1]
        context_keys = ((keys[None] >= 1) & (keys[None] <= last)).to(probs.dtype)  # [b, S]
        step_keys = last + torch.arange(width, device=probs.device)[None]  # [b, width]
        picked = step_keys.clamp(max=size - 1)[:, None, :].expand(batch, queries, width)
        own = probs.gather(-1, picked) * ((step_keys <= size - 1) & (step_keys > last)).to(probs.dtype)[:, None]
        rows = self.rows.clamp(max=width - 1)
        self.sink[index][self.batch_rows].index_copy_(1, rows, probs[..., 0].to(self.sink.dtype))
        context = (probs * context_keys[:, None]).sum(-1)
        self.context[index][self.batch_rows].index_copy_(1, rows, context.to(self.context.dtype))
        self.step[index][self.batch_rows].index_copy_(1, rows, own.to(self.step.dtype))


_ACTIVE: ContextVar[StepAttention | None] = ContextVar("specguard_step_attention", default=None)


@contextlib.contextmanager
def recording(record: StepAttention | None) -> Iterator[None]:
    """Scored layers write their step attention into ``record`` during forward passes inside the block."""
    token = _ACTIVE.set(record)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _pack_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, H, q, D]`` -> ``[B, H_kv, (H / H_kv) * q, D]``: each key/value head with the queries that read it."""
    batch, heads, q, dim = query.shape
    return query.reshape(batch, kv_heads, (heads // kv_heads) * q, dim)


def _pack_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """The mask ``[b, 1, q, S]`` repeated for each query head of a group: ``[b, 1, groups * q, S]``."""
    if groups == 1:
        return mask
    b, _, q, size = mask.shape
    return mask[:, :, None].expand(b, 1, groups, q, size).reshape(b, 1, groups * q, size)


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """Head-averaged softmax(QK^T) of the query rows, ``[B, q, S]``, in float32 or wider."""
    batch, heads, q, dim = query.shape
    kv_heads = key.shape[1]
    dtype = torch.promote_types(query.dtype, torch.float32)
    scale = scaling if scaling is not None else dim**-0.5
    scores = _pack_queries(query.to(dtype), kv_heads) @ key.to(dtype).transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + _pack_mask(mask.to(dtype), heads // kv_heads)
    probs = torch.softmax(scores, dim=-1)  # [B, H_kv, groups * q, S]
    return probs.reshape(batch, heads, q, -1).mean(dim=1)


def specguard_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """``[B, q, H, D]`` attention output for a view's layer; ``attention_mask`` is additive ``[b, 1, q, S]``.

    Queries of a grouped-query head are packed onto their key/value head, so keys are read once per
    group instead of being repeated per query head (transformers' sdpa path repeats them whenever a
    mask is given). Softcapped attention (Gemma 2) runs the same math unfused.
    """
    del dropout, kwargs  # inference only; the window is already in the mask
    if attention_mask is None:
        raise ValueError("specguard attention needs the engine's explicit mask")
    batch, heads, q, dim = query.shape
    kv_heads = key.shape[1]
    mask = attention_mask[..., : key.shape[-2]]
    if softcap is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            _pack_queries(query, kv_heads),
            key,
            value,
            attn_mask=_pack_mask(mask.to(query.dtype), heads // kv_heads),
            scale=scaling,
        )
    else:
        scale = scaling if scaling is not None else dim**-0.5
        scores = _pack_queries(query, kv_heads) @ key.transpose(-1, -2) * scale
        scores = torch.tanh(scores / softcap) * softcap + _pack_mask(mask.to(scores.dtype), heads // kv_heads)
        out = torch.softmax(scores.float(), dim=-1).to(value.dtype) @ value
    if not torch.compiler.is_compiling():  # compiled passes never record: keep their graphs whole
        record = _ACTIVE.get()
        layer = getattr(module, "layer_idx", None)
        if record is not None and layer in record.layers:
            record.add(int(layer), attention_probs(query, key, mask, scaling, softcap))
    out = out.reshape(batch, heads, q, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPL_NAME, specguard_attention)


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
