"""Forward passes of one model: eager, or replayed as CUDA graphs; and its sync-free decode loop.

A :class:`ModelRunner` owns a model view, its :class:`~.cache.KVCache` and a set of static buffers.
Every pass reads its inputs from those buffers (tokens, start position, decode state); positions,
masks and write offsets are computed from them on the device, so the same Python function runs
eagerly (CPU, dynamic caches) or is captured once and replayed as a CUDA graph (GPU, fixed caches):

- :meth:`ModelRunner.forward`: ``q`` tokens at explicit positions, padded to a bucket size when the
  cache is fixed (one graph per bucket), optionally recording step attention;
- :meth:`ModelRunner.decode`: ``n`` iterations of :func:`decode_iteration` ("forward one token per
  row, sample, record, advance"), all state on the device (gpt-fast's decode loop, with the bookkeeping
  inside the graph too). The host reads the sampled tokens when it wants to, not per token. With
  ``compile_decode`` its forward pass goes through ``torch.compile`` (fused kernels) before capture.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel

from .attention import StepAttention, recording
from .cache import KVCache, causal_mask
from .sampling import NO_CONTROLS, Controls, raw_logprobs, sample
from .view import layer_windows

MAX_TOP_LOGPROBS = 20
"""Most alternatives per position the decode loop records (``top_logprobs``'s range, as OpenAI's)."""
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Query lengths a fixed-cache pass is padded to (one CUDA graph each); longer inputs go in chunks."""
MAX_BUCKET = BUCKETS[-1]


def output_vocab(view: PreTrainedModel) -> int:
    """Logit columns a pass produces (the LM head's outputs; may exceed the tokenizer's length)."""
    head = view.get_output_embeddings()
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


