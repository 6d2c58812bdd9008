"""Tool-call formats, parsing and schema validation (tools.py) on template-shaped outputs, plus a fuzz test."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field

from langchain_specguard.engine import SpecGuardParams
from langchain_specguard.engine.steps import (
    CallStep,
    JsonCalls,
    MarkerCalls,
    is_tool_call_step,
    json_end,
    json_region,
    marker_split,
    open_call_start,
    tool_step_complete,
)
from langchain_specguard.tools import (
    FORMATS,
    HERMES_MARKERS,
    JSON_CALLS,
    fallback_tool_prompt,
    parse_tool_calls,
    schema_errors,
    step_validator,
    tools_by_name,
    validate_tool_call,
)


class Weather(BaseModel):
    """Current weather for a city."""

    city: str
    unit: Literal["celsius", "fahrenheit"] = "celsius"
    days: list[int] = Field(default_factory=list)


def search(query: str, limit: int = 5) -> str:
    """Search the web."""
    return query


@tool
def scale(factor: float) -> str:
    """Scale by a factor."""
    return str(factor * 2)


TOOLS = [convert_to_openai_tool(Weather), convert_to_openai_tool(search)]
SCHEMAS = tools_by_name(TOOLS)

# What Qwen2.5-Instruct writes through its chat template (Hermes style), text around the call.
QWEN_OUTPUT = (
    "I'll check the weather first.\n"
    '<tool_call>\n{"name": "Weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "search", "arguments": {"query": "Paris events", "limit": 3}}\n</tool_call>'
)
# Llama 3.1/3.2 with custom tools: the whole answer is a JSON object with "parameters".
LLAMA_OUTPUT = '{"name": "search", "parameters": {"query": "nested {braces} and \\"quotes\\"", "limit": 2}}'
# Gemma / Llama sometimes fence the JSON.
FENCED_OUTPUT = '```json\n{"name": "Weather", "parameters": {"city": "Oslo"}}\n```'


def test_hermes_calls_and_content() -> None:
    parsed = parse_tool_calls(QWEN_OUTPUT)
    assert parsed.content == "I'll check the weather first.\n\n"
    assert [c["name"] for c in parsed.tool_calls] == ["Weather", "search"]
    assert parsed.tool_calls[0]["args"] == {"city": "Paris", "unit": "celsius"}
    assert parsed.tool_calls[1]["args"] == {"query": "Paris events", "limit": 3}
    assert len({c["id"] for c in parsed.tool_calls}) == 2 and all(c["id"] for c in parsed.tool_calls)
    assert parsed.invalid_tool_calls == []


def test_llama_json_style_with_nested_strings() -> None:
    parsed = parse_tool_calls(LLAMA_OUTPUT)
    assert parsed.content == ""
    assert parsed.tool_calls[0]["name"] == "search"
    assert parsed.tool_calls[0]["args"] == {"query": 'nested {braces} and "quotes"', "limit": 2}
    python_tag = parse_tool_calls("<|python_tag|>" + LLAMA_OUTPUT, "json")
    assert python_tag.tool_calls[0]["args"]["limit"] == 2


def test_fenced_json_and_lists_of_calls() -> None:
    assert parse_tool_calls(FENCED_OUTPUT).tool_calls[0]["args"] == {"city": "Oslo"}
    both = parse_tool_calls(json.dumps([{"name": "a", "arguments": {}}, {"name": "b", "parameters": {"x": 1}}]))
    assert [(c["name"], c["args"]) for c in both.tool_calls] == [("a", {}), ("b", {"x": 1})]


def test_arguments_given_as_a_json_string() -> None:
    text = '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"x\\"}"}</tool_call>'
    assert parse_tool_calls(text).tool_calls[0]["args"] == {"query": "x"}


def test_plain_text_and_plain_json_are_content() -> None:
    assert parse_tool_calls("The answer is 4.").content == "The answer is 4."
    data = '{"answer": 4}'
    parsed = parse_tool_calls(data)
    assert parsed.content == data and not parsed.tool_calls and not parsed.invalid_tool_calls


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('<tool_call>{"name": "search", "arguments": {"query": "x"</tool_call>', "not valid JSON"),
        ('<tool_call>{"name": "search", "arguments": {"query": "x"}}', "unterminated"),  # truncated
        ("<tool_call>[1, 2]</tool_call>", "JSON object"),
        ('<tool_call>{"arguments": {}}</tool_call>', '"name"'),
        ('<tool_call>{"name": "search", "arguments": [1]}</tool_call>', "arguments must be"),
        ('<tool_call>{"name": "search", "arguments": "{oops"}</tool_call>', "arguments are a string"),
        ("<tool_call>" + "[" * 5000 + "]" * 5000 + "</tool_call>", "nested deeper"),
        ('{"name": "search", "parameters": {"query": ', "not valid JSON"),  # truncated Llama call
    ],
)
def test_malformed_calls_become_invalid_tool_calls(text: str, error: str) -> None:
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == []
    assert len(parsed.invalid_tool_calls) == 1
    bad = parsed.invalid_tool_calls[0]
    assert error in str(bad["error"])
    assert bad["id"] and isinstance(bad["args"], str)


def test_a_good_call_survives_a_bad_one_next_to_it() -> None:
    text = '<tool_call>{"name": "search", "arguments": {"query": "a"}}</tool_call><tool_call>{bad}</tool_call>'
    parsed = parse_tool_calls(text)
    assert [c["name"] for c in parsed.tool_calls] == ["search"]
    assert len(parsed.invalid_tool_calls) == 1


def test_schema_validation() -> None:
    ok = parse_tool_calls(QWEN_OUTPUT).tool_calls
    assert [validate_tool_call(c, SCHEMAS) for c in ok] == [None, None]

    def reason(name: str, args: dict) -> str | None:
        return validate_tool_call({"name": name, "args": args, "id": "x", "type": "tool_call"}, SCHEMAS)

    assert "unknown tool 'weather'" in str(reason("weather", {"city": "x"}))
    assert "missing required property 'city'" in str(reason("Weather", {}))
    assert "not one of" in str(reason("Weather", {"city": "x", "unit": "kelvin"}))
    assert "$.days[1]: expected integer" in str(reason("Weather", {"city": "x", "days": [1, "two"]}))
    assert "$.limit: expected integer" in str(reason("search", {"query": "x", "limit": True}))
    assert reason("search", {"query": "x", "limit": 2.0}) is None  # JSON has one number type


def test_schema_subset_keywords() -> None:
    optional = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert schema_errors(None, optional) == [] and schema_errors("a", optional) == []
    assert schema_errors(3, optional)
    closed = {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False}
    assert "unexpected property 'b'" in schema_errors({"a": "x", "b": 1}, closed)[0]
    assert schema_errors(5, {"type": "number", "minimum": 6})
    assert schema_errors("ab", {"type": "string", "maxLength": 1})
    assert schema_errors(1, {"$ref": "#/defs/x"}) == []  # outside the subset: not checked, not rejected


def test_step_validator_reads_one_tool_call_step() -> None:
    validate = step_validator(TOOLS)
    assert validate('<tool_call>\n{"name": "search", "arguments": {"query": "q"}}\n</tool_call>') is None
    assert "unknown tool" in str(validate('<tool_call>{"name": "nope", "arguments": {}}</tool_call>'))
    assert "not valid JSON" in str(validate("<tool_call>{nope</tool_call>"))
    assert "unterminated" in str(validate('<tool_call>{"name": "search"'))
    assert "no <tool_call>" in str(validate("just text"))


def test_tool_call_step_boundaries() -> None:
    markers = HERMES_MARKERS
    assert is_tool_call_step("\n<tool_call>\n{", markers)
    assert is_tool_call_step("<tool", markers)  # may still become one: no delimiter may end it
    assert not is_tool_call_step("Let me see.", markers)
    assert is_tool_call_step('"x"}}', markers, continues_call=True)
    assert not tool_step_complete('<tool_call>\n{"a":\n\n1}', markers)
    assert tool_step_complete('<tool_call>{"a": 1}</tool_call>', markers)
    assert tool_step_complete("1}}</tool_call>", markers, continues_call=True)
    assert marker_split("Sure. <tool_call>", markers) == 6
    assert marker_split("  <tool_call>", markers) is None
    assert open_call_start("a <tool_call> {", markers) == 2
    assert open_call_start("<tool_call>{}</tool_call> done", markers) is None


def test_json_end_matches_brackets_outside_strings() -> None:
    assert json_end('{"a": "}"} tail', 0) == len('{"a": "}"}')
    nested = '{"a": "\\"}", "b": [1, {"c": "]["}]}'
    assert json_end(nested + "; more", 0) == len(nested)
    assert json_end('{"a": [1, 2}', 0) is None  # still open (whether it is valid JSON is the validator's question)
    assert json_end('x [{"name": "a"}, {"name": "b"}]', 2) == len('x [{"name": "a"}, {"name": "b"}]')


A = '{"name": "a", "parameters": {"q": "}{"}}'
B = '{"name": "b", "parameters": {}}'


@pytest.mark.parametrize(
    ("text", "calls", "content", "growing"),
    [
        (A, [A], "", True),  # after a call another may still follow
        (f"  <|python_tag|>{A}", [A], "", True),
        (f"{A}; {B}", [A, B], "", True),  # Llama's parallel calls
        (f"{A}\n\nThe capital is Paris.", [A], "The capital is Paris.", False),
        (f"```json\n{A}\n```", [A], "", True),
        (f"[{A}, {B}]", [f"[{A}, {B}]"], "", True),  # a list of calls is one value
        ('{ "name" : "a"}', ['{ "name" : "a"}'], "", True),
        ('The set {"name": 1}.', [], 'The set {"name": 1}.', False),  # JSON in prose is never a call
        ('{"answer": 4}', [], '{"answer": 4}', False),
        ('{"parameters": {}, "name": "a"}', [], '{"parameters": {}, "name": "a"}', False),  # "name" comes first
        ('{"na', [], '{"na', True),  # may still become a call
        ("<|pyth", [], "<|pyth", True),
        ("```python\nprint(1)\n```", [], "```python\nprint(1)\n```", False),
    ],
)
def test_json_calls_open_the_answer(text: str, calls: list[str], content: str, growing: bool) -> None:
    region = json_region(text)
    assert [text[a:b] for a, b in region.spans] == calls and region.growing == growing
    parsed = parse_tool_calls(text, "json")
    assert parsed.content == content
    assert len(parsed.tool_calls) == sum(len(json.loads(c)) if c.startswith("[") else 1 for c in calls)


def test_json_parallel_calls_and_broken_ones() -> None:
    parsed = parse_tool_calls('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"x": 1}}')
    assert [(c["name"], c["args"]) for c in parsed.tool_calls] == [("a", {}), ("b", {"x": 1})]
    cut = parse_tool_calls('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": ', "json")
    assert [c["name"] for c in cut.tool_calls] == ["a"] and "not valid JSON" in str(cut.invalid_tool_calls[0]["error"])
    broken = parse_tool_calls('{"name": "a", "parameters": {1}}', "json")
    assert not broken.tool_calls and broken.invalid_tool_calls[0]["args"] == '{"name": "a", "parameters": {1}}'


def test_json_call_steps() -> None:
    """What the engine's step rules read: a call is one step from its brace to the one that balances it."""
    calls = JsonCalls()
    calls.begin("")
    assert calls.read("\n{") == CallStep(True, True, False, "{")  # the start of a call: no delimiter may end it
    assert calls.read("  ") == CallStep(False, True, False, "")  # blank: may still become a call
    assert calls.read(A + " and") == CallStep(True, True, True, A)
    assert calls.read("Hello {") == CallStep(False, False, False, "")
    calls.begin('{"name": "a", "parameters": {"q": ')  # a call cut by the token cap (or a forced prefix)
    assert calls.read("1}} ") == CallStep(True, True, True, '{"name": "a", "parameters": {"q": 1}}')
    calls.begin(A)
    assert calls.read(f"; {B}") == CallStep(True, True, True, B)
    calls.begin("Sure.\n\n")  # the answer began with text: no JSON after it is a call
    assert calls.read(B) == CallStep(False, False, False, "")


