"""Runtimes: the draft's and the target's runners (KV caches, buffers, CUDA graphs) lent to one generation at a time.

A :class:`RuntimePool` per loaded pair keeps a few for reuse; fixed caches come in power-of-two capacities so
that few shapes (graphs, compiled kernels) ever exist.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from .loading import ModelPair, embedding_rows, weight_bytes
from .params import SpecGuardParams
from .runner import MAX_BUCKET, ModelRunner, Rows, output_vocab
from .view import engine_view

MAX_IDLE_RUNTIMES = 2
"""Runtimes (caches + graphs) a pair keeps for reuse once their generations end; more are freed."""


@dataclass
class Runtime:
    """The draft's and the target's runners for one generation at a time."""

    draft: ModelRunner
    target: ModelRunner
    key: tuple[Any, ...]
    chunk: int  # draft decode iterations per host read
    cost: float  # one draft iteration over one target pass (weights read per token)

    def rewind(self, keep: int) -> None:
        """Both caches hold at most the first ``keep`` positions of what the loop now takes as the sequence: the
        rest, written for tokens that were not kept, is overwritten by the next pass (never read past this)."""
        for runner in (self.draft, self.target):
            runner.cache.valid = min(runner.cache.valid, keep)


def _single_device(model: torch.nn.Module) -> bool:
    devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    return len(devices) <= 1


class RuntimePool:
    """Runtimes of one pair: lent to one generation at a time, a few kept for reuse (their graphs too)."""

    def __init__(self, pair: ModelPair) -> None:
        self.draft_view = engine_view(pair.draft)
        self.target_view = engine_view(pair.target)
        self.cost = max(0.02, weight_bytes(self.draft_view) / max(1, weight_bytes(self.target_view)))
        self.vocab = vocab_rows(self.draft_view, self.target_view)
        self.idle: list[Runtime] = []
        self.lock = threading.Lock()

    @staticmethod
    def for_pair(pair: ModelPair) -> RuntimePool:
        key = (id(pair.target), id(pair.draft))  # copies of a pair may swap or replace models
        with _POOL_LOCK:
            pool = pair.runtime_pools.get(key)
            if pool is None:
                pool = pair.runtime_pools[key] = RuntimePool(pair)
        return pool

    def take(self, params: SpecGuardParams, need: int, rows: int, device: torch.device) -> Runtime:
        impl = params.cache_implementation
        if impl == "auto":
            impl = "static" if device.type == "cuda" else "dynamic"
        growable = impl == "dynamic"
        graphs = not growable and device.type == "cuda" and _single_device(self.target_view)
        compiled = graphs and params.compile_decode is not False  # None: compile wherever graphs run
        kind = (params.n_candidates, rows, growable, graphs, compiled)
        # fixed caches need room for the sequence and a pass padded past its end; their sizes come in
        # power-of-two tiers so that few shapes (CUDA graphs, compiled kernels) ever exist
        room = need if growable else need + MAX_BUCKET
        with self.lock:
            fits = [r for r in self.idle if r.key[:-1] == kind and r.key[-1] >= room]
            runtime = min(fits, key=lambda r: r.key[-1]) if fits else None
            if runtime is not None:
                self.idle.remove(runtime)
        if runtime is None:
            capacity = room if growable else max(1024, 1 << (room - 1).bit_length())
            runners = [
                ModelRunner(
                    view,
                    batch=batch,
                    capacity=capacity,
                    rows=rows,
                    growable=growable,
                    graphs=graphs,
                    compile_decode=compiled,
                    vocab=vocab,
                )
                for view, batch, vocab in (
                    (self.draft_view, params.n_candidates, self.vocab[0]),
                    (self.target_view, 1, self.vocab[1]),
                )
            ]
            draft, target = runners
            runtime = Runtime(draft, target, key=(*kind, capacity), chunk=4 if graphs else 1, cost=self.cost)
        runtime.rewind(0)
        return runtime

    def give(self, runtime: Runtime) -> None:
        with self.lock:
            self.idle.append(runtime)
            del self.idle[:-MAX_IDLE_RUNTIMES]  # the oldest go; their tensors and graphs are freed


_POOL_LOCK = threading.Lock()


def vocab_rows(draft: PreTrainedModel, target: PreTrainedModel) -> tuple[Rows | None, Rows | None]:
    """How the draft's and the target's runners meet each other's vocabulary rows (None: nothing to adapt).

    The draft proposes only tokens the target can embed; a token only the target can write is fed to the
    draft as its last row. The target's own distribution is never cut: what it writes stays exactly its own.
    """
    draft_out, target_in = output_vocab(draft), embedding_rows(target)
    target_out, draft_in = output_vocab(target), embedding_rows(draft)
    rows = Rows(output=target_in if draft_out > target_in else None, embed=draft_in if target_out > draft_in else None)
    return (rows if rows != Rows() else None), None
