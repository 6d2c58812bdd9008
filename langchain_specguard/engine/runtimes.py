"""Runtimes: the draft's and the target's runners (KV caches, buffers, CUDA graphs) for one batch of generations.

A :class:`Runtime` has slots, one per generation it runs; a generation takes a slot when it joins the batch and
frees it when it leaves, and the runtime doubles its slots when a batch outgrows them. A :class:`RuntimePool` per
loaded pair keeps a few idle runtimes for reuse; fixed caches come in power-of-two capacities and step buffers in
power-of-two lengths, so that few shapes (graphs, compiled kernels) ever exist.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers import PreTrainedModel

from .draft_vocab import draft_head_size, frequent_ids
from .loading import ModelPair, embedding_rows, weight_bytes
from .params import SpecGuardParams
from .runner import MAX_BUCKET, ModelRunner, Rows, output_vocab
from .served import ServedTarget
from .view import engine_view, int8_view, read_bytes, subset_head_view, use_int8

CPU_FLOPS_PER_BYTE = 1.1
"""What a CPU core computes in a float32 matmul of 2 to 16 rows per byte of weight it streams from memory in a one-row
pass: about 20 GFLOP/s against 18 GB/s on this project's AVX2 machine (benchmarks/cpu_matmul.py). A target pass
costs reading its weights once plus ``2 * params`` FLOPs per token, so each token past the first adds about
``2 / (element_size * CPU_FLOPS_PER_BYTE)`` of a one-token pass (0.45 in float32)."""

MAX_IDLE_RUNTIMES = 2
"""Runtimes (caches + graphs) a pair keeps for reuse once their batches end; more are freed."""


def _tier(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


class Shape(NamedTuple):
    """What a runtime is built for: rows per generation, step buffer, cache kind and size."""

    width: int  # draft rows per generation (its candidates)
    steps: int  # decode iterations a step's buffers hold
    growable: bool
    graphs: bool
    compiled: bool
    head: int  # the draft's LM head covers this many frequent tokens (0: all of them; draft_vocab.py)
    int8: bool  # the draft's linear layers run in int8 (view.py)
    capacity: int  # positions per row of a fixed cache (0: growable)

    @classmethod
    def of(
        cls,
        params: SpecGuardParams,
        need: int,
        limit: int,
        device: torch.device,
        single_device: bool,
        draft_columns: int = 0,
        draft_dtype: torch.dtype = torch.float32,
    ) -> Shape:
        """The shape a generation of ``need`` positions (prompt and budget) and steps of at most ``limit`` tokens
        needs. The step buffers are sized by what a step can produce (its cap, the budget, the context window),
        never by the cap alone. ``draft_columns``: the draft's vocabulary (logit columns it may propose)."""
        impl = params.cache_implementation
        if impl == "auto":
            impl = "static" if device.type == "cuda" else "dynamic"
        growable = impl == "dynamic"
        graphs = not growable and device.type == "cuda" and single_device
        compiled = graphs and params.compile_decode is not False  # None: compile wherever graphs run
        # fixed caches need room for the sequence and a pass padded past its end; growable ones grow from empty
        capacity = 0 if growable else _tier(need + MAX_BUCKET, 1024)
        head = draft_head_size(params, draft_columns)
        int8 = use_int8(params.draft_int8, device, draft_dtype)
        return cls(params.candidates, _tier(limit + 1, 16), growable, graphs, compiled, head, int8, capacity)


