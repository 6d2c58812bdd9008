"""Binding tools and schemas to calls (binding.py): tools and ``tool_choice`` are checked when bound, and
structured output reads the answer the way ``invoke`` and ``stream`` both agree on.

Where a specific answer is needed the text is scripted (:mod:`tests.scripted`); everything downstream of the
logits is the real code.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any, Literal

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel
from pydantic import Field as PydanticField
from pydantic.v1 import BaseModel as BaseModelV1
from pydantic.v1 import Field as FieldV1
from pydantic.v1 import validator

from langchain_specguard import ChatSpecGuard
from langchain_specguard.binding import ToolRequest
from tests.scripted import force_script
from tests.tiny_models import llama_pair
from tests.unit_tests.test_tool_calling import Answer, call_block, lookup, make_llm, scripted


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
    chat models return the JSON object the model wrote, as a dict. Since issue 29 item 2 decoding is constrained to a
    JSON object, so a model set on prose writes an object all the same."""
    llm = scripted('{"city": "Oslo", "number": 7}')
    out: Any = llm.with_structured_output(None, method="json_mode", include_raw=include_raw).invoke("JSON please.")
    parsed = out["parsed"] if include_raw else out
    assert parsed == {"city": "Oslo", "number": 7}
    streamed = list(llm.with_structured_output(None, method="json_mode").stream("JSON please."))
    assert streamed[-1] == parsed and len(streamed) > 1  # the object grows as it is written
    prose = scripted("Oslo, 7.")
    raw = prose.with_structured_output(None, method="json_mode", include_raw=True).invoke("JSON please.")["raw"]
    assert raw.content.startswith("{")
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


# --------------------------------------------------------------------------------------------------
# native structured output: response_format constrains decoding (engine/grammar.py), issue 29 item 2


class Pick(BaseModel):
    """Every value bounded: whatever the models, the constrained answer ends inside the budget."""

    number: int = PydanticField(ge=0, le=99)
    city: Literal["Oslo", "Paris"]


def test_json_schema_is_native_and_the_answer_is_the_schemas_whatever_the_model_prefers() -> None:
    """``method="json_schema"`` binds ``response_format`` (no forced tool call): the answer is the JSON itself, and
    decoding is masked by the schema's grammar, so models scripted to break it (a string for the number, a city
    outside the enum) still answer a valid ``Pick``. Before: a forced ``Pick`` tool call, parsed afterwards."""
    llm = scripted('{"number": 7, "city": "Oslo"}', max_tokens=60)
    out = llm.with_structured_output(Pick, method="json_schema", include_raw=True).invoke("A number and a city?")
    assert out["parsed"] == Pick(number=7, city="Oslo") and out["parsing_error"] is None
    raw = out["raw"]
    assert raw.tool_calls == [] and json.loads(raw.content) == {"number": 7, "city": "Oslo"}
    assert raw.response_metadata["finish_reason"] == "stop"
    stubborn = scripted('{"number": "many", "city": "Rome"}', max_tokens=60)
    answer = stubborn.with_structured_output(Pick, method="json_schema").invoke("A number and a city?")
    assert isinstance(answer, Pick)
    as_dict = stubborn.with_structured_output(Pick.model_json_schema(), method="json_schema").invoke("Again?")
    assert Pick.model_validate(as_dict) and isinstance(as_dict, dict)


def test_a_json_schema_stream_yields_the_object_growing_field_by_field() -> None:
    """Origin: issue 29 item 2: a dict-schema stream yielded one item at the end; ChatOpenAI and ChatOllama yield
    growing partial dicts (langchain-core's ``JsonOutputParser``). A JSON answer's steps end after each ``", "``,
    so each verified field reaches the stream as it is written; the last item is what ``invoke`` returns."""
    answer = {"number": 7, "city": "Oslo", "note": "a b c"}
    llm = scripted(json.dumps(answer), max_tokens=80)
    schema = {
        "title": "Note",
        "type": "object",
        "properties": {"number": {"type": "integer"}, "city": {"type": "string"}, "note": {"type": "string"}},
        "required": ["number", "city", "note"],
    }
    structured = llm.with_structured_output(schema, method="json_schema")
    streamed = list(structured.stream("Go."))
    assert streamed[-1] == answer == structured.invoke("Go.")
    assert [sorted(item) for item in streamed[:3]] == [["number"], ["city", "number"], ["city", "note", "number"]]
    for before, after in itertools.pairwise(streamed):
        assert all(after[k] == v or (isinstance(v, str) and after[k].startswith(v)) for k, v in before.items())


