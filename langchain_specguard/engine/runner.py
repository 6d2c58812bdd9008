"""Forward passes of one model over a batch of sequences: eager, or replayed as CUDA graphs; its sync-free decode loop.

A :class:`ModelRunner` owns a model view, its :class:`~.cache.KVCache` and a set of static buffers for
``slots`` sequences (the generations of a batch) of ``width`` rows each (the draft's candidates; the
target has one row per slot). Every row has its own positions. A pass reads its inputs from the
buffers (tokens, each row's start position, the decode state); positions, masks and write offsets are
computed from them on the device, so the same Python function runs eagerly (CPU, dynamic caches) or is
captured once per shape and replayed as a CUDA graph (GPU, fixed caches):

- :meth:`ModelRunner.forward`: each slot's own tokens at its own positions (a verification, a
  speculation round, a catch-up), padded to a bucket in length and in slots when the cache is fixed
  (one graph per bucket pair), optionally recording step attention;
- :meth:`ModelRunner.decode`: iterations of :func:`decode_iteration` ("forward one token per row, sample,
  record, advance") with all state on the device (gpt-fast's decode loop, the bookkeeping inside the
  graph too). The host reads the sampled tokens when it wants to, not per token. With ``compile_decode``
  its forward goes through ``torch.compile`` (fused kernels) before capture.

A pass covers the slots ``0..n-1`` (all their rows, or only each slot's first row, its *leader*); slots
with nothing to feed ride along at positions past their valid part, where what they write is never read.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel

from .attention import StepAttention, recording
from .cache import KVCache, causal_mask
from .grammar import BITS, constrain
from .sampling import NO_CONTROLS, Controls, raw_logprobs, sample
from .view import SubsetHead, extra_rows, layer_windows

MAX_TOP_LOGPROBS = 20
"""Most alternatives per position the decode loop records (``top_logprobs``'s range, as OpenAI's)."""
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Lengths (and slot counts) a fixed-cache pass is padded to (one CUDA graph each); longer inputs go in chunks."""
MAX_BUCKET = BUCKETS[-1]


def output_vocab(view: PreTrainedModel) -> int:
    """Token ids a pass gives logits for (the LM head's outputs; may exceed the tokenizer's length; a
    :class:`~.view.SubsetHead`'s ids lie among those of the head it covers)."""
    head = view.get_output_embeddings()
    if isinstance(head, SubsetHead):
        return head.vocab_size
    size = getattr(head, "out_features", None)
    return int(size) if isinstance(size, int) else int(view.config.vocab_size)


def bucket(q: int) -> int | None:
    return next((b for b in BUCKETS if b >= q), None)


