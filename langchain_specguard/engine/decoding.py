"""The SpecGuard decoding loop, top to bottom.

One generation is one :class:`Generation`: the committed sequence, the output text, the sampling
generator, the agreement estimate, and a :class:`Runtime` (the draft's and the target's runners: KV
caches, buffers, CUDA graphs) lent by the pair's pool. Each step is

1. **propose** (:mod:`.propose`): the draft decodes ``n_candidates`` continuations in one batch on the
   device, reading them back once per chunk; the most consistent one is kept;
2. **verify** (:mod:`.verify`): one target pass over the kept step gives grounding, confidence and the
   verdict, and the target's own tokens for the step;
3. **write** (:mod:`.write`), if rejected: the target keeps the step's tokens it would have written
   itself and continues from the first disagreement, speculating with the draft;
4. **commit** (:mod:`.text`): the step's text, stop sequences, EOS, the budget; a :class:`StepEvent`.

Cache bookkeeping: each runner's ``cache.valid`` counts the positions holding the sequence the engine
currently assumes; every phase lowers it to what its tokens keep, and a pass starts by catching up
from ``valid`` to the last committed token, which it feeds again (its logits start the step).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from .attention import decoder_layers
from .calibration import ThresholdCalibrator
from .events import EVENT_VERSION, GenerationResult, StepEvent, summarize
from .loading import ModelPair, decode, embedding_rows, weight_bytes
from .logprobs import StepLogprobs
from .params import SpecGuardParams
from .propose import propose
from .runner import MAX_BUCKET, ModelRunner, Rows, output_vocab
from .sampling import Controls, seen_rows
from .steps import call_syntax
from .text import OutputText
from .verify import verify
from .view import engine_view, layer_windows
from .write import Agreement, write

__all__ = ["EVENT_VERSION", "GenerationResult", "StepEvent", "generate", "generate_steps", "summarize"]

MAX_IDLE_RUNTIMES = 2
"""Runtimes (caches + graphs) a pair keeps for reuse once their generations end; more are freed."""


def score_layers(model: PreTrainedModel, requested: Sequence[int] | None) -> tuple[int, ...]:
    """The layers whose attention is scored: the requested ones, or by default the last third.

    On models that mix sliding-window and full-attention layers (Gemma 2/3, ...), the default is the
    full-attention layers of the upper half instead: a sliding layer cannot see a prompt longer than
    its window, so its attention cannot say whether the step builds on that prompt.
    """
    n = len(decoder_layers(model))
    if requested is None:
        windows = layer_windows(model.config.get_text_config())[:n]
        full = [i for i, w in enumerate(windows) if w is None]
        if full and len(full) < n:
            upper = [i for i in full if i >= n // 2]
            return tuple(upper or full[-1:])
        return tuple(range(n - max(1, n // 3), n))
    bad = [i for i in requested if not -n <= i < n]
    if bad or not requested:
        raise ValueError(
            f"score_layers must be non-empty indices in [-{n}, {n - 1}] for this model, got {list(requested)}"
        )
    return tuple(sorted({i % n for i in requested}))


# --------------------------------------------------------------------------------------------------
# runtimes: what a generation decodes with, pooled per pair


@dataclass
class Runtime:
    """The draft's and the target's runners for one generation at a time."""

    draft: ModelRunner
    target: ModelRunner
    key: tuple[Any, ...]
    chunk: int  # draft decode iterations per host read
    cost: float  # one draft iteration over one target pass (weights read per token)


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
        key = ("runtimes", id(pair.target), id(pair.draft))  # copies of a pair may swap or replace models
        with _POOL_LOCK:
            pool = pair.extra.get(key)
            if pool is None:
                pool = pair.extra[key] = RuntimePool(pair)
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
        runtime.draft.cache.valid = runtime.target.cache.valid = 0
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


# --------------------------------------------------------------------------------------------------
# one generation


@dataclass
class Generation:
    """Everything one call's decoding needs; the phases read and update it."""

    pair: ModelPair
    params: SpecGuardParams
    runtime: Runtime
    out: OutputText
    ids: list[int]  # prompt + committed output
    budget: int
    generator: torch.Generator
    validate_step: Callable[[str], str | None] | None
    draft_layers: tuple[int, ...]
    target_layers: tuple[int, ...]
    agreement: Agreement
    calibrator: ThresholdCalibrator | None = None  # with acceptance_threshold="auto"
    index: int = 0
    logprobs: StepLogprobs | None = None  # the current step's, when the call reports log-probabilities
    controls: Controls = field(init=False)
    _seen: dict[tuple[torch.device, int], tuple[torch.Tensor, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.controls = Controls.of(self.params)

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=self.generator.device)

    def threshold(self) -> float:
        """The acceptance threshold in force for the next step."""
        if self.calibrator is not None:
            return self.calibrator.threshold()
        assert not isinstance(self.params.acceptance_threshold, str)
        return self.params.acceptance_threshold

    def seen(self, runner: ModelRunner, extra: Sequence[int] = ()) -> torch.Tensor | None:
        """Mask ``[V]`` of the tokens in ``ids`` and ``extra`` on ``runner``'s device, or None without a
        repetition penalty. The mask of the committed ids is kept and extended as they grow (one small
        copy per step, none per token)."""
        if not self.controls.penalised:
            return None
        key = (runner.device, runner.vocab)
        mask, count = self._seen.get(key) or (torch.zeros(runner.vocab, dtype=torch.bool, device=runner.device), 0)
        if count < len(self.ids):
            mask.index_fill_(0, _known(self.ids[count:], runner), True)
        self._seen[key] = (mask, len(self.ids))
        if not extra:
            return mask
        return mask.clone().index_fill_(0, _known(extra, runner), True)

    def seen_rows(
        self, runner: ModelRunner, extra: Sequence[int], fed: Sequence[int], device: torch.device
    ) -> torch.Tensor | None:
        """Seen-token masks ``[len(fed), V]`` for the rows of a pass of ``runner`` that fed ``fed`` after
        ``ids + extra`` (row ``j`` has also seen ``fed[: j + 1]``), or None without a repetition penalty."""
        before = self.seen(runner, extra)
        return None if before is None else seen_rows(before, torch.tensor(list(fed), device=device))

    def step(self) -> StepEvent:
        started = time.perf_counter()
        self.out.begin_step()
        self.logprobs = StepLogprobs(self.params.top_logprobs or 0) if self.params.logprobs else None
        limit = min(self.params.step_cap, self.budget - len(self.out.generated))
        proposal = propose(self, limit)
        drafted = time.perf_counter()
        verdict = verify(self, proposal)
        verified = time.perf_counter()
        tokens, written = proposal.tokens, None
        if not verdict.accepted:
            written = write(self, proposal.tokens, verdict.agree, verdict.next_token, limit)
            tokens = written.tokens
        wrote = time.perf_counter()
        committed = self.out.commit(tokens, self.budget)
        logprobs = self.logprobs.read(len(committed.tokens)) if self.logprobs is not None else None
        self.ids.extend(committed.tokens)
        for runner in (self.runtime.draft, self.runtime.target):
            runner.cache.valid = min(runner.cache.valid, len(self.ids) - 1)
        event = StepEvent(
            index=self.index,
            source="draft" if verdict.accepted else "target",
            text=committed.text,
            num_tokens=len(committed.tokens),
            n_candidates=self.params.n_candidates,
            grounding=verdict.grounding,
            confidence=verdict.confidence,
            score=verdict.score,
            threshold=verdict.threshold,
            accepted=verdict.accepted,
            reason=verdict.reason,
            seconds=time.perf_counter() - started,
            draft_text=decode(self.pair.tokenizer, proposal.tokens),
            drafted_tokens=proposal.drafted + (written.drafted if written else 0),
            target_forwards=verdict.target_forwards + (written.target_forwards if written else 0),
            draft_seconds=drafted - started,
            verify_seconds=verified - drafted,
            target_seconds=wrote - verified,
            finish_reason=committed.finish,
            token_ids=list(committed.tokens),
            kind=committed.kind,
            detail=verdict.detail,
            signals=verdict.signals,
            kept_tokens=0 if verdict.accepted else min(verdict.agree, len(committed.tokens)),
            speculated_tokens=written.speculated if written else 0,
            logprobs=logprobs,
            call_candidates=proposal.call_candidates,
            valid_call_candidates=proposal.valid_call_candidates,
        )
        self.index += 1
        return event


def _known(tokens: Sequence[int], runner: ModelRunner) -> torch.Tensor:
    """``tokens`` that ``runner``'s model has rows for (a draft has none for rows only the target writes)."""
    return torch.tensor([t for t in tokens if t < runner.vocab], dtype=torch.long, device=runner.device)


def _generator(device: torch.device, params: SpecGuardParams) -> torch.Generator:
    """Seeded by ``seed``; greedy calls without one use seed 0, so the same call gives the same text."""
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    elif params.temperature == 0:
        gen.manual_seed(0)
    else:
        gen.seed()
    return gen


def threshold_calibrator(params: SpecGuardParams) -> ThresholdCalibrator | None:
    """A calibrator of its own for one generation with ``acceptance_threshold="auto"`` (None otherwise).

    Nothing is shared between calls: a call's threshold, so its text, depends on that call alone.
    """
    if params.acceptance_threshold != "auto":
        return None
    return ThresholdCalibrator(params.calibration_quantile)


def check_prompt(pair: ModelPair, prompt_ids: Sequence[int]) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: give at least one token (one non-empty message)")
    if len(prompt_ids) >= pair.context_window:
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens but the model's context window is {pair.context_window} tokens; "
            "shorten the prompt"
        )


