"""The SpecGuard decoding loop, top to bottom.

One generation is one :class:`~.generation.Generation`: the committed sequence, the output text, the
sampling generator, the agreement estimate, and a :class:`~.runtimes.Runtime` (the draft's and the
target's runners: KV caches, buffers, CUDA graphs) lent by the pair's pool. Each step (:func:`step`) is

1. **propose** (:mod:`.propose`): the draft decodes ``n_candidates`` continuations in one batch on the
   device, reading them back once per chunk; the most consistent one is kept;
2. **verify** (:mod:`.verify`): one target pass over the kept step gives grounding, confidence and the
   verdict, and the target's own tokens for the step;
3. **write** (:mod:`.write`), if rejected: the target keeps the step's tokens it would have written
   itself and continues from the first disagreement, speculating with the draft;
4. **commit** (:mod:`.text`): the step's text, stop sequences, EOS, the budget; a :class:`StepEvent`.

Positions: each runner's ``cache.valid`` counts the positions holding the sequence. A runner's pass sets
it to the end of what it fed (a fact the runner knows); a phase starts by catching up from ``valid`` to
the last committed token, which it feeds again (its logits start the step). What is kept is the loop's
call alone: it rewinds both caches after a rejection and after each commit (``Runtime.rewind``), and
:mod:`.write`'s rounds do the same after each round. The phases report what they learnt (the verdict's
agreement and calibration sample); the loop feeds the estimates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import torch

from .calibration import ThresholdCalibrator
from .events import EVENT_VERSION, GenerationResult, StepEvent, summarize
from .generation import Agreement, Generation
from .loading import ModelPair, decode
from .logprobs import StepLogprobs
from .params import SpecGuardParams
from .propose import propose
from .runtimes import RuntimePool
from .sampling import Controls
from .scoring import GroundingScorer
from .steps import call_syntax
from .text import OutputText
from .verify import verify
from .write import write

__all__ = [
    "EVENT_VERSION",
    "GenerationResult",
    "StepEvent",
    "generate",
    "generate_steps",
    "summarize",
]


# --------------------------------------------------------------------------------------------------
# one generation


def step(gen: Generation) -> StepEvent:
    """One step of the loop: propose, verify, write if rejected, commit; its event."""
    started = time.perf_counter()
    gen.out.begin_step()
    gen.logprobs = StepLogprobs(gen.params.top_logprobs or 0) if gen.params.logprobs else None
    limit = min(gen.params.step_cap, gen.budget - len(gen.out.generated))
    proposal = propose(gen, limit)
    drafted = time.perf_counter()
    verdict = verify(gen, proposal)
    if gen.calibrator is not None and verdict.calibration is not None:
        gen.calibrator.observe(verdict.calibration)
    if verdict.agreement is not None:  # how often the draft agrees sets the speculation length in write
        gen.agreement.observe(*verdict.agreement)
    if not verdict.accepted:  # the caches keep the committed sequence and the step's tokens the target keeps
        gen.runtime.rewind(len(gen.ids) + verdict.agree)
    verified = time.perf_counter()
    tokens, written = proposal.tokens, None
    if not verdict.accepted:
        written = write(gen, proposal.tokens, verdict.agree, verdict.next_token, limit)
        tokens = written.tokens
    wrote = time.perf_counter()
    committed = gen.out.commit(tokens, gen.budget)
    logprobs = gen.logprobs.read(len(committed.tokens)) if gen.logprobs is not None else None
    gen.ids.extend(committed.tokens)
    gen.runtime.rewind(len(gen.ids) - 1)  # the next pass feeds the last committed token again
    event = StepEvent(
        index=gen.index,
        source="draft" if verdict.accepted else "target",
        text=committed.text,
        num_tokens=len(committed.tokens),
        n_candidates=gen.params.n_candidates,
        grounding=verdict.grounding,
        confidence=verdict.confidence,
        score=verdict.score,
        threshold=verdict.threshold,
        accepted=verdict.accepted,
        reason=verdict.reason,
        seconds=time.perf_counter() - started,
        draft_text=decode(gen.pair.tokenizer, proposal.tokens),
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
    gen.index += 1
    return event


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
    grounding: GroundingScorer | None = None,
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

    ``grounding``: a grounding scorer of your own (a subclass studying another attention signal); by default the
    one ``params`` describe (:meth:`GroundingScorer.of`), none when the decision does not read grounding.
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
    described = GroundingScorer.of(pair, params)  # checks the requested layers even when unused
    grounding = grounding if grounding is not None else described
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
            grounding=grounding,
            agreement=Agreement(cost=runtime.cost),
            calibrator=calibrator if calibrator is not None else threshold_calibrator(params),
        )
        while True:
            # inference mode per step, never across a yield: the consumer may resume us in another thread
            with torch.inference_mode():
                event = step(gen)
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
    grounding: GroundingScorer | None = None,
) -> GenerationResult:
    """Run SpecGuard to the end and return the text, the token ids and every step."""
    started = time.perf_counter()
    steps: list[StepEvent] = []
    run = generate_steps(
        pair, prompt_ids, params, stop, validate_step, prefix, single_call, thinking, grounding=grounding
    )
    for event in run:
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