@dataclass
class Runtime:
    """The draft's and the target's runners for a batch: slot ``s`` is one generation's rows in both.

    With a served target (``served``) there is no target runner (``target`` is None): the server keeps no state
    between requests, and the loop's served phases (:mod:`.served_steps`) send it the sequence each time.
    """

    draft: ModelRunner
    target: ModelRunner | None
    shape: Shape
    chunk: int  # draft decode iterations per host read
    cost: float  # one draft iteration over one target pass (weights read per token)
    taken: set[int] = field(default_factory=set)
    served: ServedTarget | None = None

    @property
    def slots(self) -> int:
        return self.draft.slots

    @property
    def local_target(self) -> ModelRunner:
        """The target's runner (the local phases run only where there is one)."""
        assert self.target is not None, "a served target has no local runner"
        return self.target

    @property
    def runners(self) -> list[ModelRunner]:
        """The runners holding the slots' caches: the target's (when local), then the draft's."""
        return [self.draft] if self.target is None else [self.target, self.draft]

    def take_slot(self) -> int:
        """The lowest free slot (doubling the runners' slots when all are taken)."""
        free = next((s for s in range(self.slots) if s not in self.taken), None)
        if free is None:
            free = self.slots
            self.draft = self.draft.with_slots(2 * free)
            self.target = self.target.with_slots(2 * free) if self.target is not None else None
        self.taken.add(free)
        self.rewind(free, 0)
        return free

    def release(self, slot: int) -> None:
        self.taken.discard(slot)
        self.rewind(slot, 0)

    def rewind(self, slot: int, keep: int) -> None:
        """Both caches hold at most the first ``keep`` positions of what the loop now takes as ``slot``'s sequence:
        the rest, written for tokens that were not kept, is overwritten by the next pass (never read past this)."""
        for runner in self.runners:
            for row in runner.slot_rows(slot):
                runner.cache.valid[row] = min(runner.cache.valid[row], keep)


def pass_token_cost(view: PreTrainedModel | None) -> float:
    """What each token past the first adds to a pass of ``view``, over a one-token pass: 0 on a GPU (a few tokens
    cost what one does: the pass is bound by reading the weights) and for a served target; on a CPU, the compute a
    token adds to a pass bound by streaming the weights (:data:`CPU_FLOPS_PER_BYTE`)."""
    if view is None or view.device.type != "cpu":
        return 0.0
    return 2 / (view.dtype.itemsize * CPU_FLOPS_PER_BYTE)


def _single_device(model: torch.nn.Module) -> bool:
    devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    return len(devices) <= 1


