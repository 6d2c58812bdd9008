"""The SpecGuard decoding loop, top to bottom.

Per step: the draft samples ``n_candidates`` continuations in one batch from its cache (forked from
the shared prefix), the most consistent candidate is kept, scored by grounding and confidence, and
either committed or thrown away in favour of a step the target writes itself.

Cache invariant between steps, for each model: its cache holds at most ``len(ids) - 1`` positions,
so the next forward pass feeds ``ids[cache_len:]`` (at least the last committed token) and its last
logits predict the next token. The draft's cache is always at ``len(ids) - 1``; the target's lags
behind while ``signal_source="draft"`` steps are accepted and catches up in one parallel pass when
it next has to write a step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache

from .attention import AttentionRecord, capture, decoder_layers, instrument
from .cache import cache_len, fork, is_static, keep_row, new_cache, truncate
from .loading import ModelPair, decode, model_device
from .params import SpecGuardParams
from .signals import combine_scores, confidence_score, grounding_score, select_consistent
from .steps import (
    find_stop,
    is_tool_call_step,
    marker_split,
    new_text,
    open_call_start,
    step_complete,
    tool_step_complete,
)

EVENT_VERSION = 2


@dataclass
class StepEvent:
    """What happened to one step: who wrote it, how the kept draft candidate scored, how long it took."""

    index: int
    source: Literal["draft", "target"]
    text: str
    num_tokens: int
    n_candidates: int
    grounding: float
    confidence: float
    score: float
    threshold: float
    accepted: bool
    reason: str  # "accepted", or why the draft step was rejected: "score" or "schema" (a bad tool call)
    seconds: float
    draft_text: str
    drafted_tokens: int  # tokens the draft sampled this step, all candidates together
    target_forwards: int
    finish_reason: str | None = None  # "stop" (EOS or stop sequence), "length", or None
    token_ids: list[int] = field(default_factory=list)
    kind: Literal["text", "tool_call"] = "text"  # a tool call is one step, opening to closing marker
    detail: str | None = None  # with reason "schema": what was wrong with the draft's tool call
    version: int = EVENT_VERSION
    # where ``seconds`` went: drafting the candidates, scoring the kept one (selection, signals and
    # the target's verification pass), and the target writing a rejected step; the rest is detokenizing
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    target_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("grounding", "confidence", "score"):
            if isinstance(data[key], float) and math.isnan(data[key]):
                data[key] = None
        return data


@dataclass
class GenerationResult:
    """The whole output of one call plus its per-step record and summary."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    steps: list[StepEvent]
    seconds: float

    @property
    def summary(self) -> dict[str, Any]:
        return summarize(self.steps, self.seconds, self.prompt_tokens)


def summarize(steps: Sequence[StepEvent], seconds: float, prompt_tokens: int) -> dict[str, Any]:
    accepted = sum(s.accepted for s in steps)
    return {
        "version": EVENT_VERSION,
        "steps": len(steps),
        "num_steps": len(steps),
        "accepted_steps": accepted,
        "accepted_share": accepted / len(steps) if steps else 0.0,
        "prompt_tokens": prompt_tokens,
        "output_tokens": sum(s.num_tokens for s in steps),
        "draft_tokens": sum(s.num_tokens for s in steps if s.source == "draft"),
        "target_tokens": sum(s.num_tokens for s in steps if s.source == "target"),
        "drafted_tokens": sum(s.drafted_tokens for s in steps),
        "target_forwards": sum(s.target_forwards for s in steps),
        "draft_seconds": sum(s.draft_seconds for s in steps),
        "verify_seconds": sum(s.verify_seconds for s in steps),
        "target_seconds": sum(s.target_seconds for s in steps),
        "seconds": seconds,
    }


# --------------------------------------------------------------------------------------------------
# small pieces


