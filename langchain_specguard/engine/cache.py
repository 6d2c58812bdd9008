"""KV-cache handling for the step loop, over transformers' dynamic and static caches.

The loop needs four operations: how many positions a cache holds, cut it back (a rejected step),
fork it for the candidate batch, and keep one candidate's row. A ``DynamicCache`` grows and shrinks
its tensors; a ``StaticCache`` has fixed addresses (what CUDA graphs need), so its batch is allocated
at the candidate count from the start (the shared prefix is simply fed to every row), "cutting back"
rewinds its write position, and keeping a row copies it over the others in place.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache
from transformers.cache_utils import Cache


def new_cache(model: PreTrainedModel, static: bool, max_len: int) -> Cache:
    """A fresh cache; static ones hold ``max_len`` positions."""
    if static:
        return StaticCache(config=model.config, max_cache_len=max_len)
    return DynamicCache()


def is_static(cache: Cache) -> bool:
    return isinstance(cache, StaticCache)


def cache_len(cache: Cache) -> int:
    return int(cache.get_seq_length())


def truncate(cache: Cache, length: int) -> None:
    """Forget every position from ``length`` on."""
    extra = cache_len(cache) - length
    if extra <= 0:
        return
    if not is_static(cache):
        cache.crop(-extra)
        return
    layers: list[Any] = list(cache.layers)
    for layer in layers:
        if not getattr(layer, "is_initialized", False):
            continue
        # zeroed tails keep transformers versions that count filled positions right
        layer.keys[:, :, length:].zero_()
        layer.values[:, :, length:].zero_()
        counter: Any = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.fill_(length)


def fork(cache: Cache, batch: int) -> None:
    """Give every candidate its own copy of the shared prefix (static caches already have ``batch`` rows)."""
    if batch > 1 and not is_static(cache):
        cache.batch_repeat_interleave(batch)


def keep_row(cache: Cache, row: int, batch: int) -> None:
    """Keep candidate ``row``: drop the others (dynamic) or copy it over them (static)."""
    if batch <= 1:
        return
    if not is_static(cache):
        first: Any = cache.layers[0]
        cache.batch_select_indices(torch.tensor([row], device=first.keys.device))
        return
    layers: list[Any] = list(cache.layers)
    for layer in layers:
        if getattr(layer, "is_initialized", False):
            layer.keys.copy_(layer.keys[row : row + 1].expand_as(layer.keys))
            layer.values.copy_(layer.values[row : row + 1].expand_as(layer.values))