_CACHE_ARGUMENT: dict[type, str] = {}


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword ``model``'s forward takes the KV cache by.

    transformers 5 (5.24 and 5.25 at least) renamed ``past_key_values`` to ``cache``: the old name warns that it
    "will be removed in version 5.40.0". Earlier releases (the declared range starts at 4.56), and models whose
    own code keeps the old signature, know only ``past_key_values`` and would take ``cache`` as an unknown
    keyword and ignore it. So the forward's signature decides, once per model class.
    """
    kind = type(model)
    name = _CACHE_ARGUMENT.get(kind)
    if name is None:
        name = "cache" if "cache" in inspect.signature(kind.forward).parameters else "past_key_values"
        _CACHE_ARGUMENT[kind] = name
    return name


class Rows(NamedTuple):
    """How one model of a pair meets the other's vocabulary rows (Qwen2.5-7B has 152,064, its 0.5B draft
    151,936; the tokenizer uses fewer than either).

    ``output``: logit columns kept, so the draft never proposes a token the target cannot embed.
    ``embed``: input ids at or past it, which only the other model can write, are fed as the last row
    (the draft's proposals after such a token are poor, and the target checks them as always).
    """

    output: int | None = None
    embed: int | None = None


def model_pass(
    view: PreTrainedModel,
    cache: KVCache,
    windows: tuple[int | None, ...],
    tokens: torch.Tensor,
    positions: torch.Tensor,
    end: int | None,
    *,
    keep: int = 0,
    rows: Rows | None = None,
) -> torch.Tensor:
    """Logits ``[B, q, V]`` (the last ``keep``, or all) of ``tokens [B, q]`` at ``positions [B, q]``, on the cache
    rows ``cache.rows``.

    ``end`` (eager, growable caches) is one past the last position any row writes: attention reads that many
    keys; ``None`` reads the whole fixed cache under the mask. Layers with a sliding window get their own mask.
    ``rows`` limits a model of a pair whose vocabulary rows differ (:class:`Rows`).
    """
    if rows is not None and rows.embed is not None:
        tokens = tokens.clamp(max=rows.embed - 1)
    cache.write_at = positions
    cache.read_len = end
    length = cache.capacity if end is None else end
    dtype: torch.dtype = view.dtype
    kinds = set(windows)
    mask: torch.Tensor | dict[str, torch.Tensor]
    if len(kinds) == 1:
        mask = causal_mask(positions, length, windows[0], dtype)
    else:
        sliding = next(w for w in kinds if w is not None)
        mask = {
            "full_attention": causal_mask(positions, length, None, dtype),
            "sliding_attention": causal_mask(positions, length, sliding, dtype),
        }
    out = view(
        input_ids=tokens,
        position_ids=positions,
        attention_mask=mask,
        **{cache_argument(view): cache},
        use_cache=True,
        logits_to_keep=keep,
    )
    if rows is not None and rows.output is not None:
        return out.logits[..., : rows.output]
    return out.logits


class Columns(NamedTuple):
    """The token id of each logit column of a subset head's pass, per row, and which columns hold a token (a row's
    extra tokens are padded to the longest row's count; the padding's logits are set to minus infinity)."""

    ids: torch.Tensor  # [rows, C] int64
    valid: torch.Tensor | None  # [rows, C] bool, None: every column

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [rows, ..., C]`` with the padding columns at minus infinity (probability 0)."""
        if self.valid is None:
            return logits
        valid = self.valid.reshape(self.valid.shape[0], *([1] * (logits.dim() - 2)), self.valid.shape[1])
        return logits.masked_fill(~valid, float("-inf"))

    def spread(self, logits: torch.Tensor, vocab: int) -> torch.Tensor:
        """``logits [rows, q, C]`` laid out over every token id ``[rows, q, vocab]``, the others at minus infinity."""
        full = logits.new_full((*logits.shape[:-1], vocab), float("-inf"))
        index = self.ids[:, None, :].expand(*logits.shape)
        return full.scatter_reduce_(-1, index, self.mask(logits), "amax")  # (padding repeats a real id: max)


class DecodeState(NamedTuple):
    """The decode loop's device state (shapes for ``B`` rows and room for ``T`` iterations)."""

    cur: torch.Tensor  # [B] token each row feeds next
    pos: torch.Tensor  # [B] the position it is fed at
    it: torch.Tensor  # [] iteration index: the output column
    limit: torch.Tensor  # [B] a row decodes while it < limit, then stands still (its later columns are garbage)
    temps: torch.Tensor  # [B] sampling temperature per row (0: greedy)
    uniform: torch.Tensor  # [B, T] U(0, 1) draws, one per row and iteration
    seen: torch.Tensor  # [B, V] bool: tokens each row's sequence holds (the repetition penalty's input)
    tokens: torch.Tensor  # [B, T] sampled tokens
    logp: torch.Tensor  # [B, T] their raw log-probabilities (the model's own distribution)
    logq: torch.Tensor  # [B, T] their log-probabilities under the distribution sampled from
    top_logp: torch.Tensor  # [B, T, MAX_TOP_LOGPROBS] the most probable tokens' raw log-probabilities...
    top_ids: torch.Tensor  # [B, T, MAX_TOP_LOGPROBS] ...and ids (filled only when asked for)
    bitmask: torch.Tensor  # [B, ceil(V / 32)] int32: the tokens each row may sample next (read when masked, .grammar)

    def rows(self, rows: slice) -> DecodeState:
        """The state of the rows a pass runs (views: writes reach the buffers)."""
        return DecodeState(*(t if t.dim() == 0 else t[rows] for t in self))


