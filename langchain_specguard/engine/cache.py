"""The engine's KV cache: keys and values at absolute positions, written where the engine says.

transformers' caches count their own length, and their sliding-window layers keep only the last
``window`` positions in a ring buffer: neither can be rewound, which is what speculative decoding does
after every rejected token. Here every layer keeps every position (sliding windows are applied by the
mask, see :func:`causal_mask`), the write position of each forward is a device tensor the engine sets
(``write_at``), and what is valid is host bookkeeping (``valid``): cutting back is free and never
touches the tensors.

Two ways to hold the tensors:

- ``fixed`` (static): allocated once at ``capacity``; attention reads all of it (masked), so shapes and
  addresses never change and forward passes can be captured as CUDA graphs;
- ``growable`` (dynamic): reallocated by doubling when a pass needs more room; attention reads only
  the positions written so far. The eager reference path, and the fastest one on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch


class KVCache:
    """Per-layer keys and values ``[B, H_kv, capacity, D]`` with an explicit write position.

    Passed to a model as ``past_key_values``; the attention modules call :meth:`update`.
    """

    def __init__(self, num_layers: int, capacity: int, growable: bool, batch: int = 1) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.capacity = capacity
        self.growable = growable
        self.batch = batch
        # positions [0, valid) hold keys/values of the sequence: each pass of the runner that owns the cache sets it
        # to the end of what it fed, and the decoding loop alone cuts it back to what it keeps (Runtime.rewind)
        self.valid = 0
        self.write_at: torch.Tensor | None = None  # [q] positions of the current pass's tokens
        self.read_len: int | None = None  # keys handed to attention: the first read_len, or all (fixed)
        self.rows: slice | None = None  # batch rows a pass reads and writes (None: all)

    # -- what the model calls ----------------------------------------------------------------------

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if keys is None or values is None:
            _, heads, _, dim = key.shape
            shape = (self.batch, heads, self.capacity)
            keys = key.new_zeros(*shape, dim)
            values = value.new_zeros(*shape, value.shape[-1])
            self.keys[layer_idx], self.values[layer_idx] = keys, values
        assert self.write_at is not None, "KVCache.write_at must be set before a forward pass"
        if self.rows is not None:
            keys, values = keys[self.rows], values[self.rows]
        keys.index_copy_(2, self.write_at, key.to(keys.dtype))
        values.index_copy_(2, self.write_at, value.to(values.dtype))
        if self.read_len is None:
            return keys, values
        return keys[:, :, : self.read_len], values[:, :, : self.read_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.valid

    @property
    def is_compileable(self) -> bool:
        return not self.growable

    # -- what the engine calls ---------------------------------------------------------------------

    def ensure(self, length: int) -> None:
        """Room for positions ``[0, length)``; a growable cache doubles, a fixed one must already have it."""
        if length <= self.capacity:
            return
        if not self.growable:
            raise RuntimeError(f"KV cache holds {self.capacity} positions, {length} needed")
        capacity = max(length, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, tensor in enumerate(store):
                if tensor is not None:
                    grown = tensor.new_zeros(*tensor.shape[:2], capacity, tensor.shape[-1])
                    grown[:, :, : tensor.shape[2]] = tensor
                    store[i] = grown
        self.capacity = capacity

    def copy_row(self, source: int, start: int, stop: int) -> None:
        """Make every batch row equal to row ``source`` on positions ``[start, stop)`` (the kept candidate)."""
        if stop <= start:
            return
        for store in (self.keys, self.values):
            for tensor in store:
                if tensor is not None and tensor.shape[0] > 1:
                    part = tensor[:, :, start:stop]
                    part.copy_(part[source : source + 1].expand_as(part))


def causal_mask(positions: torch.Tensor, length: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[1, 1, q, length]``: query at position p sees keys ``j <= p`` (and ``j > p - window``)."""
    keys = torch.arange(length, device=positions.device)
    allowed = keys[None, :] <= positions[:, None]
    if window is not None:
        allowed = allowed & (keys[None, :] > positions[:, None] - window)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]
