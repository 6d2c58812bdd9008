"""Step-level tracing for ``ChatSpecGuard``: the event schema, how steps reach traces, and a stats handler.

Every call of a ``ChatSpecGuard`` reports which steps the draft wrote, which the target had to take
over, and why, in five places that carry the same data:

* **Callback custom events** (``on_custom_event``), attributed to the chat-model run: one
  ``specguard_step`` per step, in step order, each sent before the chunk that carries the step's
  text, then one ``specguard_summary`` per call. ``astream_events(version="v2")`` shows them as
  ``on_custom_event``.
* **The LangSmith run**. LangChain's ``LangChainTracer`` ignores custom events, so the same two
  events are also appended to the traced chat-model run's ``events`` list (``{"name": ...,
  "time": ..., "kwargs": <data>}``), which LangSmith stores and shows with the run. The summary is
  also in the run's outputs (``response_metadata["specguard"]``), and the run's metadata names the
  pair and the configuration (``specguard_target``, ``specguard_draft``, ``acceptance_threshold``,
  ``signal_source``, ``n_candidates``, ...).
* **Child runs**, with ``trace_steps="runs"``: each step is also a ``chain`` run named
  ``specguard_step`` under the chat-model run, opened when the step starts and closed with the step
  event as its outputs, so the trace is a tree with per-step latency.
* **LangGraph's custom stream**: called inside a LangGraph node (or ``@task``), each step event is also
  written with ``get_stream_writer()`` as ``{"specguard_step": <event>}`` as the step is verified, and
  the summary as ``{"specguard_summary": <summary>}``, so ``graph.stream(..., stream_mode="custom")``
  (or ``astream``) yields them in step order; ``stream_mode=["messages", "custom"]`` interleaves them
  with the step chunks. Outside a graph nothing is written.
* **The message**, with ``return_step_details=True``: ``response_metadata["specguard"]["step_events"]`` is
  the list of step events (on the last chunk when streaming), so the record survives without any
  callback.

``specguard_step`` (``StepEvent.to_dict()``, schema version 4: ``EVENT_VERSION``)
    ``version`` (int), ``index`` (0-based step number in the call), ``source`` (``"draft"`` or
    ``"target"``: who wrote the committed step), ``accepted`` (the draft step passed; equals
    ``source == "draft"``), ``reason`` (``"accepted"`` or why the draft step was rejected:
    ``"score"``, or ``"schema"`` for a draft tool call that failed to parse or validate), ``kind``
    (``"text"``, ``"tool_call"``, or ``"reasoning"`` for a step of a reasoning model's think block, the
    one holding the closing marker included; version 4 added it), ``detail`` (the validator's message, if
    any), ``grounding``, ``confidence``, ``score`` (the kept draft candidate's attention
    grounding, log-prob confidence and the score the decision compares, in [0, 1]; ``null`` if not
    computed: grounding only when the decision reads it and the step has two tokens or more),
    ``threshold`` (the acceptance threshold in force), ``text`` (the text this step added to the
    answer; may be empty while a possible stop sequence is held back), ``num_tokens`` and
    ``token_ids`` (the committed step), ``draft_text`` (the draft's proposal, also when rejected),
    ``n_candidates``, ``drafted_tokens`` (candidate positions the draft computed, every row and iteration),
    ``target_forwards`` (target forward passes this step), ``finish_reason`` (``"stop"``,
    ``"length"``, or ``null`` before the last step), ``seconds`` (wall time of the step) split into
    ``draft_seconds``, ``verify_seconds`` and ``target_seconds`` (drafting, scoring, the target's
    rewrite; the remainder is detokenizing), ``kept_tokens`` (of a rejected step, the draft's leading
    tokens the target would have written itself and kept), ``speculated_tokens`` (draft tokens the
    target accepted while writing the rest), and, with tools bound, ``call_candidates`` (draft
    candidates that finished a tool call, each schema-checked) and ``valid_call_candidates`` (those
    whose call fits the bound tools; a broken call never wins the candidate vote over one that fits).

``specguard_summary`` (``engine.events.summarize``, schema version 4)
    ``version``, ``num_steps`` (also as ``steps``), ``accepted_steps``, ``accepted_share``,
    ``prompt_tokens``, ``output_tokens``, ``draft_tokens`` / ``target_tokens`` (output tokens each
    model wrote), ``reasoning_tokens`` (output tokens of ``"reasoning"`` steps), ``kept_tokens``,
    ``speculated_tokens``, ``drafted_tokens``, ``target_forwards``,
    ``draft_seconds`` / ``verify_seconds`` / ``target_seconds`` (where the step time went), ``seconds``
    (sum of step times).
    In ``response_metadata["specguard"]`` the same dict is stored (``steps`` is always the count); with
    ``return_step_details`` a ``step_events`` key holds the list of step events as well.

A step's token log-probabilities (``logprobs=True``) are not in the event: they are the message's
``response_metadata["logprobs"]`` (on each step's chunk when streaming).

Consumers should read ``version`` and ignore keys they do not know: new keys may be added without a
version change; a change in the meaning of a key bumps it.

``SpecGuardCallbackHandler`` collects these events across calls, threads and tasks and turns them
into records, totals and a plot.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextvars import ContextVar
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

from langchain_core.callbacks import (
    AsyncCallbackHandler,
    AsyncCallbackManager,
    AsyncCallbackManagerForChainRun,
    AsyncCallbackManagerForLLMRun,
    BaseCallbackHandler,
    CallbackManager,
    CallbackManagerForChainRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, BaseLanguageModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessageChunk
from langchain_core.runnables import RunnableConfig, ensure_config
from langchain_core.tracers.base import AsyncBaseTracer, BaseTracer
from pydantic import Field

from .engine import EVENT_VERSION, StepEvent, step_totals

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STEP_EVENT = "specguard_step"
SUMMARY_EVENT = "specguard_summary"
STEP_RUN_NAME = "specguard_step"
TraceSteps = Literal["events", "runs"]

__all__ = [
    "EVENT_VERSION",
    "STEP_EVENT",
    "STEP_RUN_NAME",
    "SUMMARY_EVENT",
    "SpecGuardCallbackHandler",
    "SpecGuardLangSmithParams",
    "StepReporter",
]


class SpecGuardLangSmithParams(LangSmithParams, total=False):
    """``LangSmithParams`` plus the pair and configuration, so every traced run names them."""

    specguard_target: str
    specguard_draft: str
    acceptance_threshold: float | str
    signal_source: str
    n_candidates: int
    decision: str
    grounding_method: str
    trace_steps: str


# --------------------------------------------------------------------------------------------------
# reporting one call's steps to its run


class RunCatcher(BaseCallbackHandler):
    """Learns the id of the chat-model run that a streaming call opens (see ``ChatSpecGuard.stream``)."""

    run_id: UUID | None = None

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if self.run_id is None:
            self.run_id = run_id


def _ignores_custom_events(handler: BaseCallbackHandler) -> bool:
    """A LangChain tracer that would drop custom events (LangChainTracer and most tracers do)."""
    return isinstance(handler, (BaseTracer, AsyncBaseTracer)) and type(handler).on_custom_event in (
        BaseCallbackHandler.on_custom_event,
        AsyncCallbackHandler.on_custom_event,
    )


def record_on_tracers(handlers: Sequence[BaseCallbackHandler], run_id: UUID, name: str, data: dict[str, Any]) -> None:
    """Append ``name``/``data`` to the ``events`` of the run that each tracer keeps for ``run_id``.

    LangChain tracers build the run they post (to LangSmith, for ``LangChainTracer``) from their
    own callbacks and have no hook for custom events; putting the event on the run they already
    hold is how it ends up in the posted run, next to the ``start``/``new_token``/``end`` events.
    Tracer copies share one ``run_map``, so each run is updated once.
    """
    seen: set[int] = set()
    for handler in handlers:
        if not _ignores_custom_events(handler):
            continue
        run = handler.run_map.get(str(run_id))  # type: ignore[attr-defined]
        if run is None or id(run) in seen:
            continue
        seen.add(id(run))
        run.events.append({"name": name, "time": datetime.now(timezone.utc), "kwargs": data})


def summary_event(summary: dict[str, Any]) -> dict[str, Any]:
    """The ``specguard_summary`` payload: the summary without the step list (the steps have their own events)."""
    return {k: v for k, v in summary.items() if k != "step_events"}


def graph_writer() -> Callable[[Any], None] | None:
    """LangGraph's ``stream_mode="custom"`` writer when called inside a graph node or task, else None.

    Outside a graph run ``get_stream_writer()`` raises (no runnable context, or one without LangGraph's
    runtime); without LangGraph loaded no graph can be running, so it is not imported.
    """
    if "langgraph" not in sys.modules:
        return None
    try:
        from langgraph.config import get_stream_writer

        return get_stream_writer()
    except (ImportError, RuntimeError, KeyError):
        return None


_RunManager = CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun


class StepReporter:
    """Sends one call's steps to the chat-model run's handlers: custom events, tracer events, child runs.

    ``steps()``/``asteps()`` wrap the engine's step iterator. With ``trace_steps="runs"`` they open
    the ``specguard_step`` child run before asking for the next step, so its start and end times
    are the step's; a step that raises closes its child run with the error.
    """

    def __init__(
        self,
        handlers: Sequence[BaseCallbackHandler],
        run: _RunManager | RunCatcher | None,
        *,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        trace_steps: TraceSteps = "events",
        inheritable_tags: list[str] | None = None,
        inheritable_metadata: dict[str, Any] | None = None,
    ) -> None:
        self.handlers = [h for h in handlers if not isinstance(h, RunCatcher)]
        self.run = run
        self.tags = tags  # the chat-model run's own tags and metadata go with its custom events
        self.metadata = metadata
        self.trace_steps = trace_steps
        self.inheritable_tags = inheritable_tags  # what a child run inherits (not e.g. "seq:step:2")
        self.inheritable_metadata = inheritable_metadata

    @classmethod
    def for_run(cls, run_manager: _RunManager | None, trace_steps: TraceSteps = "events") -> StepReporter:
        if run_manager is None:
            return cls([], None)
        return cls(
            run_manager.handlers,
            run_manager,
            tags=run_manager.tags,
            metadata=run_manager.metadata,
            trace_steps=trace_steps,
            inheritable_tags=run_manager.inheritable_tags,
            inheritable_metadata=run_manager.inheritable_metadata,
        )

    def _run_id(self) -> UUID | None:
        return None if self.run is None else self.run.run_id

    def _active(self) -> UUID | None:
        run_id = self._run_id()
        return run_id if run_id is not None and self.handlers else None

    # -- custom events ---------------------------------------------------------------------------

    def emit(self, name: str, data: dict[str, Any]) -> None:
        run_id = self._active()
        if run_id is not None:
            CallbackManager(self.handlers, tags=self.tags, metadata=self.metadata).on_custom_event(
                name, data, run_id=run_id
            )
            record_on_tracers(self.handlers, run_id, name, data)
        self._write(name, data)

    async def aemit(self, name: str, data: dict[str, Any]) -> None:
        run_id = self._active()
        if run_id is not None:
            await AsyncCallbackManager(self.handlers, tags=self.tags, metadata=self.metadata).on_custom_event(
                name, data, run_id=run_id
            )
            record_on_tracers(self.handlers, run_id, name, data)
        self._write(name, data)

    @staticmethod
    def _write(name: str, data: dict[str, Any]) -> None:
        """Inside a LangGraph node, also to the graph's custom stream: ``{name: data}``.

        The writer is looked up at each event, in the context that reports it (the node's), so a
        reporter never holds on to a graph run that is over.
        """
        writer = graph_writer()
        if writer is not None:
            writer({name: data})

    def summary(self, summary: dict[str, Any]) -> None:
        self.emit(SUMMARY_EVENT, summary_event(summary))

    async def asummary(self, summary: dict[str, Any]) -> None:
        await self.aemit(SUMMARY_EVENT, summary_event(summary))

    # -- child runs ------------------------------------------------------------------------------

    def _child_manager(self, manager_class: type[CallbackManager] | type[AsyncCallbackManager]) -> Any:
        return manager_class(
            self.handlers,
            self.handlers,
            parent_run_id=self._run_id(),
            tags=self.inheritable_tags,
            inheritable_tags=self.inheritable_tags,
            metadata=self.inheritable_metadata,
            inheritable_metadata=self.inheritable_metadata,
        )

    def _open(self, index: int) -> CallbackManagerForChainRun | None:
        if self.trace_steps != "runs" or self._active() is None:
            return None
        return self._child_manager(CallbackManager).on_chain_start(
            None, {"index": index}, run_id=uuid.uuid4(), name=STEP_RUN_NAME
        )

    async def _aopen(self, index: int) -> AsyncCallbackManagerForChainRun | None:
        if self.trace_steps != "runs" or self._active() is None:
            return None
        return await self._child_manager(AsyncCallbackManager).on_chain_start(
            None, {"index": index}, run_id=uuid.uuid4(), name=STEP_RUN_NAME
        )

    # -- the step loop ---------------------------------------------------------------------------

    def steps(self, source: Iterator[StepEvent]) -> Iterator[StepEvent]:
        """``source``'s steps, each reported (child run, custom event, tracer event) before it is yielded.

        ``source`` is closed when this generator ends or is closed, so a consumer that stops early
        still releases what the engine's generator holds (its place in the pair's batch).
        """
        index, last = 0, False
        try:
            while True:
                child = None if last else self._open(index)
                try:
                    event = next(source)
                except StopIteration:
                    if child is not None:
                        child.on_chain_end({"step": None})
                    return
                except BaseException as error:
                    if child is not None:
                        child.on_chain_error(error)
                    raise
                data = event.to_dict()
                if child is None:
                    child = self._open(index)
                if child is not None:
                    child.on_chain_end(data)
                self.emit(STEP_EVENT, data)
                index, last = index + 1, event.finish_reason is not None
                yield event
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    async def asteps(self, source: AsyncIterator[StepEvent]) -> AsyncIterator[StepEvent]:
        """The async twin of ``steps``."""
        index, last = 0, False
        try:
            while True:
                child = None if last else await self._aopen(index)
                try:
                    event = await source.__anext__()
                except StopAsyncIteration:
                    if child is not None:
                        await child.on_chain_end({"step": None})
                    return
                except BaseException as error:
                    if child is not None:
                        await child.on_chain_error(error)
                    raise
                data = event.to_dict()
                if child is None:
                    child = await self._aopen(index)
                if child is not None:
                    await child.on_chain_end(data)
                await self.aemit(STEP_EVENT, data)
                index, last = index + 1, event.finish_reason is not None
                yield event
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()


NO_REPORTER = StepReporter([], None)


# --------------------------------------------------------------------------------------------------
# step events while streaming
#
# langchain-core's ``stream``/``astream`` open the chat-model run but do not hand its run manager to
# ``_stream``/``_astream``. To attribute step events to that run, :class:`TracedChatModel` overrides them: it
# configures the callback manager once itself (:func:`stream_reporter`: LangChain then reuses the same handler
# objects, tracer included), with a handler that learns the run id at ``on_chat_model_start``, and leaves the
# reporter in a context variable that ``_stream``/``_astream`` read when they start (:meth:`step_reporter`).

STREAM_REPORTER: ContextVar[StepReporter | None] = ContextVar("specguard_stream_reporter", default=None)


def stream_reporter(
    model: BaseLanguageModel[Any],
    config: RunnableConfig | None,
    manager_class: type[CallbackManager] | type[AsyncCallbackManager],
    trace_steps: TraceSteps,
) -> tuple[RunnableConfig, StepReporter]:
    """``config`` with its callbacks configured as ``model.stream`` would, and the reporter of the run it opens."""
    config = ensure_config(config)
    manager = manager_class.configure(
        config.get("callbacks"),
        model.callbacks,
        model.verbose,
        config.get("tags"),
        model.tags,
        config.get("metadata"),
        model.metadata,
    )
    catcher = RunCatcher()
    manager.add_handler(catcher, inherit=False)
    reporter = StepReporter(
        manager.handlers,
        catcher,
        tags=manager.tags,
        metadata=manager.metadata,
        trace_steps=trace_steps,
        inheritable_tags=manager.inheritable_tags,
        inheritable_metadata=manager.inheritable_metadata,
    )
    return {**config, "callbacks": manager}, reporter


@contextlib.contextmanager
def reporting(reporter: StepReporter) -> Iterator[None]:
    """``reporter`` is the stream's while the block runs (in this context)."""
    token = STREAM_REPORTER.set(reporter)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # resumed from another context: nothing to restore
            STREAM_REPORTER.reset(token)