def decode_iteration(
    view: PreTrainedModel,
    cache: KVCache,
    windows: tuple[int | None, ...],
    state: DecodeState,
    controls: Controls,
    sampling: bool,
    *,
    end: int | None,
    forward: Callable[..., torch.Tensor] = model_pass,
    top: int = 0,
    vocab: Rows | None = None,
    columns: Columns | None = None,
    masked: bool = False,
) -> None:
    """One decode step for every row of ``state``: forward the current tokens, sample, store, advance. No host reads.

    ``forward`` is :func:`model_pass` or its compiled form; sampling and bookkeeping stay eager (they are
    a few small kernels, captured in the same CUDA graph). With a repetition penalty the rows' seen-token
    masks are read and updated in place; ``top`` > 0 also records that many most probable tokens.
    ``masked``: each row samples only the tokens its ``bitmask`` allows (a grammar's, :mod:`.grammar`), and its
    log-probabilities are those of the constrained distribution. None of these costs anything when off. A row past
    its ``limit`` still computes (the batch costs the same) but
    no longer advances: what it writes lands at a position past what it holds.

    ``columns`` (a :class:`~.view.SubsetHead`'s, for these rows): the logits cover those token ids only; the row
    samples among them from its processed distribution renormalised over them (the distribution it really draws
    from, so the log-probabilities stored are that distribution's), and what it samples is mapped back to ids.
    """
    logits = forward(view, cache, windows, state.cur[:, None], state.pos[:, None], end, rows=vocab)[:, -1]
    if masked:  # (a grammar's call drafts with the whole head: never beside ``columns``)
        logits = constrain(logits, state.bitmask)
    column = state.it.view(1)
    seen = state.seen if controls.penalised else None
    uniform = state.uniform.index_select(1, column).squeeze(1) if sampling else None
    if columns is not None:
        logits = columns.mask(logits)
        if seen is not None:
            seen = seen.gather(1, columns.ids)  # (a copy: the update below goes to the whole mask)
    picked, logq = sample(logits, state.temps, controls, uniform, seen)
    raw = raw_logprobs(logits).to(state.logp.dtype)
    tokens = picked if columns is None else columns.ids.gather(1, picked[:, None]).squeeze(1)
    state.tokens.index_copy_(1, column, tokens[:, None])
    state.logp.index_copy_(1, column, raw.gather(-1, picked[:, None]))
    state.logq.index_copy_(1, column, logq[:, None].to(state.logq.dtype))
    if top:
        values, ids = raw.topk(top, dim=-1)
        if columns is not None:
            ids = columns.ids.gather(1, ids)
        state.top_logp[:, :, :top].index_copy_(1, column, values[:, None])
        state.top_ids[:, :, :top].index_copy_(1, column, ids[:, None])
    if controls.penalised:
        state.seen.scatter_(1, tokens[:, None], True)
    state.cur.copy_(tokens)
    state.pos.add_((state.it < state.limit).to(state.pos.dtype))
    state.it.add_(1)


_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def compiled_model_pass() -> Callable[..., torch.Tensor]:
    """:func:`model_pass` through ``torch.compile``, made once per process (shared by every runner).

    One compilation per model serves every batch: the passes of a batch differ in rows (slot buckets, leaders or
    every candidate) and come from views of different buffers, and a compilation that specialised on either would
    compile again for each (a minute per model on a GPU, several per concurrency level). So sizes are symbolic
    from the start (``dynamic=True``), equal sizes are not assumed equal (no duck sizing: a pass whose rows happen
    to equal the cache's would otherwise compile apart), and the inputs are handed over in standard strides whatever
    view they come from. A pass of one row still compiles apart (torch specialises sizes of 1). Compiled passes run
    inside CUDA graph captures, so this wrapper's own cost is paid at capture only.
    """
    if "pass" not in _COMPILED:
        # each model view compiles once (and a size-specialised fallback may): room for them all, where the
        # default limit would quietly fall back to eager passes
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        compiled = torch.compile(model_pass, dynamic=True)
        from torch.fx.experimental import _config as sizes  # (the symbolic-shape options: private, no public home)

        def run(view: PreTrainedModel, cache: KVCache, windows: tuple[int | None, ...], tokens: torch.Tensor,
                positions: torch.Tensor, end: int | None, **kwargs: Any) -> torch.Tensor:  # fmt: skip
            with sizes.patch(use_duck_shape=False):  # type: ignore[attr-defined]
                return compiled(view, cache, windows, _standard(tokens), _standard(positions), end, **kwargs)

        _COMPILED["pass"] = run
    return _COMPILED["pass"]


