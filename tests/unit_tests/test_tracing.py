"""Per-step verification in traces: LangSmith (through a local stand-in), astream_events, the stats handler, plots."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_core.tracers.langchain import wait_for_all_tracers
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler
from langsmith import run_trees
from langsmith import utils as ls_utils

from langchain_specguard import STEP_EVENT, SUMMARY_EVENT, ChatSpecGuard, StepEvent
from langchain_specguard.callbacks import STEP_RUN_NAME, SpecGuardCallbackHandler
from langchain_specguard.engine import EVENT_VERSION
from tests.langsmith_standin import LangSmithStandIn, trim_run
from tests.tiny_models import llama_pair

FIXTURE = Path(__file__).parent.parent / "fixtures" / "langsmith_chat_model_run.json"
# on this pair, 0.7515 leaves the first steps of a call to the target and accepts the later ones
MIXED = {"decision": "weighted", "grounding_weight": 0.8, "acceptance_threshold": 0.7515, "confidence_method": "mean"}


def make_llm(**overrides: Any) -> ChatSpecGuard:
    target, draft = llama_pair()
    fields: dict[str, Any] = {
        "target_model": target,
        "draft_model": draft,
        "max_tokens": 16,
        "max_step_tokens": 4,
        "torch_dtype": "float64",
        "step_delimiters": ["\n"],
        "seed": 0,  # the sampled draft candidates too are the same on every call
        **MIXED,
    }
    return ChatSpecGuard(**{**fields, **overrides})


@pytest.fixture(scope="module")
def llm() -> ChatSpecGuard:
    model = make_llm(return_step_details=True)
    model.invoke("warm up")  # first call pays one-off costs; keeps the timed paths below honest
    return model


class Collector(BaseCallbackHandler):
    """Everything the chat model reports, in arrival order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        self.events.append((name, data))


# --------------------------------------------------------------------------------------------------
# LangSmith, for real, against a local stand-in for its API


