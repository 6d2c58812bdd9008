"""The engine's KV cache: keys and values at absolute positions, per batch row, written where the engine says.

transformers' caches count their own length, and their sliding-window layers keep only the last
``window`` positions in a ring buffer: neither can be rewound, which is what speculative decoding does
after every rejected token. Here every layer keeps every position of every row (sliding windows are
applied by the mask, see :func:`causal_mask`), the write positions of each pass are a device tensor the
engine sets per row (``write_at``), and what is valid is host bookkeeping per row (``valid``): cutting
back is free and never touches the tensors.

Rows are independent sequences: the generations of a batch, and each generation's draft candidates.
Each has its own positions, so one pass can feed a 7-token step on one row and a 30-token catch-up on
another. A pass reads and writes the rows of ``rows`` (a slice, so the view costs no copy); positions
past a row's ``valid`` hold garbage that no mask lets a later position read before it is written again,
which is also why a pass can be padded to a bucket size, in length and in rows.

Two ways to hold the tensors:

- ``fixed`` (static): allocated once at ``capacity``; attention reads all of it (masked), so shapes and
  addresses never change and passes can be captured as CUDA graphs;
- ``growable`` (dynamic): reallocated by doubling when a pass needs more room; attention reads only
  the positions written so far. The eager reference path, and the fastest one on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class KVCache:
    """Per-layer keys and values ``[B, H_kv, capacity, D]`` with explicit per-row write positions.

    Passed to a model as its cache; the attention modules call :meth:`update`.
    """

    def __init__(self, num_layers: int, capacity: int, growable: bool, batch: int = 1) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.capacity = capacity
        self.growable = growable
        self.batch = batch
        # per row, positions [0, valid) hold keys/values of its sequence: each pass sets it to the end of what the
        # row fed, and the decoding loop alone cuts it back to what it keeps (Runtime.rewind)
        self.valid: list[int] = [0] * batch
        self.rows: slice = slice(0, batch)  # the rows the current pass reads and writes
        self.write_at: torch.Tensor | None = None  # [rows, q] positions of the current pass's tokens
        self.read_len: int | None = None  # keys handed to attention: the first read_len, or all (fixed)

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
        keys, values = keys[self.rows], values[self.rows]
        rows = torch.arange(keys.shape[0], device=keys.device)[:, None]
        # row b's token j goes to position write_at[b, j]: [b, q, H, D] into the (row, position) pairs
        keys[rows, :, self.write_at] = key.transpose(1, 2).to(keys.dtype)
        values[rows, :, self.write_at] = value.transpose(1, 2).to(values.dtype)
        if self.read_len is None:
            return keys, values
        return keys[:, :, : self.read_len], values[:, :, : self.read_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.valid)

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

    def copy_rows(self, sources: Sequence[int], targets: Sequence[int], start: int, stop: int) -> None:
        """Row ``targets[i]`` takes row ``sources[i]``'s keys and values on positions ``[start, stop)``."""
        if stop <= start or not targets:
            return
        for store in (self.keys, self.values):
            for tensor in store:
                if tensor is None:
                    continue
                part = tensor[:, :, start:stop]
                into = torch.as_tensor(list(targets), device=tensor.device)
                part.index_copy_(0, into, part.index_select(0, torch.as_tensor(list(sources), device=tensor.device)))

    def with_batch(self, batch: int) -> KVCache:
        """A cache of ``batch`` rows holding this one's rows first (a runtime that takes more generations)."""
        grown = KVCache(len(self.keys), self.capacity, self.growable, batch)
        keep = min(batch, self.batch)
        for old, new in ((self.keys, grown.keys), (self.values, grown.values)):
            for i, tensor in enumerate(old):
                if tensor is not None:
                    new[i] = tensor.new_zeros(batch, *tensor.shape[1:])
                    new[i][:keep] = tensor[:keep]  # type: ignore[index]
        grown.valid[:keep] = self.valid[:keep]
        return grown


def causal_mask(positions: torch.Tensor, length: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[B, 1, q, length]``: row b's query at position p sees keys ``j <= p`` (and ``> p - window``)."""
    keys = torch.arange(length, device=positions.device)
    allowed = keys[None, None, :] <= positions[:, :, None]
    if window is not None:
        allowed = allowed & (keys[None, None, :] > positions[:, :, None] - window)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