def _standard(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in standard contiguous strides (a copy of a strided view: a few bytes, inside the graph)."""
    return tensor.clone(memory_format=torch.contiguous_format)


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    outputs: Any


Feed = Sequence[int]
"""Tokens one slot feeds in a pass (empty: the slot rides along)."""


class ModelRunner:
    """One model view with its cache and buffers: ``slots`` sequences of ``width`` rows each, decoded side by side."""

    def __init__(
        self,
        view: PreTrainedModel,
        *,
        slots: int,
        width: int = 1,
        capacity: int,
        steps: int,
        growable: bool,
        graphs: bool,
        compile_decode: bool = False,
        vocab: Rows | None = None,
    ) -> None:
        weight = view.get_input_embeddings().weight
        assert isinstance(weight, torch.Tensor)
        self.view = view
        self.device = weight.device
        self.slots, self.width = slots, width
        self.batch = slots * width
        self.steps = steps  # decode iterations one decode loop holds (a step's tokens)
        self.cache = KVCache(int(view.config.num_hidden_layers), capacity, growable, self.batch)
        self.windows = tuple(layer_windows(view.config))
        self.use_graphs = graphs and not growable
        self.compile_decode = compile_decode and self.use_graphs
        dev = self.device
        self.tokens_in = torch.zeros(self.batch, MAX_BUCKET, dtype=torch.long, device=dev)
        self.starts = torch.zeros(self.batch, dtype=torch.long, device=dev)  # each row's first position in a pass
        self.row_offset = torch.zeros((), dtype=torch.long, device=dev)  # first step-attention row of a pass
        self._arange = torch.arange(MAX_BUCKET, dtype=torch.long, device=dev)

        work = torch.promote_types(view.dtype, torch.float32)  # log-probabilities: float32, or float64 models'

        def zeros(*shape: int, dtype: torch.dtype = work) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=dev)

        self.vocab_rows = vocab
        head = view.get_output_embeddings()
        self.subset = head if isinstance(head, SubsetHead) else None  # logits over these ids (and each row's own)
        self._own: list[tuple[int, ...]] = [()] * slots  # per slot: its extra tokens (sorted ids)
        self._own_rows: tuple[torch.Tensor, torch.Tensor | None] | None = None  # their head rows [batch, E, d]
        self._columns: Columns | None = None
        self._own_columns(slots)
        self.vocab = min(output_vocab(view), vocab.output or 1 << 62) if vocab is not None else output_vocab(view)
        rows, b = steps, self.batch
        self.state = DecodeState(
            cur=zeros(b, dtype=torch.long),
            pos=zeros(b, dtype=torch.long),
            it=zeros(dtype=torch.long),
            limit=zeros(b, dtype=torch.long),
            temps=zeros(b),
            uniform=zeros(b, rows, dtype=torch.float32),
            seen=zeros(b, self.vocab, dtype=torch.bool),
            tokens=zeros(b, rows, dtype=torch.long),
            logp=zeros(b, rows),
            logq=zeros(b, rows),
            top_logp=zeros(b, rows, MAX_TOP_LOGPROBS),
            top_ids=zeros(b, rows, MAX_TOP_LOGPROBS, dtype=torch.long),
            bitmask=torch.full((b, (self.vocab + BITS - 1) // BITS), -1, dtype=torch.int32, device=dev),
        )
        # the running decode loop, as the host knows it (no device reads)
        self.controls = NO_CONTROLS
        self.top = 0  # most probable tokens recorded per iteration
        self.sampling = False  # some row samples (host mirror of ``temps > 0``)
        self.masked = False  # rows sample what their bitmask allows (a grammar fills it between iterations)
        self.decoding = slice(0, 0)  # the rows it runs
        self.decoded = 0  # iterations run (host mirror of ``state.it``)
        self._decode_starts: list[int] = []  # per row of ``decoding``: its first position...
        self._decode_limits: list[int] = []  # ...and how many iterations it advances
        self._graphs: dict[Any, _Graph] = {}
        self._records: dict[tuple[int, ...], StepAttention] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    @property
    def out_tokens(self) -> torch.Tensor:
        return self.state.tokens

    @property
    def out_logp(self) -> torch.Tensor:
        return self.state.logp

    @property
    def out_logq(self) -> torch.Tensor:
        return self.state.logq

    def record(self, layers: tuple[int, ...]) -> StepAttention:
        """This runner's step-attention buffers for ``layers`` (one set per layer choice, reused)."""
        if layers not in self._records:
            self._records[layers] = StepAttention.allocate(
                layers, self.batch, self.steps, MAX_BUCKET, self.device, torch.float32
            )
        return self._records[layers]

    # -- a subset head's columns ------------------------------------------------------------------

    def own_tokens(self, slot: int, tokens: Sequence[int]) -> None:
        """With a subset head, ``slot``'s rows can also propose ``tokens`` (its sequence's own: the names and
        numbers a prompt brings, which no frequency ranking holds). Eager passes only: a CUDA graph reads fixed
        buffers, so there the subset head proposes its own tokens alone."""
        if self.subset is None or self.use_graphs:
            return
        known = self._known
        own = tuple(sorted({t for t in tokens if 0 <= t < self.vocab} - known))
        if own != self._own[slot]:
            self._own[slot] = own
            self._own_columns(self.slots)

    @functools.cached_property
    def _known(self) -> frozenset[int]:
        assert self.subset is not None
        return frozenset(self.subset.ids.tolist())

    def _own_columns(self, slots: int) -> None:
        """Rebuild the columns and extra head rows of every row from the slots' extra tokens."""
        if self.subset is None:
            return
        base = self.subset.ids.to(self.device)[None].expand(self.batch, -1)
        extra = max((len(o) for o in self._own[:slots]), default=0)
        if extra == 0:
            self._columns, self._own_rows = Columns(base, None), None
            return
        ids = torch.zeros(self.batch, extra, dtype=torch.long)
        valid = torch.zeros(self.batch, extra, dtype=torch.bool)
        for slot, own in enumerate(self._own[:slots]):
            rows = self.slot_rows(slot)
            ids[rows.start : rows.stop] = torch.tensor([*own, *[own[0] if own else 0] * (extra - len(own))])
            valid[rows.start : rows.stop, : len(own)] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        weight, bias = self.subset.source
        self._own_rows = (
            weight.index_select(0, ids.reshape(-1)).reshape(self.batch, extra, -1),
            None if bias is None else bias.index_select(0, ids.reshape(-1)).reshape(self.batch, extra),
        )
        self._columns = Columns(torch.cat([base, ids], dim=1), torch.cat([torch.ones_like(base, dtype=torch.bool),
                                                                          valid], dim=1))  # fmt: skip

    def _columns_of(self, rows: slice) -> Columns | None:
        if self._columns is None:
            return None
        return Columns(self._columns.ids[rows], None if self._columns.valid is None else self._columns.valid[rows])

    def _extra_rows(self, rows: slice | None) -> contextlib.AbstractContextManager[None]:
        """The extra head rows of ``rows`` for the pass (nothing without them, or without logits to give)."""
        if rows is None or self._own_rows is None:
            return contextlib.nullcontext()
        weight, bias = self._own_rows
        return extra_rows(weight[rows], None if bias is None else bias[rows])

    # -- which rows a pass runs ---------------------------------------------------------------------

    def rows_of(self, slots: int, leaders: bool = False) -> slice:
        """The rows a pass over slots ``0..slots-1`` runs: every row of each, or each slot's first (its leader).

        With graphs the slot count is padded to a bucket, so few shapes exist; the padding slots ride along.
        """
        n = min(self.slots, bucket(slots) or self.slots) if self.use_graphs else slots
        step = self.width if leaders and self.width > 1 else 1
        return slice(0, n * self.width, step)

    def slot_rows(self, slot: int) -> range:
        return range(slot * self.width, (slot + 1) * self.width)

    def _slot_of(self, rows: slice, i: int) -> int:
        """The slot of the ``i``-th row of ``rows``."""
        return (rows.start + i * (rows.step or 1)) // self.width

    def _count(self, rows: slice) -> int:
        return len(range(rows.start, rows.stop, rows.step or 1))

    def _graphed(self, key: Any, body: Callable[[], Any]) -> Any:
        """Run ``body`` eagerly, or replay its CUDA graph (captured on first use under ``key``).

        Warm-up and capture run ``body`` for real at the current positions, which only writes cache
        slots the coming pass writes again (nothing valid lies at or past them); the decode state they
        advance is put back before the first replay.
        """
        if not self.use_graphs:
            return body()
        entry = self._graphs.get(key)
        if entry is None:
            moving = (self.state.cur, self.state.pos, self.state.it, self.state.seen)
            saved = [t.clone() for t in moving]

            def reset() -> None:
                for tensor, value in zip(moving, saved, strict=True):
                    tensor.copy_(value)

            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # cuBLAS workspaces, lazy allocations, compilation
                    body()
                    reset()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread-local: calls arriving in other threads (a new call's generator, say) never break the capture
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                outputs = body()
            reset()
            entry = self._graphs[key] = _Graph(graph, outputs)
        entry.graph.replay()
        return entry.outputs

    # -- forward passes ------------------------------------------------------------------------------

    def forward(
        self,
        fed: Sequence[Feed],
        starts: Sequence[int | None],
        *,
        leaders: bool = False,
        record: StepAttention | None = None,
        logits: bool = True,
    ) -> torch.Tensor | None:
        """Logits ``[rows, q, V]`` of slot ``s`` feeding ``fed[s]`` at positions ``starts[s]...`` (every row of the
        slot, or its leader alone), for slots ``0..len(fed)-1``; ``q`` is the longest feed, and a row's columns past
        its own feed are padding. A slot with nothing to feed (or a ``None`` start) rides along.

        Writes each fed row's cache at those positions and records it (``cache.valid``: up to its start plus its
        feed, the pass having read every position before its start as valid). With a fixed cache ``q`` (at most
        ``MAX_BUCKET``, longer feeds go in chunks) and the slot count are padded to buckets and the pass replays
        that shape's graph; the padding writes positions past what each row holds, which no real position reads
        before they are written again. ``logits=False``: the caller needs only the cache (a catch-up).
        """
        q = max((len(f) for f in fed), default=0)
        if q == 0:
            return None
        rows = self.rows_of(len(fed), leaders)
        if q > MAX_BUCKET and not self.cache.growable:
            return self._long_forward(fed, starts, leaders, record, logits)
        count = self._count(rows)
        size = q if self.cache.growable else bucket(q)
        assert size is not None
        tokens = torch.zeros(count, size, dtype=torch.long)
        firsts = []
        for i in range(count):
            slot = self._slot_of(rows, i)
            row = rows.start + i * (rows.step or 1)
            feed = fed[slot] if slot < len(fed) else ()
            start = starts[slot] if slot < len(fed) and feed and starts[slot] is not None else None
            if start is None:  # rides along, past what it holds
                start, feed = self.cache.valid[row], ()
            if feed:
                tokens[i, : len(feed)] = torch.as_tensor(list(feed), dtype=torch.long)
            firsts.append(int(start))
        end = max(firsts) + size
        self.cache.ensure(end)
        if size > self.tokens_in.shape[1]:  # (growable caches only: fixed ones pass at most MAX_BUCKET at a time)
            self.tokens_in = torch.zeros(self.batch, size, dtype=torch.long, device=self.device)
            self._arange = torch.arange(size, dtype=torch.long, device=self.device)
        if end > self.cache.capacity:
            raise RuntimeError(f"KV cache holds {self.cache.capacity} positions, {end} needed")
        self.tokens_in[rows, :size].copy_(tokens)
        self.starts[rows].copy_(torch.as_tensor(firsts, dtype=torch.long))
        keep = 0 if logits else 1
        compiled = self.compile_decode and size == 1 and record is None
        forward = compiled_model_pass() if compiled else model_pass

        def body() -> torch.Tensor:
            with recording(record), self._extra_rows(rows if logits else None):
                if record is not None:
                    record.rows = self.row_offset + self._arange[:size]
                    record.batch_rows = rows
                positions = self.starts[rows][:, None] + self._arange[:size]
                self.cache.rows = rows
                try:
                    return forward(
                        self.view,
                        self.cache,
                        self.windows,
                        self.tokens_in[rows, :size],
                        positions,
                        end if self.cache.growable else None,
                        keep=keep,
                        rows=self.vocab_rows,
                    )
                finally:
                    self.cache.rows = slice(0, self.batch)

        key = ("forward", rows.stop, rows.step, size, keep, compiled, record.layers if record is not None else None)
        out = self._graphed(key, body)
        for i in range(count):
            slot = self._slot_of(rows, i)
            if slot < len(fed) and fed[slot] and starts[slot] is not None:
                self.cache.valid[rows.start + i * (rows.step or 1)] = firsts[i] + len(fed[slot])
        if not logits:
            return None
        columns = self._columns_of(rows)
        if columns is not None:  # a subset head: every other token has probability 0
            return columns.spread(out[:, :q], self.vocab)
        return out[:, :q]

    def _long_forward(
        self,
        fed: Sequence[Feed],
        starts: Sequence[int | None],
        leaders: bool,
        record: StepAttention | None,
        logits: bool,
    ) -> torch.Tensor | None:
        """A fixed-cache pass of more than ``MAX_BUCKET`` tokens: bucket-sized passes in turn, each reading what
        the ones before it wrote (so a step of any length is verified in one call)."""
        q = max(len(f) for f in fed)
        pieces = []
        try:
            for offset in range(0, q, MAX_BUCKET):
                part = [list(f[offset : offset + MAX_BUCKET]) for f in fed]
                at = [None if s is None else s + offset for s in starts]
                self.row_offset.fill_(offset)  # the step-attention rows of this piece
                out = self.forward(part, at, leaders=leaders, record=record, logits=logits)
                if out is not None:
                    width = min(MAX_BUCKET, q - offset)
                    if out.shape[1] < width:
                        out = torch.nn.functional.pad(out, (0, 0, 0, width - out.shape[1]))
                    pieces.append(out.clone())
        finally:
            self.row_offset.zero_()
        return torch.cat(pieces, dim=1) if logits else None

    def prefill(self, slot: int, tokens: Sequence[int], start: int) -> None:
        """Write the keys/values of ``tokens`` at ``start...`` on every row of ``slot`` (a prompt), eagerly, on the
        slot's first row alone; the other rows copy it (a batch of candidates costs one prefill, not one per row).
        The logits are not needed: the next pass feeds the last token again."""
        if not tokens:
            return
        first = slot * self.width
        rows = slice(first, first + 1)
        end = start + len(tokens)
        self.cache.ensure(end)
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.device)[None]
        positions = (start + torch.arange(len(tokens), device=self.device))[None]
        self.cache.rows = rows
        try:
            model_pass(self.view, self.cache, self.windows, ids, positions, end if self.cache.growable else None,
                       keep=1, rows=self.vocab_rows)  # fmt: skip
        finally:
            self.cache.rows = slice(0, self.batch)
        self.cache.valid[first] = end
        self.spread(slot)

    def spread(self, slot: int) -> None:
        """Every row of ``slot`` takes what its first row holds past its own valid part (its candidates restart from
        the sequence the first row caught up to)."""
        first = slot * self.width
        others = [r for r in self.slot_rows(slot) if r != first]
        stop = self.cache.valid[first]
        lagging = [r for r in others if self.cache.valid[r] != stop]
        if not lagging:
            return
        start = min(min(self.cache.valid[r] for r in lagging), stop)
        self.cache.copy_rows([first] * len(lagging), lagging, start, stop)
        for row in lagging:
            self.cache.valid[row] = stop

    # -- the decode loop -----------------------------------------------------------------------------

    def start_decode(
        self,
        tokens: Sequence[int | None],
        positions: Sequence[int],
        temperatures: Sequence[Sequence[float]],
        limits: Sequence[int],
        *,
        leaders: bool = False,
        controls: Controls = NO_CONTROLS,
        seen: Sequence[torch.Tensor | None] | None = None,
        uniforms: Sequence[torch.Tensor | None] | None = None,
        top_logprobs: int = 0,
        masked: bool = False,
    ) -> None:
        """Slot ``s`` (of ``0..len(tokens)-1``; ``None``: it rides along) feeds ``tokens[s]`` at ``positions[s]`` next
        on each of its rows (or its leader), which sample at ``temperatures[s][r]`` and decode ``limits[s]`` tokens.

        ``seen[s]`` (``[V]`` bool, needed with a repetition penalty): the tokens of the slot's sequence up to the
        one fed. ``uniforms[s]``: ``[rows, n]`` U(0, 1) draws (``n`` >= its limit) for the slot's sampling rows.
        ``top_logprobs``: how many most probable tokens each iteration records (see :attr:`DecodeState.top_ids`).
        ``masked``: rows sample what :attr:`DecodeState.bitmask` allows, every token until the caller writes a
        row's mask (:func:`~.grammar.decode`).
        """
        if controls.penalised and seen is None:
            raise ValueError("a repetition penalty needs the seen-token mask of each sequence")
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top_logprobs}")
        rows = self.rows_of(len(tokens), leaders)
        count = self._count(rows)
        cur, pos, temps, limit = [0] * count, [0] * count, [0.0] * count, [0] * count
        for i in range(count):
            slot = self._slot_of(rows, i)
            row = rows.start + i * (rows.step or 1)
            token = tokens[slot] if slot < len(tokens) else None
            if token is None:  # rides along, standing still past what it holds
                pos[i] = self.cache.valid[row]
                continue
            cur[i], pos[i], limit[i] = int(token), int(positions[slot]), int(limits[slot])
            temps[i] = float(temperatures[slot][(row - slot * self.width) if not leaders else 0])
        if max(limit) > self.steps:
            raise RuntimeError(f"decode loop holds {self.steps} iterations, {max(limit)} asked")
        state = self.state.rows(rows)
        state.cur.copy_(torch.as_tensor(cur, dtype=torch.long))
        state.pos.copy_(torch.as_tensor(pos, dtype=torch.long))
        state.limit.copy_(torch.as_tensor(limit, dtype=torch.long))
        state.temps.copy_(torch.as_tensor(temps, dtype=state.temps.dtype))
        self.state.it.zero_()
        for slot in range(len(tokens)):
            if tokens[slot] is None:
                continue
            slot_rows = self._rows_in(rows, slot)
            if seen is not None and seen[slot] is not None:
                mask = seen[slot]
                assert mask is not None
                state.seen[slot_rows].copy_(mask.to(self.device)[None].expand(state.seen[slot_rows].shape[0], -1))
            if uniforms is not None and uniforms[slot] is not None:
                draws = uniforms[slot]
                assert draws is not None
                state.uniform[slot_rows, : draws.shape[-1]].copy_(draws.to(self.device, state.uniform.dtype))
        self.sampling = any(t > 0 for t in temps)
        self.masked = masked
        if masked:
            state.bitmask.fill_(-1)
        self.controls = controls
        self.top = top_logprobs
        self.decoding = rows
        self.decoded = 0
        self._decode_starts, self._decode_limits = pos, limit

    def _rows_in(self, rows: slice, slot: int) -> slice:
        """Where ``slot``'s rows are within a pass's ``rows`` (which start at row 0): a slice, so that writing through
        it reaches the buffers."""
        if (rows.step or 1) > 1:  # leaders only: one row per slot
            return slice(slot, slot + 1)
        return slice(slot * self.width, (slot + 1) * self.width)

    def stop_slots(self, slots: Sequence[int]) -> None:
        """The slots' rows stop advancing after the iterations run so far (their steps ended)."""
        for slot in slots:
            for i in range(*self._rows_in(self.decoding, slot).indices(len(self._decode_limits))):
                self._decode_limits[i] = min(self._decode_limits[i], self.decoded)
        limits = torch.as_tensor(self._decode_limits, dtype=torch.long)
        self.state.rows(self.decoding).limit.copy_(limits)

    def decode(self, n: int, generator: torch.Generator | None = None, record: StepAttention | None = None) -> None:
        """``n`` more iterations of the decode loop; tokens land in ``out_tokens[row, decoded - n : decoded]``."""
        if self.decoded + n > self.steps:
            raise RuntimeError(f"decode loop holds {self.steps} iterations, {self.decoded + n} asked")
        del generator  # the draws were made at start_decode (one block per slot, so batching never moves them)
        compiled = self.compile_decode and record is None  # (compiled passes cannot record attention)
        forward = compiled_model_pass() if compiled else model_pass
        rows, controls, top, sampling, masked = self.decoding, self.controls, self.top, self.sampling, self.masked
        state = self.state.rows(rows)

        def body() -> None:
            end = None if not self.cache.growable else self._decode_end() + 1
            self.cache.rows = rows
            try:
                with recording(record), self._extra_rows(rows):
                    if record is not None:
                        record.rows = state.it.view(1)
                        record.batch_rows = rows
                    decode_iteration(
                        self.view,
                        self.cache,
                        self.windows,
                        state,
                        controls,
                        sampling,
                        end=end,
                        forward=forward,
                        top=top,
                        vocab=self.vocab_rows,
                        columns=self._columns_of(rows),
                        masked=masked,
                    )
            finally:
                self.cache.rows = slice(0, self.batch)

        key = ("decode", rows.stop, rows.step, compiled, sampling, controls, top, masked,
               record.layers if record is not None else None)  # fmt: skip
        for _ in range(n):
            self.cache.ensure(self._decode_end() + 1)
            self._graphed(key, body)
            self.decoded += 1
        for i, (start, limit) in enumerate(zip(self._decode_starts, self._decode_limits, strict=True)):
            if limit:  # the positions each row fed so far; its last sampled token is not fed yet
                self.cache.valid[rows.start + i * (rows.step or 1)] = start + min(self.decoded, limit)

    def _decode_end(self) -> int:
        """The highest position any decoding row feeds at next."""
        return max(s + min(self.decoded, lim) for s, lim in zip(self._decode_starts, self._decode_limits, strict=True))

    def read_decoded(self, slots: Sequence[int], start: int) -> dict[int, list[list[int]]]:
        """Tokens of the iterations ``start..decoded`` of each of ``slots``' decoding rows (one host read)."""
        rows = self.decoding
        count = self._count(rows)
        picks = {slot: list(range(*self._rows_in(rows, slot).indices(count))) for slot in slots}
        flat = [i for slot in slots for i in picks[slot]]
        if not flat:
            return {}
        state = self.state.rows(rows)
        index = torch.as_tensor(flat, device=self.device)
        table = state.tokens.index_select(0, index)[:, start : self.decoded].tolist()
        out: dict[int, list[list[int]]] = {}
        at = 0
        for slot in slots:
            out[slot] = table[at : at + len(picks[slot])]
            at += len(picks[slot])
        return out

    def decoded_row(self, slot: int, row: int = 0) -> int:
        """The buffer row of ``slot``'s ``row``-th decoding row (for its log-probabilities)."""
        rows = self.decoding
        return rows.start + (self._rows_in(rows, slot).start + row) * (rows.step or 1)

    # -- resizing ------------------------------------------------------------------------------------

    def with_slots(self, slots: int) -> ModelRunner:
        """A runner of ``slots`` slots over the same view, holding this one's caches in its first slots."""
        grown = ModelRunner(
            self.view,
            slots=slots,
            width=self.width,
            capacity=self.cache.capacity,
            steps=self.steps,
            growable=self.cache.growable,
            graphs=self.use_graphs,
            compile_decode=self.compile_decode,
            vocab=self.vocab_rows,
        )
        grown.cache = self.cache.with_batch(slots * self.width)
        grown._own = [*self._own, *[()] * (slots - self.slots)]
        grown._own_columns(slots)
        return grown