def generate_steps(
    pair: ModelPair,
    prompt_ids: Sequence[int],
    params: SpecGuardParams,
    stop: Sequence[str] | None = None,
    validate_step: Callable[[str], str | None] | None = None,
    prefix: str = "",
    single_call: bool = False,
    thinking: bool = False,
    calibrator: ThresholdCalibrator | None = None,
) -> Iterator[StepEvent]:
    """Run SpecGuard on ``prompt_ids`` and yield each step as soon as it is verified.

    With ``params.tool_call_markers`` set, a tool call is one step from its opening to its closing
    marker: it never ends at a CoT delimiter, and a text step that runs into an opening marker is cut
    just before it, so the call starts a step of its own. With ``params.json_tool_calls`` set, each
    bare JSON call that opens the answer (:func:`~.steps.json_region`) is one step from its ``{`` to
    the brace that balances it. ``validate_step`` (the text of a finished draft tool call in, a
    rejection reason or None out) checks every candidate's call: a broken call loses the candidate
    vote to any candidate that fits, and a kept broken call is rejected whatever its score, so the
    target writes that step instead (``reason="schema"``). ``prefix`` is assistant text already
    rendered at the end of the prompt (e.g. a forced ``<tool_call>``): it counts when deciding whether
    a call is open, and is not part of the yielded text. ``single_call``: the output ends
    (``finish_reason`` "stop") with the step that closes its first tool call.

    With ``params.reasoning_markers`` set, a think block that opens the output (``<think>...</think>``,
    reasoning models) is stepped like any chain of thought, its closing marker ends a step so the answer
    starts a new one, its steps have ``kind="reasoning"``, and tool-call rules apply only after it.
    ``thinking``: the prompt already opened the block (the chat template's generation prompt ends with
    ``<think>``), so the output starts inside it.

    ``calibrator``: with ``acceptance_threshold="auto"``, where the threshold is learned; by default one
    of the generation's own (:func:`threshold_calibrator`). Pass one to learn across prompts on purpose
    (``ChatSpecGuard.calibrate``).
    """
    check_prompt(pair, prompt_ids)
    if params.max_tokens > pair.context_window:
        # a cap the model can never reach is a configuration mistake; a cap that only this prompt
        # leaves no room for is clipped below (finish_reason "length"), as Hugging Face generate does
        raise ValueError(
            f"max_tokens is {params.max_tokens} but the model's context window is {pair.context_window} tokens "
            f"(prompt and output together): set max_tokens to at most {pair.context_window}"
        )
    stops = [s for s in (stop or []) if s]
    if stop is not None and len(stops) != len(stop):
        raise ValueError("stop sequences must be non-empty strings")
    budget = min(params.max_tokens, pair.context_window - len(prompt_ids))
    out = OutputText(
        pair.tokenizer,
        pair.eos_token_ids,
        params.step_delimiters,
        stops,
        call_syntax(params.tool_call_markers, params.json_tool_calls),
        params.max_step_tokens,
        params.max_tool_call_tokens,
        prefix,
        single_call,
        params.reasoning_markers,
        thinking and params.reasoning_markers is not None,
    )
    grounding = params.signal_source if params.uses_grounding else None  # the model whose attention is scored
    # the requested layers must exist in the scoring model even when this decision does not read them
    layers = score_layers(pair.target if params.signal_source == "target" else pair.draft, params.score_layers)
    pool = RuntimePool.for_pair(pair)
    runtime = pool.take(params, len(prompt_ids) + budget, params.step_cap + 1, pair.device)
    try:
        gen = Generation(
            pair=pair,
            params=params,
            runtime=runtime,
            out=out,
            ids=list(prompt_ids),
            budget=budget,
            generator=_generator(pair.device, params),
            validate_step=validate_step,
            # only the model that computes the signals is scored, when the decision reads grounding
            draft_layers=layers if grounding == "draft" else (),
            target_layers=layers if grounding == "target" else (),
            agreement=Agreement(cost=runtime.cost),
            calibrator=calibrator if calibrator is not None else threshold_calibrator(params),
        )
        while True:
            # inference mode per step, never across a yield: the consumer may resume us in another thread
            with torch.inference_mode():
                event = gen.step()
            yield event
            if event.finish_reason:
                return
    finally:
        pool.give(runtime)