def score_layers(model: PreTrainedModel, requested: Sequence[int] | None) -> tuple[int, ...]:
    """The layers whose attention is scored: the requested ones, or the last third."""
    n = len(decoder_layers(model))
    if requested is None:
        return tuple(range(n - max(1, n // 3), n))
    bad = [i for i in requested if not -n <= i < n]
    if bad or not requested:
        raise ValueError(
            f"score_layers must be non-empty indices in [-{n}, {n - 1}] for this model, got {list(requested)}"
        )
    return tuple(sorted({i % n for i in requested}))


def _forward(model: Any, cache: Cache, tokens: torch.Tensor, keep: int = 1) -> torch.Tensor:
    """Logits of the last ``keep`` positions, ``[B, keep, V]``, extending ``cache`` with ``tokens``."""
    out = model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=keep)
    return out.logits[:, -keep:, :]


def _decoder(pair: ModelPair, model: PreTrainedModel, compiled: bool) -> Any:
    """The callable for single-token decode: the model, or its CUDA-graphed compile (made once per pair)."""
    if not compiled:
        return model
    key = ("compiled", id(model))
    if key not in pair.extra:
        pair.extra[key] = torch.compile(model, mode="reduce-overhead", dynamic=False)
    return pair.extra[key]


def _take_caches(
    pair: ModelPair, params: SpecGuardParams, budget: int, prompt_len: int
) -> tuple[Cache, Cache, Callable[[], None]]:
    """Caches for one generation and the function that gives them back.

    Dynamic caches are made fresh. Static ones come from a pool kept on the pair: reusing the same
    tensors keeps their addresses, which is what lets CUDA graphs replay instead of re-recording; a
    generation that runs while another holds the pooled pair gets its own.
    """
    if params.cache_implementation == "dynamic":
        return DynamicCache(), DynamicCache(), lambda: None
    need = prompt_len + budget + 1
    pool: list[tuple[int, Cache, Cache]] = pair.extra.setdefault(("static", params.n_candidates), [])
    entry = next((e for e in pool if e[0] >= need), None)
    if entry is not None:
        pool.remove(entry)
    else:
        size = max(need, min(pair.context_window, 4096))
        entry = (size, new_cache(pair.draft, True, size), new_cache(pair.target, True, size))
    _, draft_cache, target_cache = entry
    with torch.inference_mode():  # the cache tensors were made inside inference mode
        truncate(draft_cache, 0)
        truncate(target_cache, 0)
    return draft_cache, target_cache, lambda: pool.append(entry)


def _sample(
    logits: torch.Tensor, temperature: float | torch.Tensor, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row; ``temperature`` is a float or a ``[B]`` tensor, 0 meaning argmax."""
    temps = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).expand(logits.shape[0])
    greedy = logits.argmax(dim=-1)
    if bool((temps == 0).all()):
        return greedy
    scaled = logits.float() / temps.clamp_min(1e-5)[:, None]
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.where(temps == 0, greedy, sampled)


@dataclass
class _Decoded:
    """Sequences sampled in one batch from a shared prefix, each ended at its own step boundary."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    record: AttentionRecord | None
    forwards: int


def _decode_step(
    model: PreTrainedModel,
    cache: Cache,
    ids: list[int],
    *,
    batch: int,
    limit: int,
    temperatures: list[float],
    top_p: float,
    generator: torch.Generator | None,
    is_boundary: Callable[[list[int]], bool],
    eos: frozenset[int],
    layers: tuple[int, ...] | None,
    step_model: Any = None,
) -> _Decoded:
    """Catch ``cache`` up with ``ids``, fork it ``batch`` ways and decode until every row ends its step.

    ``step_model`` runs the single-token passes (e.g. a CUDA-graphed compile of ``model``); it is
    ignored while attention is captured, which only the eager model can do.
    """
    device = model_device(model)
    step_model = model if step_model is None or layers else step_model
    feed = torch.tensor([ids[cache_len(cache) :]], device=device)
    if is_static(cache):  # fixed batch: the shared prefix goes to every row
        feed = feed.expand(batch, -1)
    ctx = capture(model, layers, len(ids)) if layers else contextlib.nullcontext()
    temps = torch.tensor(temperatures, device=device)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    logprobs: list[list[float]] = [[] for _ in range(batch)]
    done = [False] * batch
    forwards = 1
    with ctx as record:
        logits = _forward(model, cache, feed)[:, -1].to(device)  # a sharded model's logits: last GPU
        fork(cache, batch)
        logits = logits.expand(batch, -1)
        for i in range(limit):
            nxt = _sample(logits, temps, top_p, generator)
            lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, nxt[:, None]).squeeze(-1)
            for row, (tok, tok_lp) in enumerate(zip(nxt.tolist(), lp.tolist(), strict=True)):
                if done[row]:
                    continue
                tokens[row].append(tok)
                logprobs[row].append(tok_lp)
                done[row] = tok in eos or is_boundary(tokens[row])
            if all(done) or i == limit - 1:
                break
            logits = _forward(step_model, cache, nxt[:, None])[:, -1].to(device)
            forwards += 1
    return _Decoded(tokens, logprobs, record if layers else None, forwards)


def _signals(
    record: AttentionRecord, row: int, batch: int, k: int, logprobs: Sequence[float], params: SpecGuardParams
) -> tuple[float, float]:
    sink, ctx, step = record.stacked(batch)
    grounding = grounding_score(sink[:, row, :k], ctx[:, row, :k], step[:, row, :k, :k], params.grounding_method)
    confidence = confidence_score(torch.tensor(logprobs))
    return grounding, confidence


def _verify_with_target(
    pair: ModelPair,
    cache: Cache,
    ids: list[int],
    step: list[int],
    layers: tuple[int, ...],
    params: SpecGuardParams,
) -> tuple[float, float]:
    """One parallel target pass over the step: target-side signals, and the target's cache filled."""
    device = pair.device
    k = len(step)
    feed = torch.tensor([ids[cache_len(cache) :] + step[:-1]], device=device)
    with capture(pair.target, layers, len(ids)) as record:
        logits = _forward(pair.target, cache, feed, keep=k)[0].to(device)
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, torch.tensor(step, device=device)[:, None]).squeeze(-1)
    return _signals(record, 0, 1, k, lp.tolist(), params)


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop sequence."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return hold


# --------------------------------------------------------------------------------------------------
# the loop


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
) -> Iterator[StepEvent]:
    """Run SpecGuard on ``prompt_ids`` and yield each step as soon as it is verified.

    With ``params.tool_call_markers`` set, a tool call is one step from its opening to its closing
    marker: it never ends at a CoT delimiter, and a text step that runs into an opening marker is cut
    just before it, so the call starts a step of its own. ``validate_step`` (the text of a finished
    draft tool call in, a rejection reason or None out) then rejects a bad draft call whatever its
    score, and the target writes that step instead (``reason="schema"``). ``prefix`` is assistant
    text already rendered at the end of the prompt (e.g. a forced ``<tool_call>``): it counts when
    deciding whether a call is open, and is not part of the yielded text.
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
    generator = _generator(pair.device, params.seed)
    instrument(pair.draft, score_layers(pair.draft, params.score_layers))
    instrument(pair.target, score_layers(pair.target, params.score_layers))
    ids = list(prompt_ids)
    draft_cache, target_cache, release = _take_caches(pair, params, budget, len(prompt_ids))
    try:
        yield from _steps(pair, params, ids, stops, budget, draft_cache, target_cache, generator, validate_step, prefix)
    finally:
        release()


def _steps(
    pair: ModelPair,
    params: SpecGuardParams,
    ids: list[int],
    stops: list[str],
    budget: int,
    draft_cache: Cache,
    target_cache: Cache,
    generator: torch.Generator,
    validate_step: Callable[[str], str | None] | None,
    prefix: str,
) -> Iterator[StepEvent]:
    """The step loop proper: run steps until EOS, a stop sequence or the budget; keep the text exact."""
    tokenizer, eos = pair.tokenizer, pair.eos_token_ids
    delimiters = list(params.step_delimiters) + stops
    max_stop = max((len(s) for s in stops), default=0)
    markers = params.tool_call_markers
    step_cap = max(params.max_step_tokens, params.max_tool_call_tokens) if markers else params.max_step_tokens

    generated: list[int] = []
    full_text = ""  # decode(generated)
    emitted = 0  # characters of full_text already handed out in steps

    def tail() -> str:
        return full_text[-max_stop:] if max_stop else ""

    continues = False  # the step starts inside a tool call left open by the previous step

    def is_boundary(step_tokens: list[int]) -> bool:
        text = decode(tokenizer, step_tokens)
        if stops and find_stop(tail() + text, stops) is not None:
            return True
        if markers is not None:
            if is_tool_call_step(text, markers, continues):
                return tool_step_complete(text, markers, continues) or len(step_tokens) >= params.max_tool_call_tokens
            if len(step_tokens) >= params.max_step_tokens or markers[0] in text:
                return True  # a text step that ran into a call ends there (and is cut before it below)
        return step_complete(text, delimiters)

    def step_text(step_tokens: list[int]) -> str:
        return new_text(full_text, decode(tokenizer, generated + step_tokens))

    def check_call(step_tokens: list[int]) -> str | None:
        """Why a finished draft tool-call step is unacceptable, or None (also for non-call steps)."""
        if validate_step is None or markers is None or not step_tokens:
            return None
        text = step_text(step_tokens)
        if not is_tool_call_step(text, markers, continues):
            return None
        if not tool_step_complete(text, markers, continues) and step_tokens[-1] not in eos:
            return None  # cut by the token cap: judged at the step that closes it
        context = prefix + full_text
        start = open_call_start(context, markers)
        call = (context[start:] if continues and start is not None else "") + text.lstrip()
        return validate_step(call)

    index = 0
    while len(generated) < budget:
        started = time.perf_counter()
        continues = open_call_start(prefix + full_text, markers) is not None
        limit = min(step_cap, budget - len(generated))
        # inference mode per step, never across a yield: the consumer may resume us in another thread
        with torch.inference_mode():
            verdict = _one_step(pair, params, ids, draft_cache, target_cache, limit, generator, is_boundary, check_call)
        step = verdict.tokens
        kind: Literal["text", "tool_call"] = "text"
        if markers is not None:
            text = step_text(step)
            if is_tool_call_step(text, markers, continues):
                kind = "tool_call"
            else:
                at = marker_split(text, markers)
                keep = _token_cut(tokenizer, generated, step, len(full_text), at) if at is not None else 0
                if keep > 0:
                    step = step[:keep]
        ids.extend(step)
        generated.extend(step)
        # a cut step leaves both caches ahead of ids: bring them back to the invariant
        truncate(draft_cache, len(ids) - 1)
        truncate(target_cache, len(ids) - 1)
        previous = full_text
        full_text = decode(tokenizer, generated)
        finish: str | None = None
        cut = find_stop(full_text, stops, max(0, len(previous) - max_stop)) if stops else None
        if cut is not None:
            full_text = full_text[:cut]
            finish = "stop"
        elif step[-1] in eos:
            finish = "stop"
        elif len(generated) >= budget:
            finish = "length"
        upto = len(full_text) if finish else len(full_text) - _held_back(full_text, stops)
        text = new_text(full_text[:emitted], full_text[:upto]) if upto >= emitted else ""
        emitted = max(emitted, upto)
        yield StepEvent(
            index=index,
            source=verdict.source,
            text=text,
            num_tokens=len(step),
            n_candidates=params.n_candidates,
            grounding=verdict.grounding,
            confidence=verdict.confidence,
            score=verdict.score,
            threshold=params.acceptance_threshold,
            accepted=verdict.accepted,
            reason=verdict.reason,
            seconds=time.perf_counter() - started,
            draft_text=verdict.draft_text,
            drafted_tokens=verdict.drafted_tokens,
            target_forwards=verdict.target_forwards,
            draft_seconds=verdict.draft_seconds,
            verify_seconds=verdict.verify_seconds,
            target_seconds=verdict.target_seconds,
            finish_reason=finish,
            token_ids=list(step),
            kind=kind,
            detail=verdict.detail,
        )
        index += 1
        if finish:
            return


@dataclass
class _Verdict:
    tokens: list[int]
    source: Literal["draft", "target"]
    grounding: float
    confidence: float
    score: float
    accepted: bool
    draft_text: str
    drafted_tokens: int
    target_forwards: int
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    target_seconds: float = 0.0
    reason: str = "accepted"
    detail: str | None = None


def _token_cut(tokenizer: Any, generated: list[int], step: list[int], base: int, at: int) -> int:
    """Number of leading ``step`` tokens whose text ends at or before character ``at`` of the step."""
    for j in range(1, len(step) + 1):
        if len(decode(tokenizer, generated + step[:j])) - base > at:
            return j - 1
    return len(step)


def _one_step(
    pair: ModelPair,
    params: SpecGuardParams,
    ids: list[int],
    draft_cache: Cache,
    target_cache: Cache,
    limit: int,
    generator: torch.Generator,
    is_boundary: Callable[[list[int]], bool],
    check_call: Callable[[list[int]], str | None] | None = None,
) -> _Verdict:
    """Draft, select, verify and, if rejected, let the target write: one step, caches kept in step."""
    n, eos = params.n_candidates, pair.eos_token_ids
    use_target_signals = params.signal_source == "target"
    draft_layers = score_layers(pair.draft, params.score_layers)
    target_layers = score_layers(pair.target, params.score_layers)
    # greedy calls keep one greedy candidate and sample the others for the consistency vote
    temps = [0.0] + [params.candidate_temperature] * (n - 1) if params.temperature == 0 else [params.temperature] * n
    context_len = len(ids)
    started = time.perf_counter()  # phases end in a host read of tokens or scores, so no extra syncs

    # 1. draft: n candidates in one batch, from the draft's cache
    drafted = _decode_step(
        pair.draft,
        draft_cache,
        ids,
        batch=n,
        limit=limit,
        temperatures=temps,
        top_p=params.top_p,
        generator=generator,
        is_boundary=is_boundary,
        eos=eos,
        layers=None if use_target_signals else draft_layers,
        step_model=_decoder(pair, pair.draft, params.compile_decode),
    )
    drafted_at = time.perf_counter()
    # 2. consistency selection
    best = select_consistent(drafted.tokens)
    step = drafted.tokens[best]
    keep_row(draft_cache, best, n)
    # 3. verification signals
    target_forwards = 0
    if use_target_signals:
        grounding, confidence = _verify_with_target(pair, target_cache, ids, step, target_layers, params)
        target_forwards = 1
    else:
        assert drafted.record is not None
        grounding, confidence = _signals(drafted.record, best, n, len(step), drafted.logprobs[best], params)
    # 4. ensemble decision
    score = combine_scores(grounding, confidence, params.decision, params.grounding_weight)
    accepted = params.acceptance_threshold < 0 or score >= params.acceptance_threshold
    # a draft tool call that is not valid JSON, names an unbound tool or breaks its schema is
    # rejected whatever its score: the scores judge reasoning, not whether a call can run
    problem = check_call(step) if check_call is not None else None
    reason = "schema" if problem is not None else "accepted" if accepted else "score"
    accepted = accepted and problem is None
    verdict = _Verdict(
        tokens=step,
        source="draft",
        grounding=grounding,
        confidence=confidence,
        score=score,
        accepted=accepted,
        draft_text=decode(pair.tokenizer, step),
        drafted_tokens=sum(len(t) for t in drafted.tokens),
        target_forwards=target_forwards,
        draft_seconds=drafted_at - started,
        verify_seconds=time.perf_counter() - drafted_at,
        reason=reason,
        detail=problem,
    )
    if accepted:
        truncate(draft_cache, context_len + len(step) - 1)
        return verdict
    # 5. fallback: the target writes the step from its own cache
    truncate(draft_cache, context_len - 1)
    truncate(target_cache, context_len - 1)
    written = _decode_step(
        pair.target,
        target_cache,
        ids,
        batch=1,
        limit=limit,
        temperatures=[params.temperature],
        top_p=params.top_p,
        generator=generator,
        is_boundary=is_boundary,
        eos=eos,
        layers=None,
        step_model=_decoder(pair, pair.target, params.compile_decode),
    )
    verdict.tokens = written.tokens[0]
    verdict.source = "target"
    verdict.target_forwards += written.forwards
    verdict.target_seconds = time.perf_counter() - started - verdict.draft_seconds - verdict.verify_seconds
    return verdict


def generate(
    pair: ModelPair,
    prompt_ids: Sequence[int],
    params: SpecGuardParams,
    stop: Sequence[str] | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    validate_step: Callable[[str], str | None] | None = None,
    prefix: str = "",
) -> GenerationResult:
    """Run SpecGuard to the end and return the text, the token ids and every step."""
    started = time.perf_counter()
    steps: list[StepEvent] = []
    for event in generate_steps(pair, prompt_ids, params, stop, validate_step, prefix):
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