@pytest.fixture
def langsmith(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[LangSmithStandIn]:
    """Tracing on, pointed at a fresh stand-in; a fresh langsmith client reads that configuration."""
    mode = getattr(request, "param", "multipart-zstd")
    with LangSmithStandIn(mode, lifetime_s=180) as server:
        for name in ("LANGCHAIN_TRACING_V2", "LANGCHAIN_ENDPOINT", "LANGCHAIN_API_KEY", "LANGCHAIN_PROJECT"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("LANGSMITH_TRACING", "true")
        monkeypatch.setenv("LANGSMITH_ENDPOINT", server.url)
        monkeypatch.setenv("LANGSMITH_API_KEY", "fake")
        monkeypatch.setenv("LANGSMITH_PROJECT", "specguard-standin")
        ls_utils.get_env_var.cache_clear()  # langsmith caches env reads
        ls_utils.get_tracer_project.cache_clear()
        monkeypatch.setattr(run_trees, "_CLIENT", None)
        try:
            yield server
        finally:
            wait_for_all_tracers()
            ls_utils.get_env_var.cache_clear()
            ls_utils.get_tracer_project.cache_clear()


def _flush_and_collect(server: LangSmithStandIn) -> dict[str, dict[str, Any]]:
    wait_for_all_tracers()  # Client.flush() on the client the tracer used
    return server.runs()


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _only(runs: dict[str, dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return sorted((r for r in runs.values() if r.get("name") == name), key=lambda r: r["start_time"])


@pytest.mark.parametrize("langsmith", ["multipart-zstd", "batch"], indirect=True)
def test_langsmith_receives_step_events_summary_and_pair(llm: ChatSpecGuard, langsmith: LangSmithStandIn) -> None:
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | llm | StrOutputParser()
    answer = chain.invoke({"question": "Hello"})
    runs = _flush_and_collect(langsmith)

    paths = {r.path.split("?")[0] for r in langsmith.received if r.ops}
    if langsmith.mode == "batch":
        assert paths == {"/runs/batch"}
    else:
        assert paths == {"/runs/multipart"}
        # zstd once the client has read /info; the first batch may go out before that, uncompressed
        assert {r.headers.get("content-encoding") for r in langsmith.received if r.ops} <= {None, "zstd"}
    (sequence,) = _only(runs, "RunnableSequence")
    (run,) = _only(runs, "ChatSpecGuard")
    assert run["parent_run_id"] == sequence["id"] and run["run_type"] == "llm"

    # the per-step events, in step order, then the summary, between the run's start and end
    names = [e["name"] for e in run["events"]]
    assert names[0] == "start" and names[-1] == "end"
    steps = [e["kwargs"] for e in run["events"] if e["name"] == STEP_EVENT]
    (summary,) = [e["kwargs"] for e in run["events"] if e["name"] == SUMMARY_EVENT]
    assert names.index(SUMMARY_EVENT) > max(i for i, n in enumerate(names) if n == STEP_EVENT)
    assert [s["index"] for s in steps] == list(range(summary["num_steps"])) and steps
    assert "".join(s["text"] for s in steps) == answer
    assert {s["source"] for s in steps} == {"draft", "target"}  # MIXED: both kinds of step were traced
    for step in steps:
        assert step["version"] == summary["version"] == EVENT_VERSION
        assert step["accepted"] == (step["source"] == "draft") == (step["reason"] == "accepted")
        assert step["threshold"] == MIXED["acceptance_threshold"]
        assert step["draft_seconds"] + step["verify_seconds"] + step["target_seconds"] <= step["seconds"]
    times = [_time(e["time"]) for e in run["events"]]
    assert times == sorted(times)

    # the summary also reaches the run's outputs; the step list too, since return_step_details is on
    message = run["outputs"]["generations"][0][0]["message"]["kwargs"]
    specguard = message["response_metadata"]["specguard"]
    assert {k: v for k, v in specguard.items() if k != "step_events"} == summary
    assert specguard["step_events"] == steps and summary["steps"] == specguard["steps"] == len(steps)

    # the metadata names the pair and the configuration
    metadata = run["extra"]["metadata"]
    assert metadata["specguard_target"] == llm.target_model and metadata["specguard_draft"] == llm.draft_model
    assert metadata["ls_provider"] == "specguard" and metadata["ls_model_name"] == llm.target_model
    assert metadata["acceptance_threshold"] == MIXED["acceptance_threshold"]
    assert metadata["signal_source"] == "target" and metadata["n_candidates"] is None  # (the device's default)
    assert metadata["decision"] == "weighted" and metadata["trace_steps"] == "events"
    assert not _only(runs, STEP_RUN_NAME)  # "events" mode adds no child runs

    # the documented example payload (tests/fixtures) still has the shape the client posts
    documented = json.loads(FIXTURE.read_text())
    trimmed = trim_run(run)
    assert set(documented) == set(trimmed)
    for name in (STEP_EVENT, SUMMARY_EVENT):
        shapes = [
            {frozenset(e["kwargs"]) for e in payload["events"] if e["name"] == name}
            for payload in (documented, trimmed)
        ]
        assert shapes[0] == shapes[1]
    assert set(documented["extra"]["metadata"]) <= set(run["extra"]["metadata"]) | {"revision_id"}


def test_langsmith_step_runs_form_a_tree_when_streaming(llm: ChatSpecGuard, langsmith: LangSmithStandIn) -> None:
    model = llm.model_copy(update={"trace_steps": "runs"}).bind(acceptance_threshold=0.2)
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | model | StrOutputParser()
    answer = "".join(chain.stream({"question": "Hey"}))
    runs = _flush_and_collect(langsmith)

    (run,) = _only(runs, "ChatSpecGuard")
    children = _only(runs, STEP_RUN_NAME)
    events = [e["kwargs"] for e in run["events"] if e["name"] == STEP_EVENT]
    assert len(children) == len(events) > 1
    assert "".join(e["text"] for e in events) == answer
    assert run["extra"]["metadata"]["acceptance_threshold"] == 0.2  # the per-call override is what is traced
    assert all(e["accepted"] for e in events)
    previous_end = _time(run["start_time"])
    for index, (child, event) in enumerate(zip(children, events, strict=True)):
        assert child["parent_run_id"] == run["id"] and child["trace_id"] == run["trace_id"]
        assert child["run_type"] == "chain" and child["inputs"] == {"index": index}
        assert child["outputs"] == event
        assert child["dotted_order"].startswith(run["dotted_order"] + ".")
        # each child spans its own step as the call waited for it: opened when the call asked for the step (the
        # batch may have computed it already, one step ahead), closed when it was delivered
        started, ended = _time(child["start_time"]), _time(child["end_time"])
        assert previous_end <= started < ended <= _time(run["end_time"])
        previous_end = ended


def test_step_child_run_records_the_error(llm: ChatSpecGuard, monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_specguard import chat_models

    real = chat_models.generate_steps

    def fails_on_second_step(*args: Any, **kwargs: Any) -> Iterator[StepEvent]:
        steps = real(*args, **kwargs)
        yield next(steps)
        steps.close()
        raise RuntimeError("step 1 broke (simulated)")

    monkeypatch.setattr(chat_models, "generate_steps", fails_on_second_step)
    collector = RunCollectorCallbackHandler()
    with pytest.raises(RuntimeError, match="simulated"):
        llm.model_copy(update={"trace_steps": "runs"}).invoke("Hello", config={"callbacks": [collector]})
    (run,) = collector.traced_runs
    assert run.error and "simulated" in run.error
    first, second = sorted(run.child_runs, key=lambda r: r.start_time)
    assert first.name == second.name == STEP_RUN_NAME
    assert first.error is None and first.outputs is not None and first.outputs["index"] == 0
    assert second.error is not None and "simulated" in second.error and second.inputs == {"index": 1}
    monkeypatch.undo()
    assert llm.invoke("Hello").content  # the generation lock was released


async def test_any_langchain_tracer_gets_the_step_events(llm: ChatSpecGuard) -> None:
    """Not only LangSmith's: every tracer's run carries the events, on the async paths too."""
    for call in ("ainvoke", "astream"):
        collector = RunCollectorCallbackHandler()
        config: Any = {"callbacks": [collector]}
        if call == "ainvoke":
            await llm.ainvoke("Hello", config=config)
        else:
            [chunk async for chunk in llm.astream("Hello", config=config)]
        (run,) = collector.traced_runs
        names = [e["name"] for e in run.events]
        steps = [e["kwargs"] for e in run.events if e["name"] == STEP_EVENT]
        assert [s["index"] for s in steps] == list(range(len(steps))) and steps, call
        assert names.count(SUMMARY_EVENT) == 1 and names[-1] == "end", call


# --------------------------------------------------------------------------------------------------
# astream_events and return_step_details


@pytest.mark.parametrize("trace_steps", ["events", "runs"])
async def test_astream_events_steps_interleave_in_order(llm: ChatSpecGuard, trace_steps: str) -> None:
    model = llm.model_copy(update={"trace_steps": trace_steps})
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | model
    model_run: str | None = None
    timeline: list[tuple[str, Any]] = []
    async for event in chain.astream_events({"question": "Hello"}, version="v2"):
        kind, name = event["event"], event["name"]
        if kind == "on_chat_model_start":
            model_run = event["run_id"]
        elif kind == "on_custom_event":
            assert event["run_id"] == model_run  # attributed to the chat-model run
            timeline.append((name, event["data"]))
        elif kind == "on_chat_model_stream":
            timeline.append(("chunk", event["data"]["chunk"]))
        elif name == STEP_RUN_NAME:
            assert model_run in event["parent_ids"]
            timeline.append((kind, event["data"]))
    steps = [data for name, data in timeline if name == STEP_EVENT]
    assert [s["index"] for s in steps] == list(range(len(steps))) and len(steps) > 1
    # each step's event arrives right before the chunk that carries that step's text
    for i, (name, data) in enumerate(timeline):
        if name == STEP_EVENT:
            assert timeline[i + 1][0] == "chunk" and timeline[i + 1][1].content == data["text"]
    assert [name for name, _ in timeline[-2:]] == [SUMMARY_EVENT, "chunk"]
    last = timeline[-1][1]
    assert last.chunk_position == "last" and last.response_metadata["specguard"]["step_events"] == steps
    assert timeline[-2][1]["steps"] == len(steps) == timeline[-2][1]["num_steps"]
    if trace_steps == "runs":  # a child run opens before its step and closes with it as output
        opened = [i for i, (name, _) in enumerate(timeline) if name == "on_chain_start"]
        closed = [data["output"] for name, data in timeline if name == "on_chain_end"]
        assert len(opened) == len(steps) and closed == steps
        assert all(timeline[i + 1][0] == "on_chain_end" for i in opened)
    else:
        assert not any(name.startswith("on_chain") for name, _ in timeline)


def test_return_step_details_invoke_and_stream(llm: ChatSpecGuard) -> None:
    collector = Collector()
    message = llm.invoke("Hey", config={"callbacks": [collector]})
    details = message.response_metadata["specguard"]["step_events"]
    sent = [data for name, data in collector.events if name == STEP_EVENT]
    assert details == sent and message.response_metadata["specguard"]["num_steps"] == len(sent)
    assert json.loads(json.dumps(details)) == details  # plain JSON: survives serialization as is
    chunks = list(llm.stream("Hey"))
    assert all("specguard" not in c.response_metadata for c in chunks[:-1])
    streamed = chunks[-1].response_metadata["specguard"]["step_events"]
    assert [_untimed(s) for s in streamed] == [_untimed(s) for s in details]  # same steps, other timings
    plain = make_llm().invoke("Hey")
    assert plain.response_metadata["specguard"]["steps"] == len(details)  # the count, with or without details
    assert message.response_metadata["specguard"]["steps"] == len(details)  # one type: always the count
    assert "step_events" not in plain.response_metadata["specguard"]


def _untimed(step: dict[str, Any]) -> dict[str, Any]:
    """A step without its timings, scores rounded (float64 reductions may differ in the last bit)."""
    return {k: round(v, 9) if isinstance(v, float) else v for k, v in step.items() if not k.endswith("seconds")}


def test_langsmith_params_follow_per_call_overrides() -> None:
    model = make_llm()
    params = model._get_ls_params(acceptance_threshold=0.9, signal_source="draft", confidence_method="mean", stop=["x"])
    assert params["acceptance_threshold"] == 0.9 and params["signal_source"] == "draft"
    assert params["specguard_target"] == model.target_model and params["specguard_draft"] == model.draft_model
    target, _ = llama_pair()
    self_spec = ChatSpecGuard(target_model=target, draft_layers=1)
    assert self_spec._get_ls_params()["specguard_draft"] == f"{target} (first 1 layers)"


def test_langsmith_stop_is_every_stop_sequence_the_call_stops_at() -> None:
    """Issue 29 item 9: a constructor ``stop`` never reached ``ls_stop`` (only a per-call one did), although the call
    stops at both, as ChatOllama reports its own ``stop``."""
    assert "ls_stop" not in make_llm()._get_ls_params()
    model = make_llm(stop=["\n\n"])
    assert model._get_ls_params()["ls_stop"] == ["\n\n"]
    assert model._get_ls_params(stop=["END"])["ls_stop"] == ["\n\n", "END"]
    assert make_llm()._get_ls_params(stop=["END"])["ls_stop"] == ["END"]

    class Metadata(BaseCallbackHandler):
        def __init__(self) -> None:
            self.seen: list[dict[str, Any]] = []

        def on_chat_model_start(self, *args: Any, metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
            self.seen.append(metadata or {})

    handler = Metadata()
    model.bind(stop=["END"]).invoke("Hi", config={"callbacks": [handler]})  # what a LangSmith run records
    assert handler.seen[-1]["ls_stop"] == ["\n\n", "END"]


# --------------------------------------------------------------------------------------------------
# the stats handler


def _step(index: int, source: str, num_tokens: int, score: float | None, reason: str = "score") -> StepEvent:
    accepted = source == "draft"
    return StepEvent(
        index=index,
        source=source,  # type: ignore[arg-type]
        text="x" * num_tokens,
        num_tokens=num_tokens,
        n_candidates=4,
        grounding=0.5,
        confidence=0.5,
        score=float("nan") if score is None else score,
        threshold=0.5,
        accepted=accepted,
        reason="accepted" if accepted else reason,
        seconds=0.5,
        draft_text="y",
        drafted_tokens=4 * num_tokens,
        target_forwards=1 + (num_tokens if not accepted else 0),
        draft_seconds=0.25,
        verify_seconds=0.125,
        target_seconds=0.0 if accepted else 0.0625,
    )


HAND_CALLS = [
    [_step(0, "target", 6, 0.2), _step(1, "draft", 4, 0.7), _step(2, "draft", 5, 0.9)],
    [_step(0, "draft", 3, 0.6), _step(1, "target", 2, None, reason="schema")],
]


def test_handler_totals_match_a_hand_computed_run() -> None:
    """Events dispatched through LangChain by hand, sync and async, from two concurrent calls."""
    handler = SpecGuardCallbackHandler()

    def emit_sync(steps: list[StepEvent]) -> str:
        for step in steps:
            dispatch_custom_event(STEP_EVENT, step.to_dict())
        dispatch_custom_event(SUMMARY_EVENT, {"version": 1, "num_steps": len(steps)})
        return "ok"

    async def emit_async(steps: list[StepEvent]) -> str:
        for step in steps:
            await adispatch_custom_event(STEP_EVENT, step.to_dict())
            await asyncio.sleep(0)  # let the other call interleave
        await adispatch_custom_event(SUMMARY_EVENT, {"version": 1, "num_steps": len(steps)})
        return "ok"

    RunnableLambda(emit_sync).invoke(HAND_CALLS[0], config={"callbacks": [handler]})
    RunnableLambda(emit_sync, afunc=emit_async).batch(
        [HAND_CALLS[1], HAND_CALLS[1]], config={"callbacks": [handler]}
    )  # batch runs the two calls in threads

    async def both() -> None:
        runnable = RunnableLambda(emit_sync, afunc=emit_async)
        await asyncio.gather(*(runnable.ainvoke(c, config={"callbacks": [handler]}) for c in HAND_CALLS))

    asyncio.run(both())
    # five calls: HAND_CALLS[0] twice, HAND_CALLS[1] three times; by hand:
    # steps 3*2 + 2*3 = 12; accepted (draft) 2*2 + 1*3 = 7; output tokens 15*2 + 5*3 = 45;
    # target tokens 6*2 + 2*3 = 18; fallbacks: "score" 2 (call 0's step 0), "schema" 3
    totals = handler.summary()
    assert totals["calls"] == 5 and len(handler.summaries()) == 5
    assert totals["steps"] == 12 and totals["accepted_steps"] == 7
    assert totals["accepted_share"] == pytest.approx(7 / 12)
    assert totals["output_tokens"] == 45 and totals["target_tokens"] == 18 and totals["draft_tokens"] == 27
    assert totals["target_token_share"] == pytest.approx(18 / 45)
    assert totals["fallbacks"] == 5 and totals["fallbacks_by_reason"] == {"schema": 3, "score": 2}
    assert totals["seconds"] == pytest.approx(12 * 0.5)
    assert totals["draft_seconds"] == pytest.approx(12 * 0.25) and totals["verify_seconds"] == pytest.approx(1.5)
    assert totals["target_seconds"] == pytest.approx(5 * 0.0625)
    # mean of the scores that exist (NaN became null in the event): (0.2+0.7+0.9)*2 + 0.6*3 = 5.4 over 9
    assert totals["mean_score"] == pytest.approx(5.4 / 9)
    assert totals["drafted_tokens"] == 4 * 45
    records = handler.to_records()
    assert len(records) == 12 and len({r["run_id"] for r in records}) == 5
    for call in range(5):  # each call's steps are contiguous and in step order despite interleaving
        indices = [r["index"] for r in records if r["call"] == call]
        assert indices == list(range(len(indices)))
    assert [r["call"] for r in records] == sorted(r["call"] for r in records)
    handler.reset()
    assert handler.summary()["steps"] == 0 and handler.to_records() == []


def test_handler_on_a_real_run_matches_the_messages(llm: ChatSpecGuard) -> None:
    handler = SpecGuardCallbackHandler()
    config: Any = {"callbacks": [handler]}
    messages = [llm.invoke("Hello", config=config)]
    messages += llm.batch(["Hey", "hi"], config={**config, "max_concurrency": 2})
    messages.append(asyncio.run(llm.ainvoke("Good day", config=config)))
    streamed = list(llm.stream("Hello there", config=config))
    details = [m.response_metadata["specguard"]["step_events"] for m in messages]
    details.append(streamed[-1].response_metadata["specguard"]["step_events"])

    steps = [s for call in details for s in call]
    totals = handler.summary()
    assert totals["calls"] == 5 and totals["steps"] == len(steps)
    accepted = sum(s["accepted"] for s in steps)
    assert 0 < accepted < len(steps)  # MIXED gives both outcomes
    assert totals["accepted_share"] == pytest.approx(accepted / len(steps))
    output = sum(s["num_tokens"] for s in steps)
    target = sum(s["num_tokens"] for s in steps if s["source"] == "target")
    assert totals["output_tokens"] == output and totals["target_token_share"] == pytest.approx(target / output)
    assert totals["fallbacks_by_reason"] == {"score": len(steps) - accepted}
    assert totals["seconds"] == pytest.approx(sum(s["seconds"] for s in steps))
    # one vocabulary: the handler's totals are the calls' own summaries added up, key by key
    summaries = [m.response_metadata["specguard"] for m in messages] + [streamed[-1].response_metadata["specguard"]]
    shared = set(summaries[0]) & set(totals) - {"version", "accepted_share", "seconds"}
    assert {"steps", "accepted_steps", "output_tokens", "draft_tokens", "kept_tokens", "draft_seconds"} <= shared
    for key in shared:
        assert totals[key] == pytest.approx(sum(summary[key] for summary in summaries)), key
    assert totals["seconds"] >= totals["draft_seconds"] + totals["verify_seconds"] + totals["target_seconds"] > 0
    summaries = handler.summaries()
    assert sorted(s["num_steps"] for s in summaries) == sorted(len(d) for d in details)
    assert sum(s["output_tokens"] for s in summaries) == output
    by_call: dict[str, list[dict[str, Any]]] = {}
    for record in handler.to_records():
        by_call.setdefault(record["run_id"], []).append(record)
    recorded = [
        [{k: v for k, v in r.items() if k not in ("run_id", "call")} for r in call] for call in by_call.values()
    ]
    assert sorted(json.dumps(c, sort_keys=True) for c in recorded) == sorted(
        json.dumps(c, sort_keys=True) for c in details
    )


def test_handler_is_thread_safe_under_contention() -> None:
    handler = SpecGuardCallbackHandler()
    steps = [_step(i, "draft" if i % 3 else "target", 2, 0.5) for i in range(50)]

    def worker(run: int) -> None:
        for step in steps:
            handler.add(STEP_EVENT, step.to_dict(), run_id=f"run-{run}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = handler.to_records()
    assert len(records) == 8 * 50 and handler.summary()["calls"] == 8
    assert handler.summary()["accepted_steps"] == 8 * sum(1 for i in range(50) if i % 3)


# --------------------------------------------------------------------------------------------------
# the plot


def test_plot_writes_a_png(llm: ChatSpecGuard, tmp_path: Path) -> None:
    handler = SpecGuardCallbackHandler()
    for question in ("Hello", "Hey"):
        llm.invoke(question, config={"callbacks": [handler]})
    path = tmp_path / "steps.png"
    figure = handler.plot(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 600 and height > 500
    top, bottom = figure.axes[:2]
    records = handler.to_records()
    plotted = sum(len(collection.get_offsets()) for collection in top.collections)
    assert plotted == sum(1 for r in records if r["score"] is not None) and plotted > 0
    labels = [text.get_text() for text in top.get_legend().get_texts()]
    accepted = sum(r["accepted"] for r in records)
    assert f"accepted (draft): {accepted}" in labels
    assert f"fallback (target): {len(records) - accepted}" in labels
    assert "acceptance threshold" in labels
    assert len(bottom.patches) == 2 * len(records)  # draft and target token bars per step