def test_json_step_validator() -> None:
    validate = step_validator(TOOLS, "json")
    assert validate('{"name": "search", "parameters": {"query": "q"}}') is None
    both = '[{"name": "search", "parameters": {"query": "q"}}, {"name": "Weather", "parameters": {}}]'
    assert "missing required property 'city'" in str(validate(both))
    assert "not valid JSON" in str(validate('{"name": "search", "parameters": {"query": '))
    assert "unknown tool" in str(validate('{"name": "nope", "parameters": {}}'))


def test_fallback_prompt_lists_every_tool() -> None:
    block = fallback_tool_prompt(TOOLS)
    assert '"name": "Weather"' in block and '"name": "search"' in block and "<tool_call>" in block


ALPHABET = st.sampled_from(
    ['<tool_call>', '</tool_call>', '{', '}', '[', ']', '"', '"name"', '"arguments"', '"parameters"', ":", ",",
     "\\", "```", "<|python_tag|>", " ", "\n", "1e999", "-", "9" * 30, "null", "true", "a", "é", "\x00"]
)  # fmt: skip


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.lists(ALPHABET, max_size=40).map("".join)))
def test_fuzz_parser_never_raises(text: str) -> None:
    """Any string: a ParsedOutput whose calls are well-formed, whatever the input; never an exception."""
    parsed = parse_tool_calls(text)
    for call in parsed.tool_calls:
        assert isinstance(call["name"], str) and isinstance(call["args"], dict) and call["id"]
        assert validate_tool_call(call, SCHEMAS) is None or isinstance(validate_tool_call(call, SCHEMAS), str)
    for bad in parsed.invalid_tool_calls:
        assert bad["error"] and bad["id"]
    if not parsed.tool_calls and not parsed.invalid_tool_calls:
        assert parsed.content == text
    reason = step_validator(TOOLS)(text)
    assert reason is None or isinstance(reason, str)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(ALPHABET, st.sampled_from([";", "x ", "}}"])), max_size=30).map("".join))
