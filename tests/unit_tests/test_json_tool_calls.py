"""Bare JSON tool calls (Llama 3.x) as verified steps, and the schema-aware vote among draft candidates.

The pair speaks a Llama-3-style tokenizer and chat template (``tests.tiny_models.llama3_pair``): tools
go through the template, the model answers ``{"name": ..., "parameters": ...}`` and ends the turn with
``<|eom_id|>``. The text is scripted (:func:`tests.scripted.force_script`, per candidate row where the
vote is tested); drafting, step boundaries, scoring, schema checks, the vote, the target's fallback,
parsing and streaming are the real code.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel
from transformers import AutoTokenizer

from langchain_specguard import ChatSpecGuard
from langchain_specguard.engine.decoding import CallOptions, generate
from langchain_specguard.tools import step_validator
from tests.scripted import force_script
from tests.tiny_models import LLAMA3_HEADER, llama3_pair
from tests.unit_tests.test_tool_calling import Collector, call_block, make_llm, scripted


@tool
def lookup(country: str) -> str:
    """Look up the capital of a country."""
    return {"france": "Paris", "japan": "Tokyo"}.get(country.lower(), "unknown")


def json_call(name: str, args: dict[str, Any]) -> str:
    return json.dumps({"name": name, "parameters": args})


def make_json_llm(**overrides: Any) -> ChatSpecGuard:
    target, draft = llama3_pair()
    params: dict[str, Any] = {
        "target_model": target,
        "draft_model": draft,
        "max_tokens": 200,
        "max_step_tokens": 24,
        "max_tool_call_tokens": 160,
        "n_candidates": 2,
        "acceptance_threshold": -1.0,  # the scores accept every draft step: what is rejected, the schema rejects
        "seed": 0,
    }
    params.update(overrides)
    # a tokenizer object of its own: a pair of its own, so scripting its models reaches no other test
    llm = ChatSpecGuard(**params, tokenizer=AutoTokenizer.from_pretrained(target))
    llm.load()
    return llm


def script(llm: ChatSpecGuard, draft: str | list[str], target: str | list[str]) -> None:
    pair = llm.load()
    force_script(pair.draft, pair.tokenizer, lambda prompt: draft, LLAMA3_HEADER, "<|eom_id|>")
    force_script(pair.target, pair.tokenizer, lambda prompt: target, LLAMA3_HEADER, "<|eom_id|>")


def test_the_llama3_style_template_renders_and_reads_json_calls() -> None:
    llm = make_json_llm()
    assert llm.template_profile().native_tools and llm.tool_format().name == "json"
    history = [
        HumanMessage("Capital of France?"),
        AIMessage("", tool_calls=[{"name": "lookup", "args": {"country": "France"}, "id": "c1"}]),
        ToolMessage("Paris", tool_call_id="c1"),
    ]
    text = llm.load().tokenizer.decode(llm.render_prompt(history, [convert_to_openai_tool(lookup)]))
    assert f"{LLAMA3_HEADER}{json_call('lookup', {'country': 'France'})}<|eom_id|>" in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\nParis<|eot_id|>" in text and text.endswith(LLAMA3_HEADER)


def test_a_json_call_is_one_verified_step() -> None:
    """Delimiters inside the call ("\\n", ", ", braces in a string) do not cut it: it ends at its balancing brace.

    The answer starts with Llama's ``<|python_tag|>`` control token, which is not part of the text.
    """
    llm = make_json_llm(step_delimiters=["\n", ", "])
    call = '{"name": "lookup",\n "parameters": {"country": "France {the one}, ok"}}'
    script(llm, "<|python_tag|>" + call, "<|python_tag|>" + call)
    collector = Collector()
    message = llm.bind_tools([lookup]).invoke("Capital of France?", config={"callbacks": [collector]})
    first, *rest = collector.steps
    assert (first["kind"], first["text"], first["source"], first["reason"]) == ("tool_call", call, "draft", "accepted")
    assert first["call_candidates"] == first["valid_call_candidates"] == 2  # both candidates checked, both fit
    assert [(s["kind"], s["text"], s["finish_reason"]) for s in rest] == [("text", "", "stop")]  # <|eom_id|>
    assert message.content == "" and not message.invalid_tool_calls
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("lookup", {"country": "France {the one}, ok"})]
    assert message.response_metadata["finish_reason"] == "tool_calls"


def test_a_schema_invalid_json_draft_call_is_rejected_and_the_target_writes_it() -> None:
    llm = make_json_llm()
    bad, good = json_call("lookup", {"country": 7}), json_call("lookup", {"country": "Japan"})
    script(llm, bad, good)
    collector = Collector()
    message = llm.bind_tools([lookup]).invoke("Capital of Japan?", config={"callbacks": [collector]})
    first = collector.steps[0]
    assert first["draft_text"] == bad and first["text"] == good
    assert first["kind"] == "tool_call" and first["source"] == "target"
    assert first["reason"] == "schema" and not first["accepted"]
    assert "$.country: expected string" in first["detail"]
    assert (first["call_candidates"], first["valid_call_candidates"]) == (2, 0)  # no candidate fits: the target
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("lookup", {"country": "Japan"})]
    assert not message.invalid_tool_calls


class Answer(BaseModel):
    """A number and a city."""

    number: int
    city: str


def test_a_forced_json_call_is_checked_as_a_step() -> None:
    """Structured output starts the answer inside the call; the step that closes it is schema-checked."""
    llm = make_json_llm()
    bad = json_call("Answer", {"number": "many", "city": "Oslo"})
    good = json_call("Answer", {"number": 7, "city": "Oslo"})
    script(llm, bad, good)
    collector = Collector()
    out = llm.with_structured_output(Answer).invoke("A number and a city?", config={"callbacks": [collector]})
    assert out == Answer(number=7, city="Oslo")
    first = collector.steps[0]
    assert (first["kind"], first["reason"], first["source"]) == ("tool_call", "schema", "target")
    assert first["text"] == good.removeprefix('{"name": "Answer", "parameters": ')  # the prompt held the rest


@pytest.mark.parametrize("call_cap", [160, 8])
async def test_streamed_json_calls_never_show_in_content(call_cap: int) -> None:
    """Parallel calls ("; ") stream no content at all, also when the token cap cuts a call over several steps."""
    llm = make_json_llm(max_tool_call_tokens=call_cap, step_delimiters=["\n", " "])
    calls = [{"country": "France"}, {"country": "Japan"}]
    answer = "; ".join(json_call("lookup", args) for args in calls)
    script(llm, answer, answer)
    bound = llm.bind_tools([lookup])
    invoked = await bound.ainvoke("Capitals?")
    collector = Collector()
    chunks = [chunk async for chunk in bound.astream("Capitals?", config={"callbacks": [collector]})]
    assert [c.content for c in chunks] == [""] * len(chunks)  # not one character of a call
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert [c["args"] for c in merged.tool_calls] == [c["args"] for c in invoked.tool_calls] == calls
    assert merged.content == invoked.content == ""
    steps = collector.steps
    assert "".join(s["text"] for s in steps) == answer
    assert all(s["kind"] == "tool_call" and s["reason"] == "accepted" for s in steps[:-1])
    if call_cap == 160:  # one step per call; the second call's step starts with the separator
        assert [s["text"] for s in steps] == [json_call("lookup", calls[0]), "; " + json_call("lookup", calls[1]), ""]
    else:  # cut by the cap: several steps per call, and only the step that closes a call is schema-checked
        assert len(steps) > 3 and sum(s["call_candidates"] > 0 for s in steps) == 2


@pytest.mark.parametrize(
    "answer",
    [
        'The set {"name": 1} has one key.\n\nSo {"name": "lookup", "parameters": {}} is prose here.',
        '{"answer": 4} is a JSON answer, not a call.\n\nDone.',
    ],
)
def test_braces_in_prose_are_not_call_steps(answer: str) -> None:
    """Only JSON that opens the answer with a "name" key is a call: these answers step exactly as plain text does."""
    llm = make_json_llm(step_delimiters=["\n\n"])
    script(llm, answer, answer)
    pair, tools = llm.load(), [convert_to_openai_tool(lookup)]
    prompt = llm.render_prompt([HumanMessage("Tell me.")], tools)
    checked = CallOptions(validate_step=step_validator(tools, "json"))
    as_calls = generate(pair, prompt, llm.engine_params(json_tool_calls=True), checked)
    plain = generate(pair, prompt, llm.engine_params())
    assert [(s.kind, s.text) for s in as_calls.steps] == [(s.kind, s.text) for s in plain.steps]
    assert {s.kind for s in as_calls.steps} == {"text"} and as_calls.text == answer
    assert all(s.call_candidates == 0 for s in as_calls.steps)
    message = llm.bind_tools([lookup]).invoke("Tell me.")
    assert message.content == answer and not message.tool_calls and not message.invalid_tool_calls
    chunks = list(llm.bind_tools([lookup]).stream("Tell me."))
    assert chunks[0].content == as_calls.steps[0].text != ""  # shown as each step commits, not held back
    assert "".join(str(c.content) for c in chunks) == answer


@pytest.mark.parametrize("style", ["hermes", "json"])
def test_the_vote_prefers_a_schema_valid_candidate(style: str) -> None:
    """Candidates 0 and 2 agree on a broken call, candidate 1 writes one that fits: the vote keeps candidate 1."""
    if style == "json":
        llm, write = make_json_llm(n_candidates=3), json_call
    else:
        llm, write = make_llm(n_candidates=3, acceptance_threshold=-1.0), call_block
    bad, good = write("lookup", {"country": 1234567}), write("lookup", {"country": "Japan"})
    assert len(bad) == len(good)  # the rows stay in step after the call
    pair, tools = llm.load(), [convert_to_openai_tool(lookup)]
    header, end = (LLAMA3_HEADER, "<|eom_id|>") if style == "json" else ("<|im_start|>assistant\n", "<|im_end|>")
    force_script(pair.draft, pair.tokenizer, lambda prompt: [bad, good, bad], header, end)
    force_script(pair.target, pair.tokenizer, lambda prompt: bad, header, end)  # a rejected step would stay bad
    prompt = llm.render_prompt([HumanMessage("Capital of Japan?")], tools)
    markers = {"tool_call_markers": ("<tool_call>", "</tool_call>")} if style == "hermes" else {"json_tool_calls": True}
    params = llm.engine_params(**markers)

    unchecked = generate(pair, prompt, params)  # without a schema the medoid is the broken call two rows agree on
    assert unchecked.steps[0].draft_text.strip() == bad

    checked = generate(pair, prompt, params, CallOptions(validate_step=step_validator(tools, style)))  # type: ignore[arg-type]
    first = checked.steps[0]
    assert first.draft_text.strip() == good and first.source == "draft" and first.accepted
    assert (first.kind, first.call_candidates, first.valid_call_candidates) == ("tool_call", 3, 1)
    assert checked.text.strip() == good

    message = llm.bind_tools([lookup]).invoke("Capital of Japan?")
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("lookup", {"country": "Japan"})]


def test_the_json_format_with_the_fallback_prompt_prompts_for_json_calls() -> None:
    """Origin: issue 21, item 4: with ``tool_call_format="json"`` and a template that ignores tools (ChatML here,
    not the Llama-3 pair), the fallback prompt asked for ``<tool_call>`` blocks and wrote past calls as such,
    while the answer was read as bare JSON (a model that followed the prompt had its calls taken for text).
    Prompt, history and parsing now agree."""
    llm = scripted('{"name": "lookup", "parameters": {"country": "Japan"}}', tool_call_format="json")
    history = [
        HumanMessage("Capital of France?"),
        AIMessage("", tool_calls=[{"name": "lookup", "args": {"country": "France"}, "id": "c1"}]),
        ToolMessage("Paris", tool_call_id="c1"),
        HumanMessage("And Japan?"),
    ]
    text = llm.load().tokenizer.decode(llm.render_prompt(history, [convert_to_openai_tool(lookup)]))
    assert '{"name": "<tool name>", "parameters": {<arguments as a JSON object>}}' in text
    assert '<|im_start|>assistant\n{"name": "lookup", "parameters": {"country": "France"}}<|im_end|>' in text
    assert "<tool_call>" not in text
    message = llm.bind_tools([lookup]).invoke(history)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("lookup", {"country": "Japan"})]