def warm_up(pair: ModelPair, params: SpecGuardParams, prompt_tokens: int = 64) -> None:
    """Compile and capture the decode iterations a generation with ``params`` runs, before a real call needs them.

    On a GPU with compiled decode this moves the minute or two of compilation out of the first real
    call; the runtime it prepares (caches and graphs) goes back to the pair's pool for the next call.
    """
    pool = RuntimePool.for_pair(pair)
    runtime = pool.take(params, prompt_tokens + params.max_tokens, params.step_cap + 1, pair.device)
    token = next(t for t in range(len(pair.tokenizer)) if t not in pair.eos_token_ids)
    generator = _generator(pair.device, params)
    try:
        with torch.inference_mode():
            draft_temperatures = params.candidate_temperatures
            controls, top = Controls.of(params), (params.top_logprobs or 0) if params.logprobs else 0
            for runner, temps in ((runtime.draft, draft_temperatures), (runtime.target, [params.temperature])):
                runner.prefill([token] * (prompt_tokens - 1), 0)
                seen = torch.zeros(runner.vocab, dtype=torch.bool, device=runner.device)
                seen[token] = True
                runner.start_decode(token, prompt_tokens - 1, temps, controls, seen=seen, top_logprobs=top)
                runner.decode(2, generator)
    finally:
        pool.give(runtime)


def generate(
    pair: ModelPair,
    prompt_ids: Sequence[int],
    params: SpecGuardParams,
    stop: Sequence[str] | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    validate_step: Callable[[str], str | None] | None = None,
    prefix: str = "",
    single_call: bool = False,
    thinking: bool = False,
) -> GenerationResult:
    """Run SpecGuard to the end and return the text, the token ids and every step."""
    started = time.perf_counter()
    steps: list[StepEvent] = []
    for event in generate_steps(pair, prompt_ids, params, stop, validate_step, prefix, single_call, thinking):
        steps.append(event)
        if on_step is not None:
            on_step(event)
    token_ids = [t for s in steps for t in s.token_ids]
    return GenerationResult(
        text="".join(s.text for s in steps),
        token_ids=token_ids,
        prompt_tokens=len(prompt_ids),
        finish_reason=steps[-1].finish_reason or "length" if steps else "length",
        steps=steps,
        seconds=time.perf_counter() - started,
    )
