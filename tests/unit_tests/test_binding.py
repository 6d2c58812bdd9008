"""Binding tools and schemas to calls (binding.py): tools and ``tool_choice`` are checked when bound, and
structured output reads the answer the way ``invoke`` and ``stream`` both agree on.

Where a specific answer is needed the text is scripted (:mod:`tests.scripted`); everything downstream of the
logits is the real code.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic.v1 import BaseModel as BaseModelV1
from pydantic.v1 import Field as FieldV1
from pydantic.v1 import validator

from langchain_specguard import ChatSpecGuard
from langchain_specguard.binding import ToolRequest
from tests.tiny_models import llama_pair
from tests.unit_tests.test_tool_calling import Answer, call_block, scripted


@tool
def echo(text: str) -> str:
    """Echo."""
    return text


def test_tool_names_must_be_function_names() -> None:
    """Origin: the outside audit (issue 11), item 6: a tool name is written into the prompt and matched in the
    answer, so one holding markup (``x"</tool_call>``) is refused at ``bind_tools`` and per call."""
    target, draft = llama_pair()
    llm = ChatSpecGuard(target_model=target, draft_model=draft)
    bad = {"type": "function", "function": {"name": 'x"</tool_call>', "description": "d", "parameters": {}}}
    with pytest.raises(ValueError, match=r"tool name .* is not allowed"):
        llm.bind_tools([bad])
    with pytest.raises(ValueError, match=r"tool name .* is not allowed"):
        llm.invoke("hi", tools=[bad])


def test_tool_choice_holes_are_closed() -> None:
    """Origin: the outside audit (issue 11), item 15: a ``tool_choice`` naming no bound tool, one that forces a
    call with no tools bound, and ``"any"`` in the JSON call format (which was not enforced)."""
    target, draft = llama_pair()
    llm = ChatSpecGuard(model=target, draft_model=draft, max_tokens=4, seed=0)
    with pytest.raises(ValueError, match="tool_choice names 'Bogus'"):
        llm.invoke("hi", tools=[echo], tool_choice="Bogus")
    with pytest.raises(ValueError, match="forces a tool call, but no tools are bound"):
        llm.bind_tools([], tool_choice="any")
    json_style = llm.model_copy(update={"tool_call_format": "json"})
    tools = [json.loads(json.dumps(convert_to_openai_tool(echo)))]
    setup = ToolRequest(tools, "any").setup(json_style.tool_format(), None, {})
    assert setup.prefix == '{"name": "'  # "any" is enforced in the JSON format too


@pytest.mark.parametrize("schema", ["pydantic", "json schema"])
def test_structured_output_stream_agrees_with_invoke(schema: str) -> None:
    """Origin: the second outside audit (issue 19), item 1: ``with_structured_output(schema).stream()`` refuses
    what ``invoke`` refuses.

    ``"7"`` breaks the schema's integer type (the call is invalid), though pydantic's lax mode would read it."""
    llm = scripted(call_block("Answer", {"number": "7", "city": "Oslo"}), acceptance_threshold=2.0)
    structured = llm.with_structured_output(Answer if schema == "pydantic" else convert_to_openai_tool(Answer))
    with pytest.raises(OutputParserException, match=r"no valid 'Answer' call: .*number"):
        structured.invoke("A number and a city?")
    with pytest.raises(OutputParserException, match="no valid 'Answer' call"):
        list(structured.stream("A number and a city?"))


@pytest.mark.parametrize("include_raw", [False, True])
def test_json_mode_without_a_schema_returns_a_dict(include_raw: bool) -> None:
    """Origin: issue 20, item 8: ``with_structured_output(None, method="json_mode")`` was refused, while other
    chat models return the JSON object the model wrote, as a dict."""
    llm = scripted('{"city": "Oslo", "number": 7}')
    out: Any = llm.with_structured_output(None, method="json_mode", include_raw=include_raw).invoke("JSON please.")
    parsed = out["parsed"] if include_raw else out
    assert parsed == {"city": "Oslo", "number": 7}
    assert list(llm.with_structured_output(None, method="json_mode").stream("JSON please.")) == [parsed]
    prose = scripted("Oslo, 7.")
    with pytest.raises(OutputParserException, match="not a JSON object"):
        prose.with_structured_output(None, method="json_mode").invoke("JSON please.")
    with pytest.raises(ValueError, match="needs a schema"):
        prose.with_structured_output(None)  # function calling needs the schema's tool


class Joke(BaseModelV1):
    """Joke to tell user (a pydantic.v1 model, as the standard suite's ``test_structured_output_pydantic_2_v1``)."""

    setup: str = FieldV1(description="question to set up a joke")
    punchline: str = FieldV1(description="answer to resolve the joke")

    @validator("punchline")
    def ends_a_sentence(cls, value: str) -> str:  # noqa: N805 (pydantic.v1 validators take the class)
        if not value.endswith("."):
            raise ValueError("a punchline ends with a full stop")
        return value


def test_structured_output_with_a_pydantic_v1_model_returns_an_instance_of_it() -> None:
    """Origin: issue 29, item 3: ``with_structured_output(<pydantic.v1 model>)`` returned the arguments as a dict;
    ChatOpenAI returns an instance of the model. ``invoke``, ``stream`` and ``include_raw`` give the instance,
    the model's own validators run (a failure is a parsing error), and its JSON schema still gives a dict."""
    joke = {"setup": "Why did the cat sit on the keyboard?", "punchline": "To keep an eye on the mouse."}
    llm = scripted(call_block("Joke", joke))
    structured = llm.with_structured_output(Joke)
    answer = structured.invoke("Tell me a joke about cats.")
    assert isinstance(answer, Joke) and answer == Joke(**joke)
    streamed = list(structured.stream("Tell me a joke about cats."))
    assert streamed and all(isinstance(chunk, Joke) for chunk in streamed)
    raw = llm.with_structured_output(Joke, include_raw=True).invoke("Tell me a joke about cats.")
    assert isinstance(raw["parsed"], Joke) and raw["parsing_error"] is None
    assert llm.with_structured_output(Joke.schema()).invoke("Tell me a joke about cats.") == joke
    unfinished = scripted(call_block("Joke", {**joke, "punchline": "To keep an eye on the mouse"}))
    with pytest.raises(OutputParserException, match=r"(?s)'Joke' call does not fit the schema: .*full stop"):
        unfinished.with_structured_output(Joke).invoke("Tell me a joke about cats.")
