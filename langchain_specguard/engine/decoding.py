"""The SpecGuard decoding loop, top to bottom, for a batch of generations.

A generation is one call's :class:`~.generation.Generation`: its committed sequence, output text, sampling
generator and agreement rate. Concurrent calls on one pair decode together (:mod:`.scheduler`); each step of a
batch (:func:`step`) is

1. **propose** (:mod:`.propose`): the draft decodes ``n_candidates`` continuations for every generation in one
   batched loop on the device, reading them back once per chunk; each generation keeps its most consistent one;
2. **verify** (:mod:`.verify`): one target pass over every kept step gives the signals and, by the step rule,
   the verdicts, and for each rejected step the target's own tokens;
3. **write** (:mod:`.write`), for the rejected steps: the target keeps the tokens it would have written itself
   and continues from the first disagreement, in batched rounds speculating with the draft;
4. **commit** (:mod:`.text`), per generation: the step's text, stop sequences, EOS, the budget; a
   :class:`StepEvent`.

With a served target (``Runtime.served``) steps 2 and 3 are requests to its server (:mod:`.served_steps`), decided
by the same rules; proposing and committing are the same code.

Positions: each runner's ``cache.valid`` counts, per row, the positions holding that row's sequence. A runner's
pass sets it to the end of what the row fed (a fact the runner knows); a phase starts by catching each row up
from ``valid`` to the last committed token, which it feeds again (its logits start the step). What is kept is the
loop's call alone: it rewinds a generation's caches after a rejection and after each commit
(``Runtime.rewind``), and :mod:`.write`'s rounds do the same after each round. The phases report what they
learnt (the verdict's agreement and calibration sample); the loop feeds the estimates.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

from .calibration import ThresholdCalibrator
from .events import EVENT_VERSION, GenerationResult, StepEvent, summarize
from .generation import AgreementRate, Generation, seeded_generator
from .grammar import GrammarState
from .loading import ModelPair, decode, progress
from .options import CallOptions
from .params import SpecGuardParams
from .propose import Proposal, propose
from .runtimes import Runtime, RuntimePool
from .scheduler import Scheduler, StepResults, Ticket, batch_key, overdue
from .scoring import GroundingScorer
from .served_steps import check_served_params, verify_served, write_served
from .text import OutputText
from .verify import Verdict, verify
from .write import Rejected, Written, write

__all__ = [
    "EVENT_VERSION",
    "CallOptions",
    "GenerationResult",
    "StepEvent",
    "generate",
    "generate_steps",
    "summarize",
]


# --------------------------------------------------------------------------------------------------
# one step of a batch


def step(runtime: Runtime, gens: list[Generation]) -> StepResults:
    """One step for every generation given (a batch's, in slot order): propose, verify, write the rejected ones,
    commit; their events."""
    started = time.perf_counter()
    for gen in gens:
        gen.begin_step()
    proposals = propose(runtime, gens)
    drafted = time.perf_counter()
    served = runtime.served is not None
    verdicts = (verify_served if served else verify)(runtime, live(gens), proposals)
    for gen in live(gens):
        learn(gen, verdicts[gen.slot])
        if not verdicts[gen.slot].accepted:  # the caches keep the committed sequence and the step's kept tokens
            runtime.rewind(gen.slot, len(gen.ids) + verdicts[gen.slot].kept)
    verified = time.perf_counter()
    rejected = [
        Rejected(gen=g, proposed=proposals[g.slot].tokens, kept=verdicts[g.slot].kept,
                 next_token=verdicts[g.slot].next_token)
        for g in live(gens) if not verdicts[g.slot].accepted
    ]  # fmt: skip
    written = (write_served if served else write)(runtime, rejected) if rejected else {}
    wrote = time.perf_counter()
    results: list[tuple[Generation, StepEvent | BaseException]] = []
    for gen in gens:
        if gen.halted:
            results.append((gen, overdue(gen)))
            continue
        timing = (started, drafted, verified, wrote)
        event = commit(runtime, gen, proposals[gen.slot], verdicts[gen.slot], written.get(gen.slot), timing)
        results.append((gen, event))
    return results


def live(gens: Sequence[Generation]) -> list[Generation]:
    """The generations still in this step (not past their deadline, not failed)."""
    return [g for g in gens if not g.halted]


def learn(gen: Generation, verdict: Verdict) -> None:
    """What a verification teaches the generation: the "auto" threshold's sample, how often its draft agrees."""
    if gen.calibrator is not None and verdict.calibration is not None:
        gen.calibrator.observe(verdict.calibration)
    if verdict.agreement_seen is not None:  # how often the draft agrees sets the speculation length in write
        gen.agreement.observe(*verdict.agreement_seen)


def commit(
    runtime: Runtime,
    gen: Generation,
    proposal: Proposal,
    verdict: Verdict,
    written: Written | None,
    timing: tuple[float, float, float, float],
) -> StepEvent:
    """Add the step to the generation's output and sequence; the caches keep all of it but its last token."""
    started, drafted, verified, wrote = timing
    tokens = proposal.tokens if verdict.accepted or written is None else written.tokens
    committed = gen.out.commit(tokens, gen.budget)
    logprobs = gen.logprobs.read(len(committed.tokens)) if gen.logprobs is not None else None
    gen.ids.extend(committed.tokens)
    if gen.grammar is not None:
        gen.grammar.commit(committed.tokens)
    runtime.rewind(gen.slot, len(gen.ids) - 1)  # the next pass feeds the last committed token again
    event = StepEvent(
        index=gen.index,
        source="draft" if verdict.accepted else "target",
        text=committed.text,
        num_tokens=len(committed.tokens),
        n_candidates=gen.params.candidates,
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
        kept_tokens=0 if verdict.accepted else min(verdict.kept, len(committed.tokens)),
        speculated_tokens=written.speculated if written else 0,
        logprobs=logprobs,
        call_candidates=proposal.call_candidates,
        valid_call_candidates=proposal.valid_call_candidates,
    )
    gen.index += 1
    return event


# --------------------------------------------------------------------------------------------------
# calls


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


_SCHEDULERS_LOCK = threading.Lock()


def scheduler_of(pair: ModelPair) -> Scheduler:
    """The pair's scheduler (one per loaded pair, shared by every call and every copy of a model sharing it)."""
    pool = RuntimePool.for_pair(pair)
    with _SCHEDULERS_LOCK:
        if not isinstance(pool.scheduler, Scheduler):
            pool.scheduler = Scheduler(pool, pair.device, step)
        return pool.scheduler


def new_generation(
    pair: ModelPair, prompt_ids: Sequence[int], params: SpecGuardParams, options: CallOptions
) -> tuple[Generation, Ticket]:
    """A call's generation, checked and ready to join a batch (every mistake in the call is raised here, in the
    caller's thread, before anything runs)."""
    check_prompt(pair, prompt_ids)
    params = params.on_device(pair.device)  # the defaults that depend on the device (n_candidates)
    if params.max_tokens > pair.context_window:
        # a cap the model can never reach is a configuration mistake; a cap that only this prompt
        # leaves no room for is clipped below (finish_reason "length"), as Hugging Face generate does
        raise ValueError(
            f"max_tokens is {params.max_tokens} but the model's context window is {pair.context_window} tokens "
            f"(prompt and output together): set max_tokens to at most {pair.context_window}"
        )
    budget = min(params.max_tokens, pair.context_window - len(prompt_ids))
    if pair.served is not None:
        check_served_params(params, pair.served.url)
        if options.grounding is not None and options.grounding.source == "target":
            raise ValueError(f"a grounding scorer of the target's attention needs a local target, not {pair.served}")
    grammar = constrained(pair, params, options)
    described = GroundingScorer.of(pair, params)  # checks the requested layers even when unused
    grounding = options.grounding if options.grounding is not None else described
    pool = RuntimePool.for_pair(pair)
    # a grammar masks the draft's logits by token id: its draft keeps the whole head (draft_vocab's subset is columns)
    drafting = params if grammar is None else params.model_copy(update={"draft_vocab": None})
    shape = pool.shape(drafting, len(prompt_ids) + budget, min(params.step_cap, budget), pair.device)
    gen = Generation(
        pair=pair,
        params=params,
        options=options,
        out=OutputText(pair.tokenizer, pair.eos_token_ids, params, options),
        ids=list(prompt_ids),
        budget=budget,
        rng=seeded_generator(pair.device, params),
        grounding=grounding,
        agreement=AgreementRate(cost=pool.cost_of(shape), token_cost=pool.token_cost),
        calibrator=options.calibrator if options.calibrator is not None else threshold_calibrator(params),
        deadline=time.monotonic() + options.timeout if options.timeout is not None else None,
        grammar=grammar,
    )
    return gen, Ticket(gen, batch_key(gen, shape), shape)


def constrained(pair: ModelPair, params: SpecGuardParams, options: CallOptions) -> GrammarState | None:
    """The generation's grammar state, when its call has a grammar; the mistakes of such a call raised here."""
    if options.grammar is None:
        return None
    if pair.served is not None:
        raise ValueError(
            f"{options.grammar.name} needs a local target: the target served at {pair.served.url} chooses its tokens "
            "without the grammar's mask"
        )
    if options.thinking and params.reasoning_markers is not None:
        raise ValueError(
            f"{options.grammar.name} constrains the whole output, but the prompt opened a think block "
            f"({params.reasoning_markers[0]}): turn thinking off for this call (reasoning=False)"
        )
    return GrammarState(options.grammar, pair.tokenizer, pair.eos_token_ids)


def generate_steps(
    pair: ModelPair, prompt_ids: Sequence[int], params: SpecGuardParams, options: CallOptions | None = None
) -> Iterator[StepEvent]:
    """Run SpecGuard on ``prompt_ids`` and yield each step as soon as it is verified.

    The generation joins the pair's running batch (concurrent calls share their passes) and its text is what it
    would be alone. With ``params.tool_call_markers`` set, a tool call is one step from its opening to its closing
    marker: it never ends at a CoT delimiter, and a text step that runs into an opening marker is cut just before
    it, so the call starts a step of its own. With ``params.json_tool_calls`` set, each bare JSON call that opens
    the answer (:func:`~.steps.json_region`) is one step from its ``{`` to the brace that balances it. With
    ``params.reasoning_markers`` set, a think block that opens the output is stepped like any chain of thought,
    its closing marker ends a step so the answer starts a new one, its steps have ``kind="reasoning"``, and
    tool-call rules apply only after it. ``options``: the call's stops, step check, answer prefix, deadline...
    (:class:`~.options.CallOptions`).

    Closing the iterator early (a stream stopped, a cancelled task) takes the generation out of its batch at the
    next step boundary.
    """
    _, ticket = new_generation(pair, prompt_ids, params, options or CallOptions())
    scheduler_of(pair).submit(ticket)
    try:
        while True:
            item = ticket.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason:
                return
    finally:
        ticket.cancel()


def prepare(pair: ModelPair, params: SpecGuardParams) -> None:
    """Build now what a first call with ``params`` would otherwise build before its first token: the pair's runtime
    pool and the draft's view for the call's shape (on a CPU, its int8 layers and frequent-token head: about a
    second for the embedded Gemma, more for larger drafts). Nothing is decoded; later calls find them built."""
    params = params.on_device(pair.device)
    pool = RuntimePool.for_pair(pair)
    shape = pool.shape(params, 1, min(params.step_cap, params.max_tokens), pair.device)
    with progress("preparing the draft for this device"):
        pool.draft_view_for(shape.head, shape.int8)


def warm_up(
    pair: ModelPair, params: SpecGuardParams, prompt_tokens: int = 64, batch_sizes: Sequence[int] = (1,)
) -> None:
    """Compile and capture what generations with ``params`` run, at each of ``batch_sizes`` concurrent calls, before a
    real call needs it.

    On a GPU with compiled decode this moves the minute or two of compilation out of the first real call; the
    runtime it prepares (caches and graphs) goes back to the pair's pool for the next calls.
    """
    token = next(t for t in range(len(pair.tokenizer)) if t not in pair.eos_token_ids)
    for size in batch_sizes:
        runs = [generate_steps(pair, [token] * prompt_tokens, params) for _ in range(size)]
        threads = [threading.Thread(target=lambda r=run: [None for _ in r]) for run in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def generate(
    pair: ModelPair,
    prompt_ids: Sequence[int],
    params: SpecGuardParams,
    options: CallOptions | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
) -> GenerationResult:
    """Run SpecGuard to the end and return the text, the token ids and every step."""
    started = time.perf_counter()
    steps: list[StepEvent] = []
    for event in generate_steps(pair, prompt_ids, params, options):
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