class TracedChatModel(BaseChatModel):
    """A chat model whose every call reports its steps to the run it belongs to, also when streamed.

    ``invoke``/``ainvoke``: ``_generate``/``_agenerate`` hold the run manager, emit the step events and report
    each step to streaming handlers through ``on_llm_new_token`` themselves, so they never go through
    ``_stream`` on LangChain's behalf (:meth:`_should_stream`). ``stream``/``astream``: see the comment above.
    A subclass's ``_stream``/``_astream`` take their reporter from :meth:`step_reporter`.
    """

    trace_steps: TraceSteps = Field(
        default="events",
        description="'events': each step is a specguard_step custom event (and an event on the traced run); "
        "'runs': each step is also a child run named specguard_step, so LangSmith shows a tree.",
    )

    def step_reporter(self, run_manager: _RunManager | None) -> StepReporter:
        """The reporter of a call: its run manager's (``invoke``), else the one ``stream`` left."""
        if run_manager is not None:
            return StepReporter.for_run(run_manager, self.trace_steps)
        return STREAM_REPORTER.get() or NO_REPORTER

    def _should_stream(self, *, async_api: bool, run_manager: _RunManager | None = None, **kwargs: Any) -> bool:
        if run_manager is not None:
            return False  # invoke/ainvoke: _generate/_agenerate report the steps themselves
        return super()._should_stream(async_api=async_api, **kwargs)

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        config, reporter = stream_reporter(self, config, CallbackManager, self.trace_steps)
        with reporting(reporter):
            yield from super().stream(input, config, stop=stop, **kwargs)

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        config, reporter = stream_reporter(self, config, AsyncCallbackManager, self.trace_steps)
        with reporting(reporter):
            async for chunk in super().astream(input, config, stop=stop, **kwargs):
                yield chunk


