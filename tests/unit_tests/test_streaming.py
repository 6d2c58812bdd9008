"""One call's path from verified steps to chunks to the final message (streaming.py).

The sum of the chunks is the message ``invoke`` returns, on every path (``stream``, ``astream``, the chunks
``invoke`` hands to streaming callbacks), and the content shown while streaming is always a prefix of the final
content: tool-call text, and the start of a marker that may open one, never show.

Where a specific answer is needed the text is scripted (:mod:`tests.scripted`); everything downstream of the
logits is the real code.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage

from tests.scripted import scripted_llm
from tests.tiny_models import long_llama_pair
from tests.unit_tests.test_tool_calling import call_block, lookup, scripted


def summed(chunks: list[Any]) -> AIMessageChunk:
    """LangChain's documented way to read a stream: add the chunks up."""
    total: AIMessageChunk = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


class ChunkCatcher(BaseCallbackHandler):
    """What ``invoke`` hands to streaming handlers (LangGraph's ``stream_mode="messages"`` reads these)."""

    def __init__(self) -> None:
        self.chunks: list[AIMessageChunk] = []

    def on_llm_new_token(self, token: str, *, chunk: Any = None, **kwargs: Any) -> None:
        self.chunks.append(chunk.message)


def calls(message: BaseMessage, ids: bool) -> tuple[list[Any], list[Any]]:
    """A message's tool calls and invalid tool calls (errors aside: chunks cannot carry them); call ids are
    compared within one generation only (each generation names its calls afresh)."""
    assert isinstance(message, AIMessage)
    valid = [(c["name"], c["args"], c["id"] if ids else None) for c in message.tool_calls]
    invalid = [(c["name"], c["args"], c["id"] if ids else None) for c in message.invalid_tool_calls]
    return valid, invalid


# --------------------------------------------------------------------------------------------------
# rejected tool calls must not come back when streamed chunks are summed

TWO_JSON_CALLS = json.dumps([{"name": "lookup", "parameters": {"country": c}} for c in ("France", "Japan")])
RESURRECTION_CASES = {
    "schema-invalid": (call_block("lookup", {"country": 7}), {}, {}),
    "unbound tool": (call_block("delete_all_files", {"path": "/"}), {}, {}),
    "refused by parallel_tool_calls=False": (TWO_JSON_CALLS, {"tool_call_format": "json"}, {"parallel": False}),
    "cut by a stop sequence": (call_block("lookup", {"country": "Japan"}), {}, {"stop": ["Jap"]}),
}


@pytest.mark.parametrize("case", list(RESURRECTION_CASES))
async def test_invalid_tool_calls_stay_invalid_when_streamed_chunks_are_summed(case: str) -> None:
    """Origin: the second outside audit (issue 19), item 1. Summing ``stream()``/``astream()`` chunks (or the
    chunks ``invoke`` hands to streaming callbacks) gives the message ``invoke`` returns: an invalid call stays
    invalid, never a tool call."""
    answer, options, binding = RESURRECTION_CASES[case]
    llm = scripted(answer, acceptance_threshold=2.0, **options)
    bound = llm.bind_tools([lookup], parallel_tool_calls=binding.get("parallel"), stop=binding.get("stop"))
    catcher = ChunkCatcher()
    invoked = bound.invoke("Capital?", config={"callbacks": [catcher]})
    assert invoked.invalid_tool_calls and all(c["error"] for c in invoked.invalid_tool_calls)
    streams = {
        "stream": summed(list(bound.stream("Capital?"))),
        "astream": summed([c async for c in bound.astream("Capital?")]),
        "invoke's callbacks": summed(catcher.chunks),
    }
    for path, total in streams.items():
        same_generation = path == "invoke's callbacks"
        assert calls(total, same_generation) == calls(invoked, same_generation), path
        assert total.content == invoked.content, path


def test_streamed_content_never_shows_part_of_a_tool_call() -> None:
    """Origin: the outside audit (issue 11), item 3. With 4-token steps the marker ``<tool_call>`` arrives in
    pieces; no piece of it (nor of the call after it) is ever shown as content."""
    call = '<tool_call>\n{"name": "lookup", "arguments": {"country": "France"}}\n</tool_call>'
    llm = scripted_llm(long_llama_pair(), "ab" + call, max_step_tokens=4, max_tool_call_tokens=120, max_tokens=150)
    bound = llm.bind_tools([lookup])
    final = bound.invoke("Where?")
    assert final.content == "ab" and final.tool_calls[0]["args"] == {"country": "France"}
    shown = ""
    for chunk in bound.stream("Where?"):
        shown += str(chunk.content)
        assert final.content.startswith(shown), shown
        assert "<" not in shown