def test_fuzz_streamed_json_content_is_a_prefix_of_the_final_content(text: str) -> None:
    """What streaming shows of any partial answer is a prefix of the final content: never a piece of a call."""
    final = parse_tool_calls(text, "json")
    for cut in range(len(text) + 1):
        assert final.content.startswith(JSON_CALLS.visible(text[:cut]))
    assert step_validator(TOOLS, "json")(text) is None or isinstance(step_validator(TOOLS, "json")(text), str)


# --------------------------------------------------------------------------------------------------
# a closing marker inside a JSON string is argument text


CLOSING_IN_STRING = (
    '<tool_call>\n{"name": "echo", "arguments": {"text": "a </tool_call> b \\" </tool_call>"}}\n</tool_call>'
)


def test_hermes_parsing_skips_a_closing_marker_inside_a_json_string() -> None:
    """Issue 25 item 10: a Hermes call whose string argument holds ``</tool_call>`` was cut in two: an invalid call,
    and the rest of its JSON became the answer's content. Markers inside JSON strings are text, as the
    JSON-fenced format already reads them."""
    parsed = parse_tool_calls("Sure. " + CLOSING_IN_STRING + " Done.", "hermes")
    assert parsed.invalid_tool_calls == []
    assert [c["args"] for c in parsed.tool_calls] == [{"text": 'a </tool_call> b " </tool_call>'}]
    assert parsed.content == "Sure.  Done."