class RuntimePool:
    """Runtimes of one pair: lent to one batch at a time, a few kept for reuse (their graphs too)."""

    def __init__(self, pair: ModelPair) -> None:
        self.draft_view = engine_view(pair.draft)
        self.served = pair.served
        if pair.target is None:  # served: the draft alone runs here
            self.target_view: PreTrainedModel | None = None
            self.cost = 0.0  # (the speculation length it sets is for local writing, which a served target never runs)
            self.vocab: tuple[Rows | None, Rows | None] = (served_rows(self.draft_view, len(pair.tokenizer)), None)
            self.single_device = _single_device(self.draft_view)
        else:
            self.target_view = engine_view(pair.target)
            self.cost = max(0.02, weight_bytes(self.draft_view) / max(1, weight_bytes(self.target_view)))
            self.vocab = vocab_rows(self.draft_view, self.target_view)
            self.single_device = _single_device(self.target_view)
        self.token_cost = pass_token_cost(self.target_view)
        self.draft_columns = min(output_vocab(self.draft_view), (self.vocab[0] or Rows()).output or 1 << 62)
        self.draft_views: dict[tuple[int, bool], PreTrainedModel] = {(0, False): self.draft_view}  # (head, int8)
        self.tokenizer, self.eos_token_ids = pair.tokenizer, pair.eos_token_ids
        self.idle: list[Runtime] = []
        self.lock = threading.Lock()
        self.scheduler: object | None = None  # the pair's batch scheduler (decoding.py), made on first use

    @staticmethod
    def for_pair(pair: ModelPair) -> RuntimePool:
        key = (id(pair.target if pair.target is not None else pair.served), id(pair.draft))  # copies may swap models
        with _POOL_LOCK:
            pool = pair.runtime_pools.get(key)
            if pool is None:
                pool = pair.runtime_pools[key] = RuntimePool(pair)
        return pool

    def shape(self, params: SpecGuardParams, need: int, limit: int, device: torch.device) -> Shape:
        return Shape.of(params, need, limit, device, self.single_device, self.draft_columns, self.draft_view.dtype)

    def cost_of(self, shape: Shape) -> float:
        """One draft iteration over one target pass, by weight bytes read, for the draft ``shape`` runs (a subset
        head reads a fraction of the whole head, int8 layers a quarter of their float32 bytes)."""
        if (shape.head == 0 and not shape.int8) or self.target_view is None:  # (served: no local writing to cost)
            return self.cost
        draft = read_bytes(self.draft_view_for(shape.head, shape.int8))
        return max(0.02, draft / max(1, read_bytes(self.target_view)))

    def draft_view_for(self, head: int, int8: bool = False) -> PreTrainedModel:
        """The draft's view whose LM head covers ``head`` frequent tokens (0: its whole head), in int8 or not; each
        made once."""
        with self.lock:
            view = self.draft_views.get((head, int8))
            if view is None:
                view = self.draft_view
                if head:
                    ids = frequent_ids(self.tokenizer, head, self.draft_columns, self.eos_token_ids)
                    view = subset_head_view(view, ids)
                if int8:
                    view = int8_view(view)
                self.draft_views[(head, int8)] = view
        return view

    def take(self, shape: Shape) -> Runtime:
        """A runtime of ``shape`` (an idle one with the room, else a new one of one slot)."""
        with self.lock:
            fits = [r for r in self.idle if r.shape[:-1] == shape[:-1] and r.shape.capacity >= shape.capacity]
            runtime = min(fits, key=lambda r: r.shape.capacity) if fits else None
            if runtime is not None:
                self.idle.remove(runtime)
        if runtime is None:
            draft_view = self.draft_view_for(shape.head, shape.int8)
            runners = [
                ModelRunner(
                    view,
                    slots=1,
                    width=width,
                    capacity=shape.capacity,
                    steps=shape.steps,
                    growable=shape.growable,
                    graphs=shape.graphs,
                    compile_decode=shape.compiled,
                    vocab=vocab,
                )
                for view, width, vocab in (
                    (draft_view, shape.width, self.vocab[0]),
                    (self.target_view, 1, self.vocab[1]),
                )
                if view is not None
            ]
            draft, target = runners[0], (runners[1] if len(runners) > 1 else None)
            chunk = 4 if shape.graphs else 1
            runtime = Runtime(draft, target, shape, chunk=chunk, cost=self.cost_of(shape), served=self.served)
        for slot in range(runtime.slots):
            runtime.rewind(slot, 0)
        return runtime

    def give(self, runtime: Runtime) -> None:
        runtime.taken.clear()
        with self.lock:
            self.idle.append(runtime)
            del self.idle[:-MAX_IDLE_RUNTIMES]  # the oldest go; their tensors and graphs are freed


_POOL_LOCK = threading.Lock()


def served_rows(draft: PreTrainedModel, tokens: int) -> Rows | None:
    """How the draft meets a served target's vocabulary, which is known only through the tokenizer (``tokens``
    ids, checked against the server's at loading): it proposes only those ids, and a token the server writes
    past its embedding is fed as its last row (as with a local target, :func:`vocab_rows`)."""
    return Rows(output=tokens if output_vocab(draft) > tokens else None, embed=embedding_rows(draft))


def vocab_rows(draft: PreTrainedModel, target: PreTrainedModel) -> tuple[Rows | None, Rows | None]:
    """How the draft's and the target's runners meet each other's vocabulary rows (None: nothing to adapt).

    The draft proposes only tokens the target can embed; a token only the target can write is fed to the
    draft as its last row. The target's own distribution is never cut: what it writes stays exactly its own.
    """
    draft_out, target_in = output_vocab(draft), embedding_rows(target)
    target_out, draft_in = output_vocab(target), embedding_rows(draft)
    rows = Rows(output=target_in if draft_out > target_in else None, embed=draft_in if target_out > draft_in else None)
    return (rows if rows != Rows() else None), None
