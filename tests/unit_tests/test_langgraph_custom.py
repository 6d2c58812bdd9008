"""LangGraph's ``stream_mode="custom"`` sees each verified step as it happens (issue 20 item 2).

A node calls the model (``invoke``/``stream``/``ainvoke``/``astream``); the graph's custom stream yields one
``{"specguard_step": <event>}`` per step, in step order, then ``{"specguard_summary": <summary>}``. The same
events are in the message (``return_step_details=True``), so the two are compared within one graph run. Calls
outside a graph write nothing and still report to callbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.runnables import RunnableLambda

from langchain_specguard import ChatSpecGuard, SpecGuardCallbackHandler
from langchain_specguard.callbacks import STEP_EVENT, SUMMARY_EVENT, graph_writer, summary_event
from tests.tiny_models import llama_pair

pytest.importorskip("langgraph")

from langgraph.graph import END, START, MessagesState, StateGraph

INPUTS = {"messages": [HumanMessage("Hello there")]}


def make_llm() -> ChatSpecGuard:
    target, draft = llama_pair()
    return ChatSpecGuard(
        model=target,
        draft_model=draft,
        max_tokens=20,
        max_step_tokens=4,
        step_delimiters=["\n"],
        seed=0,
        return_step_details=True,
    )


def summed(chunks: list[AIMessageChunk]) -> AIMessage:
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    return AIMessage(content=total.content, response_metadata=total.response_metadata, id=total.id)


def sync_nodes(llm: ChatSpecGuard) -> dict[str, Callable[[MessagesState], dict[str, Any]]]:
    return {
        "invoke": lambda state: {"messages": [llm.invoke(state["messages"])]},
        "stream": lambda state: {"messages": [summed(list(llm.stream(state["messages"])))]},
    }


def async_nodes(llm: ChatSpecGuard) -> dict[str, Callable[[MessagesState], Any]]:
    async def ainvoke(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    async def astream(state: MessagesState) -> dict[str, Any]:
        return {"messages": [summed([c async for c in llm.astream(state["messages"])])]}

    return {"ainvoke": ainvoke, "astream": astream}


def one_node_graph(node: Callable[[MessagesState], Any]) -> Any:
    builder = StateGraph(MessagesState)
    builder.add_node("model", node)
    builder.add_edge(START, "model")
    builder.add_edge("model", END)
    return builder.compile()


def split(items: Iterable[tuple[str, Any]]) -> tuple[list[Any], BaseMessage]:
    """A ``stream_mode=["custom", "values"]`` run's custom items, and the last message of its final state."""
    custom: list[Any] = []
    answer: BaseMessage | None = None
    for mode, data in items:
        if mode == "custom":
            custom.append(data)
        else:
            answer = data["messages"][-1]
    assert isinstance(answer, AIMessage)
    return custom, answer


def check(custom: list[Any], answer: BaseMessage) -> None:
    """``custom``: the graph's custom items; ``answer``: the message the node returned in the same run."""
    metadata = answer.response_metadata["specguard"]
    assert all(isinstance(item, dict) and len(item) == 1 for item in custom)
    steps = [item[STEP_EVENT] for item in custom if STEP_EVENT in item]
    assert len(steps) == metadata["num_steps"] > 2
    assert [s["index"] for s in steps] == list(range(len(steps)))  # one item per step, in step order
    assert steps == metadata["step_events"]  # the step events themselves: source, scores, verdict
    assert {"source", "score", "accepted", "reason", "threshold"} <= set(steps[0])
    assert custom[-1] == {SUMMARY_EVENT: summary_event(metadata)}  # the summary closes the call's items
    assert "".join(s["text"] for s in steps) == answer.content


@pytest.mark.parametrize("call", ["invoke", "stream"])
def test_custom_mode_yields_each_step_in_order(call: str) -> None:
    graph = one_node_graph(sync_nodes(make_llm())[call])
    custom, answer = split(graph.stream(INPUTS, stream_mode=["custom", "values"]))
    check(custom, answer)
    alone = list(graph.stream(INPUTS, stream_mode="custom"))  # custom mode alone: the same items (greedy)

    def texts(items: list[Any]) -> list[str | None]:
        return [item[STEP_EVENT]["text"] if STEP_EVENT in item else None for item in items]

    assert texts(alone) == texts(custom)
    assert graph.invoke(INPUTS)["messages"][-1].content == answer.content  # a plain graph run is unchanged


@pytest.mark.parametrize("call", ["ainvoke", "astream"])
async def test_custom_mode_yields_each_step_in_async_graphs(call: str) -> None:
    graph = one_node_graph(async_nodes(make_llm())[call])
    check(*split([item async for item in graph.astream(INPUTS, stream_mode=["custom", "values"])]))


@pytest.mark.parametrize("call", ["invoke", "stream"])
def test_each_step_event_comes_before_its_chunk(call: str) -> None:
    graph = one_node_graph(sync_nodes(make_llm())[call])
    steps_text, chunks_text, steps = "", "", 0
    for mode, data in graph.stream(INPUTS, stream_mode=["messages", "custom"]):
        if mode == "custom" and STEP_EVENT in data:
            steps_text += data[STEP_EVENT]["text"]
            steps += 1
        elif mode == "messages":
            chunks_text += str(data[0].content)
            assert chunks_text == steps_text  # the step's event arrived before the chunk that shows its text
    assert steps > 2 and chunks_text == steps_text != ""


def test_calls_outside_a_graph_write_nothing_and_still_report() -> None:
    llm = make_llm()
    assert graph_writer() is None
    assert RunnableLambda(lambda _: graph_writer()).invoke(None) is None  # a runnable context, but no graph
    handler = SpecGuardCallbackHandler()
    plain = llm.invoke(INPUTS["messages"], config={"callbacks": [handler]})
    chained = (RunnableLambda(lambda x: x) | llm).invoke(INPUTS["messages"])
    streamed = summed(list(llm.stream(INPUTS["messages"])))
    assert plain.content == chained.content == streamed.content != ""
    assert len(handler.to_records()) == plain.response_metadata["specguard"]["num_steps"]
    inside = one_node_graph(sync_nodes(llm)["invoke"]).invoke(INPUTS)["messages"][-1]
    assert inside.content == plain.content