# --------------------------------------------------------------------------------------------------
# the stats handler


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class SpecGuardCallbackHandler(BaseCallbackHandler):
    """Collects ``specguard_step``/``specguard_summary`` events across calls for stats and a plot.

    Pass it as a callback (``config={"callbacks": [handler]}``) to any number of calls, sync or
    async, from any threads; it keeps every step with the id of the chat-model run it came from.

    Example:
        .. code-block:: python

            handler = SpecGuardCallbackHandler()
            chain.batch(questions, config={"callbacks": [handler]})
            handler.summary()["accepted_share"], handler.summary()["fallbacks_by_reason"]
            handler.plot("steps.png")
            pandas.DataFrame(handler.to_records())  # if you use pandas
    """

    run_inline = True  # called in the emitting thread / event loop: no executor hop per event

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps: list[dict[str, Any]] = []
        self._summaries: list[dict[str, Any]] = []
        self._calls: dict[str, int] = {}  # run id -> call number, in order of first event

    # -- collection ------------------------------------------------------------------------------

    def on_custom_event(
        self, name: str, data: Any, *, run_id: UUID, tags: list[str] | None = None, **kwargs: Any
    ) -> None:
        if name not in (STEP_EVENT, SUMMARY_EVENT) or not isinstance(data, dict):
            return
        self.add(name, data, run_id)

    def add(self, name: str, data: dict[str, Any], run_id: UUID | str | None = None) -> None:
        """Record one event by hand (e.g. from ``GenerationResult.steps`` of the bare engine)."""
        key = str(run_id) if run_id is not None else "engine"
        with self._lock:
            call = self._calls.setdefault(key, len(self._calls))
            record = {"run_id": key, "call": call, **data}
            (self._steps if name == STEP_EVENT else self._summaries).append(record)

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> SpecGuardCallbackHandler:
        """A handler holding saved ``to_records()`` output again, e.g. to plot a past run."""
        handler = cls()
        for record in sorted(records, key=lambda r: (r.get("call", 0), r.get("index", 0))):
            step = {k: v for k, v in record.items() if k not in ("run_id", "call")}
            handler.add(STEP_EVENT, step, run_id=record.get("run_id"))
        return handler

    def reset(self) -> None:
        with self._lock:
            self._steps.clear()
            self._summaries.clear()
            self._calls.clear()

    # -- views -----------------------------------------------------------------------------------

    def to_records(self) -> list[dict[str, Any]]:
        """One flat dict per step (the step event plus ``run_id`` and ``call``), calls in first-seen order.

        Steps of one call stay in step order even when calls interleave across threads.
        """
        with self._lock:
            records = [dict(r) for r in self._steps]
        records.sort(key=lambda r: (r["call"], r.get("index", 0)))
        return records

    def summaries(self) -> list[dict[str, Any]]:
        """The ``specguard_summary`` of each finished call, with its ``run_id`` and ``call``."""
        with self._lock:
            return [dict(s) for s in self._summaries]

    def summary(self) -> dict[str, Any]:
        """Totals over every collected step, named as a call's ``specguard_summary`` names them
        (:func:`~langchain_specguard.engine.events.step_totals`: ``accepted_share``, ``draft_tokens``...), and:

        ``calls``; ``target_token_share``: output tokens the target wrote / all output tokens; ``fallbacks`` and
        ``fallbacks_by_reason``: rejected steps, per ``reason``; ``mean_score``; ``seconds``: the steps' wall
        times added up (the ``draft``/``verify``/``target`` split is among the totals).
        """
        records = self.to_records()
        totals = step_totals(records)
        reasons = Counter(str(r.get("reason")) for r in records if not r.get("accepted"))
        scores = [s for s in (_number(r.get("score")) for r in records) if s is not None]
        output = totals["output_tokens"]
        return {
            "calls": len({r["run_id"] for r in records}),
            **totals,
            "target_token_share": totals["target_tokens"] / output if output else 0.0,
            "fallbacks": totals["steps"] - totals["accepted_steps"],
            "fallbacks_by_reason": dict(sorted(reasons.items())),
            "mean_score": sum(scores) / len(scores) if scores else None,
            "seconds": sum(_number(r.get("seconds")) or 0.0 for r in records),
        }

    def plot(self, path: str | Path | None = None, *, title: str | None = None) -> Figure:
        """Per-step score against the threshold (accepted vs fallback), and who wrote each step's tokens.

        Returns the matplotlib ``Figure``; with ``path`` it is also saved there (format from the
        suffix, e.g. ``.png``). Needs the ``plot`` extra (``pip install langchain-specguard[plot]``).
        Uses ``matplotlib.figure.Figure`` directly, so no GUI backend or pyplot state is involved.
        """
        try:
            from matplotlib.figure import Figure
            from matplotlib.ticker import MaxNLocator
        except ImportError as error:  # pragma: no cover - exercised only without the extra
            raise ImportError("plot() needs matplotlib: pip install 'langchain-specguard[plot]'") from error

        records = self.to_records()
        xs = list(range(len(records)))
        fig = Figure(figsize=(max(6.0, min(16.0, 0.25 * len(records) + 4)), 5.5), layout="constrained")
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])

        for accepted, colour, label, marker in (
            (True, "tab:green", "accepted (draft)", "o"),
            (False, "tab:red", "fallback (target)", "X"),
        ):
            points = [
                (x, _number(r.get("score")))
                for x, r in zip(xs, records, strict=True)
                if bool(r.get("accepted")) == accepted
            ]
            shown = [(x, y) for x, y in points if y is not None]
            top.scatter(
                [x for x, _ in shown],
                [y for _, y in shown],
                c=colour,
                marker=marker,
                s=36,
                label=f"{label}: {len(points)}",
                zorder=3,
            )
        thresholds = [_number(r.get("threshold")) for r in records]
        if records:
            top.step(
                xs,
                [t if t is not None else math.nan for t in thresholds],
                where="mid",
                color="black",
                linestyle="--",
                linewidth=1,
                label="acceptance threshold",
            )
        for boundary in (x for x in xs[1:] if records[x]["call"] != records[x - 1]["call"]):
            for ax in (top, bottom):
                ax.axvline(boundary - 0.5, color="0.8", linewidth=0.8, zorder=0)
        top.set_ylabel("combined score")
        limits = [t for t in thresholds if t is not None]
        top.set_ylim(min([0.0, *limits]) - 0.05, max([1.0, *limits]) + 0.05)
        top.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)  # outside: never hides a point
        totals = self.summary()
        # a figure title, which the layout keeps inside the figure (an axes title is centred on the axes, which the
        # legends push left, so on a short run's narrow figure it ran off the edge); long ones wrap
        fig.suptitle(
            title
            or f"SpecGuard steps: {totals['calls']} call(s), acceptance {totals['accepted_share']:.0%}, "
            f"target wrote {totals['target_token_share']:.0%} of tokens",
            fontsize=10,
            wrap=True,
        )

        draft_tokens = [int(r.get("num_tokens", 0)) if r.get("source") == "draft" else 0 for r in records]
        target_tokens = [int(r.get("num_tokens", 0)) if r.get("source") == "target" else 0 for r in records]
        bottom.bar(xs, draft_tokens, color="tab:green", label="draft tokens")
        bottom.bar(xs, target_tokens, bottom=draft_tokens, color="tab:red", label="target tokens")
        bottom.set_ylabel("tokens")
        bottom.set_ylim(0, 1.5 * max([1, *(d + t for d, t in zip(draft_tokens, target_tokens, strict=True))]))
        bottom.set_xlabel("step (all calls, in order; grey lines separate calls)")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        bottom.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def langsmith_params(
    base: LangSmithParams, target: str, draft: str, config: dict[str, Any]
) -> SpecGuardLangSmithParams:
    """``base`` plus the pair and the decisive config keys, for ``ChatSpecGuard._get_ls_params``."""
    params = SpecGuardLangSmithParams(**base)
    params["specguard_target"] = target
    params["specguard_draft"] = draft
    for key in ("acceptance_threshold", "signal_source", "n_candidates", "decision", "grounding_method", "trace_steps"):
        if key in config:
            params[key] = config[key]
    return params
