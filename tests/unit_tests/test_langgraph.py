"""LangGraph sees ChatSpecGuard's verified steps as they happen (``stream_mode="messages"``)."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from langchain_specguard import ChatSpecGuard
from tests.tiny_models import llama_pair

pytest.importorskip("langgraph")


def make_llm() -> ChatSpecGuard:
    target, draft = llama_pair()
    return ChatSpecGuard(
        model=target, draft_model=draft, max_tokens=20, max_step_tokens=4, step_delimiters=["\n"], seed=0
    )


def graph_of(llm: ChatSpecGuard, with_async_node: bool) -> Any:
    """START -> "sync" (invoke) [-> "async" (ainvoke)] -> END."""

    def call(state: MessagesState) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    async def acall(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("sync", call)
    builder.add_edge(START, "sync")
    if with_async_node:
        builder.add_node("async", acall)
        builder.add_edge("sync", "async")
        builder.add_edge("async", END)
    else:
        builder.add_edge("sync", END)
    return builder.compile()


def test_messages_mode_streams_one_chunk_per_step() -> None:
    graph = graph_of(make_llm(), with_async_node=False)
    inputs = {"messages": [HumanMessage("Hello there")]}
    got = [message for message, _ in graph.stream(inputs, stream_mode="messages")]
    answer = graph.invoke(inputs)["messages"][1]
    assert len(got) > 2  # a chunk per verified step, not one message at the end
    assert all(isinstance(c, AIMessageChunk) for c in got)
    assert "".join(str(c.content) for c in got) == answer.content
    assert {c.id for c in got} == {got[0].id}


async def test_messages_mode_streams_in_async_graphs() -> None:
    graph = graph_of(make_llm(), with_async_node=True)
    inputs = {"messages": [HumanMessage("Hello there")]}
    seen: dict[str, str] = {"sync": "", "async": ""}
    counts = {"sync": 0, "async": 0}
    async for message, metadata in graph.astream(inputs, stream_mode="messages"):
        seen[metadata["langgraph_node"]] += str(message.content)
        counts[metadata["langgraph_node"]] += 1
    final = (await graph.ainvoke(inputs))["messages"]
    assert seen == {"sync": final[1].content, "async": final[2].content}
    assert min(counts.values()) > 2


def test_create_agent_streams_steps() -> None:
    from langchain.agents import create_agent

    agent = create_agent(make_llm(), tools=[])
    chunks = [m for m, _ in agent.stream({"messages": [HumanMessage("Hello there")]}, stream_mode="messages")]
    assert sum(isinstance(c, AIMessageChunk) for c in chunks) > 2