def test_an_answer_cut_short_is_a_parsing_error_not_a_partial_object() -> None:
    """``max_tokens`` running out mid-object: ``invoke`` says the answer is not complete JSON (langchain-core's
    parser alone would return the object read as far as it went)."""
    llm = scripted('{"number": 7, "city": "Oslo"}', max_tokens=8)
    out = llm.with_structured_output(Pick, method="json_schema", include_raw=True).invoke("A number and a city?")
    assert out["parsed"] is None and "not complete JSON" in str(out["parsing_error"])
    assert out["raw"].response_metadata["finish_reason"] == "length"
    with pytest.raises(OutputParserException, match="not complete JSON"):
        llm.with_structured_output(None, method="json_mode").invoke("JSON please.")


def test_response_format_per_call_in_every_shape_and_bad_ones_named() -> None:
    llm = scripted('{"number": 7, "city": "Oslo"}', max_tokens=60)
    expected = {"number": 7, "city": "Oslo"}
    schema = Pick.model_json_schema()
    for response_format in (
        Pick,
        {"type": "json_schema", "json_schema": {"name": "Pick", "schema": schema, "strict": True}},
        {"type": "json_object"},
    ):
        assert json.loads(str(llm.invoke("Go.", response_format=response_format).content)) == expected
    free = scripted("Oslo, 7.", max_tokens=20)
    assert free.invoke("Go.", response_format={"type": "text"}).content.startswith("Oslo, 7.")
    for bad, problem in [
        ({"type": "json_schema"}, "needs 'json_schema'"),
        ({"type": "json_schema", "json_schema": {"name": "X"}}, "JSON schema under 'schema'"),
        ({"type": "xml"}, "response_format must be"),
        ("json", "response_format must be"),
    ]:
        with pytest.raises(ValueError, match=problem):
            llm.invoke("Go.", response_format=bad)
        with pytest.raises(ValueError, match=problem):
            llm.bind_tools([echo], response_format=bad)


def test_a_schema_the_grammar_library_cannot_compile_fails_at_bind_time_and_the_model_stays_usable() -> None:
    llm = scripted("Oslo.", max_tokens=60)
    bad = {"title": "Broken", "type": "object", "properties": {"when": {"type": "string", "pattern": "(unclosed"}}}
    with pytest.raises(
        ValueError, match=r"(?s)JSON schema 'Broken' cannot be used for constrained decoding: .*unclosed"
    ):
        llm.with_structured_output(bad, method="json_schema")
    with pytest.raises(ValueError, match="cannot be used for constrained decoding"):
        llm.bind_tools([echo], response_format={"type": "json_schema", "json_schema": {"name": "B", "schema": bad}})
    assert llm.invoke("Go.").content == "Oslo."
    assert llm.with_structured_output(Pick, method="json_schema").invoke("Go.")


def test_without_the_grammar_library_the_error_names_the_extra_and_agents_keep_the_tool_strategy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from langchain_specguard.pairs import model_profile

    llm = scripted("Oslo.", max_tokens=6)
    monkeypatch.setitem(sys.modules, "llguidance", None)
    fresh = {"title": "Fresh", "type": "object", "properties": {"unseen": {"type": "boolean"}}}  # (not cached)
    with pytest.raises(ImportError, match=r"pip install 'langchain-specguard\[structured\]'"):
        llm.with_structured_output(fresh, method="json_schema")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llguidance" else real(name, *a))
    assert model_profile(None)["structured_output"] is False  # create_agent then picks ToolStrategy
    monkeypatch.undo()
    assert model_profile(None)["structured_output"] is True
    assert model_profile(None, served=True)["structured_output"] is False  # a served target is not masked
    assert llm.profile is not None and llm.profile["structured_output"] is True


def agent_script(prompt: str) -> str:
    """The lookup call first; once its result is in the prompt, the JSON answer."""
    if "<tool_response>\n" not in prompt:  # (a result block, not the system prompt's mention)
        return call_block("lookup", {"country": "France"})
    return json.dumps({"number": 1, "city": prompt.split("<tool_response>\n")[1].split("\n")[0]})


