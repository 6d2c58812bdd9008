"""Forward passes of one model: eager, or replayed as CUDA graphs; and its sync-free decode loop.

A :class:`ModelRunner` owns a model view, its :class:`~.cache.KVCache` and a set of static buffers.
Every pass reads its inputs from those buffers (tokens, start position, decode state) and positions,
masks and write offsets are computed from them on the device, so the same Python function runs
eagerly (CPU, dynamic caches) or is captured once and replayed as a CUDA graph (GPU, fixed caches):

- :meth:`ModelRunner.forward`: ``q`` tokens at explicit positions, padded to a bucket size when the
  cache is fixed (one graph per bucket), optionally recording step attention;
- :meth:`ModelRunner.decode`: ``n`` iterations of "forward one token per row, sample, record, advance",
  all state on the device (gpt-fast's decode loop, with the bookkeeping inside the graph too). The host
  reads the sampled tokens when it wants to, not per token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from .attention import StepAttention, recording
from .cache import KVCache, causal_mask
from .sampling import sample
from .view import layer_windows

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Query lengths a fixed-cache pass is padded to (one CUDA graph each); longer passes run eagerly."""
MAX_BUCKET = BUCKETS[-1]


def bucket(q: int) -> int | None:
    return next((b for b in BUCKETS if b >= q), None)


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
    ) -> None:
        weight = view.get_input_embeddings().weight
        assert isinstance(weight, torch.Tensor)
        self.view = view
        self.device = weight.device
        self.dtype = weight.dtype
        self.batch = batch
        self.rows = rows
        self.cache = KVCache(int(view.config.num_hidden_layers), capacity, growable)
        self.windows = layer_windows(view.config)
        self.use_graphs = graphs and not growable
        self.compile_decode = compile_decode and self.use_graphs
        dev = self.device
        # forward inputs: tokens (padded), where they start, the tokens their logits are scored against
        self.tokens_in = torch.zeros(batch, MAX_BUCKET, dtype=torch.long, device=dev)
        self.start = torch.zeros((), dtype=torch.long, device=dev)
        self._arange = torch.arange(MAX_BUCKET, dtype=torch.long, device=dev)
        # decode-loop state: the token each row feeds next, its position, the iteration, sampling setup
        self.cur = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros((), dtype=torch.long, device=dev)
        self.it = torch.zeros((), dtype=torch.long, device=dev)
        self.temps = torch.zeros(batch, dtype=torch.float32, device=dev)
        self.noise: torch.Tensor | None = None  # [B, V] Exp(1) draws, refilled before every sampled iteration
        self.top_p = 1.0
        self.sampling = False  # some row samples (host mirror of ``temps > 0``)
        self.follow_first = False
        self._temps: dict[tuple[float, ...], torch.Tensor] = {}
        self.out_tokens = torch.zeros(batch, rows, dtype=torch.long, device=dev)  # [B, T]
        self.out_logp = torch.zeros(batch, rows, dtype=torch.float32, device=dev)  # raw log p of each token
        self.out_logq = torch.zeros(batch, rows, dtype=torch.float32, device=dev)  # log q it was sampled with
        self.decode_pos = 0  # host mirror of ``pos``
        self.decoded = 0  # host mirror of ``it``
        self._graphs: dict[Any, _Graph] = {}
        self._records: dict[tuple[int, ...], StepAttention] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._compiled: Callable[..., Any] | None = None

    # -- shared pieces -------------------------------------------------------------------------------

    def record(self, layers: tuple[int, ...]) -> StepAttention:
        """This runner's step-attention buffers for ``layers`` (one set per layer choice, reused)."""
        if layers not in self._records:
            self._records[layers] = StepAttention.allocate(
                layers, self.batch, self.rows, MAX_BUCKET, self.device, torch.float32
            )
        return self._records[layers]

    def _masks(self, positions: torch.Tensor, length: int) -> torch.Tensor | dict[str, torch.Tensor]:
        windows = set(self.windows)
        if len(windows) == 1:
            return causal_mask(positions, length, next(iter(windows)), self.dtype)
        sliding = next(w for w in windows if w is not None)
        return {
            "full_attention": causal_mask(positions, length, None, self.dtype),
            "sliding_attention": causal_mask(positions, length, sliding, self.dtype),
        }

    def _pass(self, tokens: torch.Tensor, positions: torch.Tensor, end: int | None, keep: int = 0) -> torch.Tensor:
        """Logits ``[B, q, V]`` (the last ``keep``, or all) of ``tokens [B, q]`` at ``positions [q]``.

        ``end`` (eager, growable caches) is one past the last position: attention reads that many keys;
        ``None`` reads the whole fixed cache under the mask.
        """
        cache = self.cache
        cache.write_at = positions
        cache.read_len = end
        length = cache.capacity if end is None else end
        out = self.view(
            input_ids=tokens,
            position_ids=positions[None].expand(tokens.shape[0], -1),
            attention_mask=self._masks(positions, length),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        return out.logits

    def _graphed(self, key: Any, body: Callable[[], Any], scratch: Callable[[], None]) -> Any:
        """Run ``body`` eagerly, or replay its CUDA graph (captured on first use under ``key``).

        Warm-up and capture run ``body`` for real; ``scratch`` first points its writes at cache slots
        no sequence uses (the last ``MAX_BUCKET`` positions), so capturing mid-generation is harmless.
        """
        if not self.use_graphs:
            return body()
        entry = self._graphs.get(key)
        if entry is None:
            saved = (self.start.clone(), self.pos.clone(), self.it.clone(), self.cur.clone())
            scratch()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # cuBLAS workspaces, lazy allocations, compilation
                    scratch()
                    body()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            scratch()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = body()
            entry = self._graphs[key] = _Graph(graph, outputs)
            for buffer, value in zip((self.start, self.pos, self.it, self.cur), saved, strict=True):
                buffer.copy_(value)
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

        Writes the cache at those positions (``valid`` is the caller's to set). With a fixed cache ``q``
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
                return self._pass(self.tokens_in[:, :q], self._positions(start, q), start + q, keep)
        size = bucket(q)
        if size is None:
            raise ValueError(f"a fixed-cache pass takes at most {MAX_BUCKET} tokens, got {q}")
        self.start.fill_(start)
        layers = record.layers if record is not None else None

        def body() -> torch.Tensor:
            with recording(record):
                if record is not None:
                    record.rows = self._arange[:size]
                return self._pass(self.tokens_in[:, :size], self.start + self._arange[:size], None)

        def scratch() -> None:
            self.start.fill_(self.cache.capacity - MAX_BUCKET)

        logits = self._graphed(("forward", size, layers), body, scratch)
        return logits[:, :q] if not keep else logits[:, q - keep : q]

    def prefill(self, tokens: Sequence[int], start: int) -> None:
        """Write the keys/values of ``tokens`` at ``start...`` (a prompt, or a catch-up), in bucket-sized
        chunks; the logits are not needed (the next pass feeds the last token again)."""
        for offset in range(0, len(tokens), MAX_BUCKET):
            self.forward(tokens[offset : offset + MAX_BUCKET], start + offset, keep=1)
        if tokens:
            self.cache.valid = start + len(tokens)

    # -- the decode loop -----------------------------------------------------------------------------

    def start_decode(
        self, token: int, position: int, temperatures: Sequence[float], top_p: float, follow_first: bool = False
    ) -> None:
        """Every row feeds ``token`` at ``position`` next; rows sample at their own temperature.

        ``follow_first``: every row feeds row 0's token, so the rows stay alike (speculating for one
        sequence with a batch-``B`` cache).
        """
        self.cur.fill_(token)
        self.pos.fill_(position)
        self.it.zero_()
        key = tuple(float(t) for t in temperatures)
        if key not in self._temps:
            self._temps[key] = torch.tensor(key, dtype=torch.float32, device=self.device)
        self.temps.copy_(self._temps[key])
        self.sampling = any(t > 0 for t in key)
        self.top_p = top_p
        self.follow_first = follow_first
        self.decode_pos = position
        self.decoded = 0

    def _iteration(self, record: StepAttention | None, sampling: bool) -> None:
        """One decode step for every row: forward the current tokens, sample, store, advance. No host reads."""
        end = None if not self.cache.growable else self.decode_pos + 1
        if record is None:  # (compiled iterations never record: no context variable to trace)
            logits = self._pass(self.cur[:, None], self.pos.view(1), end)[:, -1]
        else:
            with recording(record):
                record.rows = self.it.view(1)
                logits = self._pass(self.cur[:, None], self.pos.view(1), end)[:, -1]
        tokens, logq = sample(logits, self.temps, self.top_p, self.noise if sampling else None)
        if self.follow_first:
            tokens, logq = tokens[:1].expand_as(tokens), logq[:1].expand_as(logq)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None])
        index = self.it.view(1)
        self.out_tokens.index_copy_(1, index, tokens[:, None])
        self.out_logp.index_copy_(1, index, logp)
        self.out_logq.index_copy_(1, index, logq[:, None])
        self.cur.copy_(tokens)
        self.pos.add_(1)
        self.it.add_(1)

    def decode(self, n: int, generator: torch.Generator | None, record: StepAttention | None = None) -> None:
        """``n`` more iterations of the decode loop; tokens land in ``out_tokens[:, decoded - n : decoded]``."""
        if self.decoded + n > self.rows:
            raise RuntimeError(f"decode loop holds {self.rows} iterations, {self.decoded + n} asked")
        sampling = self.sampling and generator is not None
        if sampling and self.noise is None:
            vocab = int(self.view.get_output_embeddings().weight.shape[0])
            self.noise = torch.empty(self.batch, vocab, dtype=torch.float32, device=self.device)
        layers = record.layers if record is not None else None
        step = self._iteration
        if self.compile_decode and record is None:
            if self._compiled is None:
                self._compiled = torch.compile(self._iteration, dynamic=False)
            step = self._compiled

        def scratch() -> None:
            self.pos.fill_(self.cache.capacity - MAX_BUCKET)
            self.it.zero_()

        for _ in range(n):
            self.cache.ensure(self.decode_pos + 1)
            if sampling:
                assert self.noise is not None and generator is not None
                self.noise.exponential_(generator=generator)
            self._graphed(
                ("decode", sampling, self.top_p, self.follow_first, layers), lambda: step(record, sampling), scratch
            )
            self.decode_pos += 1
            self.decoded += 1