def test_the_step_end_rule_skips_a_closing_marker_inside_a_json_string() -> None:
    """Issue 25 item 10, the engine's half: a call step ended at the ``</tool_call>`` inside the string."""
    inside = CLOSING_IN_STRING[: CLOSING_IN_STRING.index("</tool_call>", 20) + len("</tool_call>")]
    assert not tool_step_complete(inside, HERMES_MARKERS)
    assert tool_step_complete(CLOSING_IN_STRING, HERMES_MARKERS)
    assert open_call_start(inside, HERMES_MARKERS) == 0  # the call is still open
    # a step that continues a call cut by the token cap reads the string state of the call so far
    calls = MarkerCalls(HERMES_MARKERS)
    cut = CLOSING_IN_STRING.index("b \\")
    calls.begin("Sure. " + CLOSING_IN_STRING[:cut])
    assert not calls.read(' \\" </tool_call>').complete
    calls.begin("Sure. " + CLOSING_IN_STRING[:cut])
    assert calls.read(CLOSING_IN_STRING[cut:]).complete


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e99999", "-1e99999"])
def test_non_finite_numbers_in_tool_arguments_are_invalid(number: str) -> None:
    """Origin: the second outside audit (issue 19), item 11: ``NaN``, ``Infinity`` and a number too large for a
    float are not JSON numbers: the call is invalid with a reason, in both call formats and for the engine's
    step check."""
    schema = [convert_to_openai_tool(scale)]
    for text, style in (
        (f'<tool_call>{{"name": "scale", "arguments": {{"factor": {number}}}}}</tool_call>', "hermes"),
        (f'{{"name": "scale", "parameters": {{"factor": {number}}}}}', "json"),
    ):
        parsed = parse_tool_calls(text, style)  # type: ignore[arg-type]
        assert parsed.tool_calls == [], (text, parsed.tool_calls)
        assert number.lstrip("-") in str(parsed.invalid_tool_calls[0]["error"])
        assert step_validator(schema, style)(text) is not None  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["hermes", "json"])