def test_create_agent_takes_the_provider_strategy_natively_with_and_without_tools() -> None:
    """Origin: issue 29 item 2: the profile said ``structured_output=False``, so ``create_agent(response_format=
    ProviderStrategy(Schema))`` was refused. Now ``bind_tools(..., response_format=...)`` constrains the answer to
    the JSON response or, with tools bound, to that or calls of the tools in the model's format, so the agent calls
    its tool, then answers in JSON; a plain ``Schema`` picks this strategy from the profile."""
    from langchain.agents import create_agent
    from langchain.agents.structured_output import ProviderStrategy

    class Capital(BaseModel):
        number: int = PydanticField(ge=0, le=9)
        city: Literal["Paris", "Oslo"]

    llm = scripted(json.dumps({"number": 2, "city": "Oslo"}), max_tokens=200)
    alone = create_agent(llm, response_format=ProviderStrategy(Capital))
    assert alone.invoke({"messages": [HumanMessage("Which?")]})["structured_response"] == Capital(number=2, city="Oslo")

    llm = make_llm()
    pair = llm.load()
    force_script(pair.draft, pair.tokenizer, agent_script)
    force_script(pair.target, pair.tokenizer, agent_script)
    for response_format in (Capital, ProviderStrategy(Capital)):
        state = create_agent(llm, tools=[lookup], response_format=response_format).invoke(
            {"messages": [HumanMessage("The capital of France?")]}
        )
        messages = state["messages"]
        assert [c["name"] for c in messages[1].tool_calls] == ["lookup"]
        assert isinstance(messages[2], ToolMessage) and messages[2].content == "Paris"
        assert state["structured_response"] == Capital(number=1, city="Paris")
        assert messages[-1].tool_calls == []


def test_the_answer_or_calls_grammar_reads_both_in_each_call_format() -> None:
    """With tools bound, ``response_format``'s grammar is the JSON answer or calls of the tools as the model's format
    writes them (several hermes blocks; JSON calls after ``"; "``), arguments held to each tool's schema; a tool
    whose schema the library cannot compile (``not``) is loosened to any object there (its calls are still checked
    against the schema, as every call is)."""
    from langchain_specguard.binding import response_grammar
    from langchain_specguard.engine.grammar import GrammarState
    from langchain_specguard.tools import HERMES, JSON_CALLS
    from tests.tiny_models import make_tokenizer

    odd = {
        "type": "function",
        "function": {
            "name": "odd",
            "description": "d",
            "parameters": {"type": "object", "properties": {"x": {"not": {}}}},
        },
    }
    tools = [convert_to_openai_tool(echo), odd]
    tokenizer = make_tokenizer()

    def reads(grammar: Any, text: str) -> bool:
        cursor = GrammarState(grammar, tokenizer, frozenset({tokenizer.eos_token_id})).cursor()
        cursor.push(tokenizer(text, add_special_tokens=False)["input_ids"])
        return not cursor.ended and cursor.matcher.is_accepting()

    hermes = response_grammar(Pick, tools, HERMES)
    assert hermes is not None and hermes.name == "Pick or a call of echo, odd"
    assert reads(hermes, '{"number": 7, "city": "Oslo"}')
    assert reads(hermes, call_block("echo", {"text": "hi"}) + "\n" + call_block("odd", {"x": [1]}))
    assert not reads(hermes, call_block("echo", {"text": 3}))  # against echo's schema
    assert not reads(hermes, '{"number": 7, "city": "Rome"}')
    assert not reads(hermes, "Oslo.")
    as_json = response_grammar(Pick, tools, JSON_CALLS)
    assert as_json is not None
    assert reads(as_json, '{"name": "echo", "parameters": {"text": "hi"}}; {"name": "odd", "parameters": {}}')
    assert reads(as_json, '{"number": 7, "city": "Paris"}')
    assert not reads(as_json, call_block("echo", {"text": "hi"}))  # hermes blocks are not this format's calls


def test_native_structured_output_with_a_pydantic_v1_model_returns_an_instance_of_it() -> None:
    """Item 3's rule holds for the native methods too: langchain-core's pydantic parser reads ``pydantic.v1``
    models, whose own validators run."""
    joke = {"setup": "Why?", "punchline": "Because."}
    llm = scripted(json.dumps(joke), max_tokens=80)
    answer = llm.with_structured_output(Joke, method="json_schema").invoke("Tell me a joke about cats.")
    assert isinstance(answer, Joke) and answer == Joke(**joke)
    unfinished = scripted(json.dumps({**joke, "punchline": "Because"}), max_tokens=80)
    with pytest.raises(OutputParserException, match="full stop"):
        unfinished.with_structured_output(Joke, method="json_schema").invoke("Tell me a joke about cats.")