def model_pass(
    view: PreTrainedModel,
    cache: KVCache,
    windows: tuple[int | None, ...],
    tokens: torch.Tensor,
    positions: torch.Tensor,
    end: int | None,
    keep: int = 0,
    rows: Rows | None = None,
) -> torch.Tensor:
    """Logits ``[B, q, V]`` (the last ``keep``, or all) of ``tokens [B, q]`` at ``positions [q]``.

    ``end`` (eager, growable caches) is one past the last position: attention reads that many keys;
    ``None`` reads the whole fixed cache under the mask. Layers with a sliding window get their own mask.
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
        position_ids=positions[None].expand(tokens.shape[0], -1),
        attention_mask=mask,
        **{cache_argument(view): cache},
        use_cache=True,
        logits_to_keep=keep,
    )
    if rows is not None and rows.output is not None:
        return out.logits[..., : rows.output]
    return out.logits


class Rows(NamedTuple):
    """How one model of a pair meets the other's vocabulary rows (Qwen2.5-7B has 152,064, its 0.5B draft
    151,936; the tokenizer uses fewer than either).

    ``output``: logit columns kept, so the draft never proposes a token the target cannot embed.
    ``embed``: input ids at or past it, which only the other model can write, are fed as the last row
    (the draft's proposals after such a token are poor, and the target checks them as always).
    """

    output: int | None = None
    embed: int | None = None


class DecodeState(NamedTuple):
    """The decode loop's device state (shapes for ``B`` rows and room for ``T`` iterations)."""

    cur: torch.Tensor  # [B] token each row feeds next
    pos: torch.Tensor  # [] the position it is fed at
    it: torch.Tensor  # [] iteration index: the output column
    temps: torch.Tensor  # [B] sampling temperature per row (0: greedy)
    uniform: torch.Tensor  # [B] U(0, 1) draws for this iteration
    follow: torch.Tensor  # [] bool: every row feeds row 0's token (rows stay alike)
    seen: torch.Tensor  # [B, V] bool: tokens each row's sequence holds (the repetition penalty's input)
    tokens: torch.Tensor  # [B, T] sampled tokens
    logp: torch.Tensor  # [B, T] their raw log-probabilities (the model's own distribution)
    logq: torch.Tensor  # [B, T] their log-probabilities under the distribution sampled from
    top_logp: torch.Tensor  # [B, T, MAX_TOP_LOGPROBS] the most probable tokens' raw log-probabilities...
    top_ids: torch.Tensor  # [B, T, MAX_TOP_LOGPROBS] ...and ids (filled only when asked for)


def decode_iteration(
    view: PreTrainedModel,
    cache: KVCache,
    windows: tuple[int | None, ...],
    state: DecodeState,
    controls: Controls,
    sampling: bool,
    end: int | None,
    forward: Callable[..., torch.Tensor] = model_pass,
    top: int = 0,
    vocab: Rows | None = None,
) -> None:
    """One decode step for every row: forward the current tokens, sample, store, advance. No host reads.

    ``forward`` is :func:`model_pass` or its compiled form; sampling and bookkeeping stay eager (they are
    a few small kernels, captured in the same CUDA graph). With a repetition penalty the rows' seen-token
    masks are read and updated in place; ``top`` > 0 also records that many most probable tokens.
    Neither costs anything when off.
    """
    logits = forward(view, cache, windows, state.cur[:, None], state.pos.view(1), end, rows=vocab)[:, -1]
    seen = state.seen if controls.penalised else None
    tokens, logq = sample(logits, state.temps, controls, state.uniform if sampling else None, seen)
    tokens = torch.where(state.follow, tokens[:1].expand_as(tokens), tokens)
    logq = torch.where(state.follow, logq[:1].expand_as(logq), logq)
    raw = raw_logprobs(logits).to(state.logp.dtype)
    column = state.it.view(1)
    state.tokens.index_copy_(1, column, tokens[:, None])
    state.logp.index_copy_(1, column, raw.gather(-1, tokens[:, None]))
    state.logq.index_copy_(1, column, logq[:, None].to(state.logq.dtype))
    if top:
        values, ids = raw.topk(top, dim=-1)
        state.top_logp[:, :, :top].index_copy_(1, column, values[:, None])
        state.top_ids[:, :, :top].index_copy_(1, column, ids[:, None])
    if seen is not None:
        seen.scatter_(1, tokens[:, None], True)
    state.cur.copy_(tokens)
    state.pos.add_(1)
    state.it.add_(1)


_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def compiled_model_pass() -> Callable[..., torch.Tensor]:
    """:func:`model_pass` through ``torch.compile``, made once per process (shared by every runner)."""
    if "pass" not in _COMPILED:
        _COMPILED["pass"] = torch.compile(model_pass)
    return _COMPILED["pass"]


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    outputs: Any


class ModelRunner:
    """One model view with its cache and buffers; ``batch`` rows decode side by side."""

    def __init__(
        self,
        view: PreTrainedModel,
        *,
        batch: int,
        capacity: int,
        rows: int,
        growable: bool,
        graphs: bool,
        compile_decode: bool = False,
        vocab: Rows | None = None,
    ) -> None:
        weight = view.get_input_embeddings().weight
        assert isinstance(weight, torch.Tensor)
        self.view = view
        self.device = weight.device
        self.batch = batch
        self.rows = rows
        self.cache = KVCache(int(view.config.num_hidden_layers), capacity, growable, batch)
        self.windows = tuple(layer_windows(view.config))
        self.use_graphs = graphs and not growable
        self.compile_decode = compile_decode and self.use_graphs
        dev = self.device
        # forward inputs: tokens (padded) and where they start
        self.tokens_in = torch.zeros(batch, max(MAX_BUCKET, rows), dtype=torch.long, device=dev)
        self.start = torch.zeros((), dtype=torch.long, device=dev)
        self.row_offset = torch.zeros((), dtype=torch.long, device=dev)  # first step-attention row of a pass
        self._arange = torch.arange(MAX_BUCKET, dtype=torch.long, device=dev)

        work = torch.promote_types(view.dtype, torch.float32)  # log-probabilities: float32, or float64 models'

        def zeros(*shape: int, dtype: torch.dtype = work) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=dev)

        self.vocab_rows = vocab
        self.vocab = min(output_vocab(view), vocab.output or 1 << 62) if vocab is not None else output_vocab(view)
        self.state = DecodeState(
            cur=zeros(batch, dtype=torch.long),
            pos=zeros(dtype=torch.long),
            it=zeros(dtype=torch.long),
            temps=zeros(batch),
            uniform=zeros(batch, dtype=torch.float32),
            follow=zeros(dtype=torch.bool),
            seen=zeros(batch, self.vocab, dtype=torch.bool),
            tokens=zeros(batch, rows, dtype=torch.long),
            logp=zeros(batch, rows),
            logq=zeros(batch, rows),
            top_logp=zeros(batch, rows, MAX_TOP_LOGPROBS),
            top_ids=zeros(batch, rows, MAX_TOP_LOGPROBS, dtype=torch.long),
        )
        self.controls = NO_CONTROLS
        self.top = 0  # most probable tokens recorded per iteration
        self.sampling = False  # some row samples (host mirror of ``temps > 0``)
        self.decode_pos = 0  # host mirror of ``state.pos``
        self.decoded = 0  # host mirror of ``state.it``
        self._temps: dict[tuple[float, ...], torch.Tensor] = {}
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
                layers, self.batch, self.rows, MAX_BUCKET, self.device, torch.float32
            )
        return self._records[layers]

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
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = body()
            reset()
            entry = self._graphs[key] = _Graph(graph, outputs)
        entry.graph.replay()
        return entry.outputs

    # -- forward passes ------------------------------------------------------------------------------

    def _positions(self, start: int | torch.Tensor, q: int) -> torch.Tensor:
        steps = self._arange[:q] if q <= MAX_BUCKET else torch.arange(q, device=self.device)
        return start + steps

    def forward(
        self,
        tokens: Sequence[int] | torch.Tensor | None,
        start: int,
        record: StepAttention | None = None,
        keep: int = 0,
        q: int | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, q, V]`` (or the last ``keep``) of ``tokens`` (one row, fed to every batch row) at
        positions ``start...``; ``tokens=None`` takes the first ``q`` columns the caller wrote into
        ``tokens_in`` (device to device, no host round trip).

        Writes the cache at those positions and records it (``cache.valid``: up to ``start + q``, the pass having
        read every position before ``start`` as valid). With a fixed cache ``q``
        (at most ``MAX_BUCKET``) is padded to a bucket and the pass replays that bucket's graph; the
        padding writes slots past the tokens, which no real position reads before they are written again.
        """
        if tokens is not None:
            ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
            q = ids.shape[0]
            if q > self.tokens_in.shape[1]:
                self.tokens_in = torch.zeros(self.batch, q, dtype=torch.long, device=self.device)
            self.tokens_in[:, :q].copy_(ids[None].expand(self.batch, -1))
        assert q is not None, "forward needs tokens or q"
        if self.cache.growable:  # eagerly and exactly: attention reads the positions written so far
            self.cache.ensure(start + q)
            with recording(record):
                if record is not None:
                    record.rows = self._positions(0, q)
                logits = model_pass(
                    self.view,
                    self.cache,
                    self.windows,
                    self.tokens_in[:, :q],
                    self._positions(start, q),
                    start + q,
                    keep,
                    self.vocab_rows,
                )
            self.cache.valid = start + q
            return logits
        size = bucket(q)
        if size is None:
            return self._long_forward(start, record, keep, q)
        if start + size > self.cache.capacity:
            raise RuntimeError(f"KV cache holds {self.cache.capacity} positions, {start + size} needed")
        self.start.fill_(start)

        # multi-token passes are captured eagerly: compiling each bucket (or dynamic shapes) would cost a compile
        # of minutes on first use, for passes that run once per step; the decode iterations are what pays

        def body() -> torch.Tensor:
            with recording(record):
                if record is not None:
                    record.rows = self.row_offset + self._arange[:size]
                positions = self.start + self._arange[:size]
                return model_pass(
                    self.view, self.cache, self.windows, self.tokens_in[:, :size], positions, None, 0, self.vocab_rows
                )

        logits = self._graphed(("forward", size, record.layers if record is not None else None), body)
        self.cache.valid = start + q
        return logits[:, :q] if not keep else logits[:, q - keep : q]

    def _long_forward(self, start: int, record: StepAttention | None, keep: int, q: int) -> torch.Tensor:
        """A fixed-cache pass of more than ``MAX_BUCKET`` tokens: bucket-sized passes in turn, each reading
        what the ones before it wrote (so a step of any length is verified in one call)."""
        staged = self.tokens_in[:, :q].clone()
        pieces = []
        try:
            for offset in range(0, q, MAX_BUCKET):
                n = min(MAX_BUCKET, q - offset)
                self.tokens_in[:, :n].copy_(staged[:, offset : offset + n])
                self.row_offset.fill_(offset)  # the step-attention rows of this piece
                pieces.append(self.forward(None, start + offset, record, q=n).clone())
        finally:
            self.row_offset.zero_()
        logits = torch.cat(pieces, dim=1)
        return logits if not keep else logits[:, q - keep :]

    def prefill(self, tokens: Sequence[int], start: int) -> None:
        """Write the keys/values of ``tokens`` at ``start...`` (a prompt, or a catch-up), in bucket-sized
        chunks; the logits are not needed (the next pass feeds the last token again).

        Every row holds the same sequence, so eagerly (growable caches) the pass runs on row 0 alone and
        the rows are copied: a batch of candidates costs one prefill, not one per row.
        """
        if not tokens:
            return
        if self.cache.growable and self.batch > 1:
            self.cache.rows = slice(0, 1)
            try:
                self._prefill(tokens, start, rows=1)
            finally:
                self.cache.rows = None
            self.cache.copy_row(0, start, start + len(tokens))
        else:
            self._prefill(tokens, start, rows=self.batch)
        self.cache.valid = start + len(tokens)

    def _prefill(self, tokens: Sequence[int], start: int, rows: int) -> None:
        for offset in range(0, len(tokens), MAX_BUCKET):
            chunk = tokens[offset : offset + MAX_BUCKET]
            if rows == self.batch:
                self.forward(chunk, start + offset, keep=1)
                continue
            q, at = len(chunk), start + offset
            self.cache.ensure(at + q)
            ids = torch.as_tensor(chunk, dtype=torch.long, device=self.device)[None]
            model_pass(self.view, self.cache, self.windows, ids, self._positions(at, q), at + q, 1, self.vocab_rows)

    # -- the decode loop -----------------------------------------------------------------------------

    def start_decode(
        self,
        token: int,
        position: int,
        temperatures: Sequence[float],
        controls: Controls = NO_CONTROLS,
        follow_first: bool = False,
        seen: torch.Tensor | None = None,
        top_logprobs: int = 0,
    ) -> None:
        """Every row feeds ``token`` at ``position`` next; rows sample at their own temperature.

        ``follow_first``: every row feeds row 0's token, so the rows stay alike (speculating for one
        sequence with a batch-``B`` cache). ``seen`` (``[V]`` bool, needed with a repetition penalty):
        the tokens of the sequence up to ``token`` included. ``top_logprobs``: how many most probable
        tokens each iteration records (see :attr:`DecodeState.top_ids`).
        """
        if controls.penalised and seen is None:
            raise ValueError("a repetition penalty needs the seen-token mask of the sequence")
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top_logprobs}")
        state = self.state
        state.cur.fill_(token)
        state.pos.fill_(position)
        state.it.zero_()
        state.follow.fill_(follow_first)
        if seen is not None:
            state.seen.copy_(seen.to(self.device)[None].expand_as(state.seen))
        key = tuple(float(t) for t in temperatures)
        if key not in self._temps:
            self._temps[key] = torch.tensor(key, dtype=state.temps.dtype, device=self.device)
        state.temps.copy_(self._temps[key])
        self.sampling = any(t > 0 for t in key)
        self.controls = controls
        self.top = top_logprobs
        self.decode_pos = position
        self.decoded = 0

    def decode(self, n: int, generator: torch.Generator | None, record: StepAttention | None = None) -> None:
        """``n`` more iterations of the decode loop; tokens land in ``out_tokens[:, decoded - n : decoded]``."""
        if self.decoded + n > self.rows:
            raise RuntimeError(f"decode loop holds {self.rows} iterations, {self.decoded + n} asked")
        compiled = self.compile_decode and record is None  # (compiled passes cannot record attention)
        forward = compiled_model_pass() if compiled else model_pass
        sampling = self.sampling and generator is not None
        state, controls, top = self.state, self.controls, self.top

        def body() -> None:
            end = None if not self.cache.growable else self.decode_pos + 1
            if record is None:
                decode_iteration(
                    self.view, self.cache, self.windows, state, controls, sampling, end, forward, top, self.vocab_rows
                )
                return
            with recording(record):
                record.rows = state.it.view(1)
                decode_iteration(
                    self.view, self.cache, self.windows, state, controls, sampling, end, forward, top, self.vocab_rows
                )

        key = ("decode", compiled, sampling, controls, top, record.layers if record is not None else None)
        for _ in range(n):
            self.cache.ensure(self.decode_pos + 1)
            if self.sampling and generator is not None:
                state.uniform.uniform_(generator=generator)
            self._graphed(key, body)
            self.decode_pos += 1
            self.decoded += 1
        self.cache.valid = self.decode_pos  # the positions fed so far; the last sampled token is not fed yet