def test_each_tool_format_reads_what_it_writes_and_prompts_for(name: str) -> None:
    """Origin: issue 21, item 4 (tool-call formats as objects, each owning its syntax end to end): a format renders
    past calls, forces an answer to start as a call, describes itself in the fallback prompt and parses, all in
    its own syntax: what it writes it reads back, its instructions show its own markup, and its engine step
    syntax is the one its validator checks."""
    fmt = FORMATS[name]
    calls = [{"name": "search", "arguments": {"query": "France"}}, {"name": "search", "arguments": {"query": "<"}}]
    written = fmt.render_calls("Checking.", calls)
    parsed = fmt.parse(written)
    assert [(c["name"], c["args"]) for c in parsed.tool_calls] == [(c["name"], c["arguments"]) for c in calls]
    assert parsed.invalid_tool_calls == [] and fmt.visible(written) == parsed.content
    closing = "\n</tool_call>" if name == "hermes" else ""
    forced = fmt.forced_prefix("search", any_call=True) + '{"query": "Japan"}}' + closing
    assert [(c["name"], c["args"]) for c in fmt.parse(forced).tool_calls] == [("search", {"query": "Japan"})]
    prompt = fmt.fallback_prompt([convert_to_openai_tool(search)])
    assert fmt.render_calls("", [{"name": "<tool name>", "arguments": {}}]).split("{}")[0] in prompt
    options, checked = fmt.step_options(None)
    assert checked and SpecGuardParams(**options).model_dump(include=set(options)) == options
    step = fmt.render_calls("", calls[:1])
    assert fmt.validator([convert_to_openai_tool(search)])(step) is None
