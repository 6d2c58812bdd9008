"""Tool calling through ChatSpecGuard on tiny pairs: verified tool-call steps and a real agent loop.

Random-weight models cannot call tools, so where a test needs a particular answer the *text* is
scripted with :func:`tests.scripted.force_script` (a bias on the scripted token's logit after the
model's real forward pass). The SpecGuard machinery - drafting, step boundaries, attention and
confidence scoring, schema rejection, the target's fallback - plus parsing, the ``ToolMessage``
round trip through the chat template and the step events are all real.
"""

from __future__ import annotations

import ast
import json
import operator
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel
from transformers import AutoTokenizer

from langchain_specguard import STEP_EVENT, ChatSpecGuard
from langchain_specguard.binding import ToolRequest
from langchain_specguard.engine.decoding import CallOptions, generate
from langchain_specguard.tools import HERMES_MARKERS, step_validator
from tests.scripted import force_script, scripted_llm
from tests.tiny_models import bpe_pair, long_llama_pair
from tests.unit_tests.test_tools import scale

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _arith(node: ast.AST) -> float:
    """Evaluate + - * / on numbers from a parsed expression tree (never eval)."""
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
    raise ValueError("only + - * / on numbers")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '17 * 3'."""
    value = _arith(ast.parse(expression, mode="eval"))
    return str(int(value) if float(value).is_integer() else value)


CAPITALS = {"france": "Paris", "japan": "Tokyo"}


@tool
def lookup(country: str) -> str:
    """Look up the capital of a country."""
    return CAPITALS.get(country.lower(), "unknown")


class Collector(BaseCallbackHandler):
    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        if name == STEP_EVENT:
            self.steps.append(data)


def make_llm(**overrides: Any) -> ChatSpecGuard:
    target, draft = long_llama_pair()
    params: dict[str, Any] = {
        "target_model": target,
        "draft_model": draft,
        "max_tokens": 200,
        "max_step_tokens": 24,
        "max_tool_call_tokens": 160,
        "n_candidates": 2,
        "acceptance_threshold": 0.3,
        "seed": 0,
    }
    params.update(overrides)
    # a tokenizer object of its own gives the instance a pair of its own (instances loading the same models
    # share one pair): scripting its models must not reach other tests' instances
    llm = ChatSpecGuard(**params, tokenizer=AutoTokenizer.from_pretrained(target))
    llm.load()
    return llm


def call_block(name: str, args: dict[str, Any]) -> str:
    return f"{HERMES_MARKERS[0]}\n{json.dumps({'name': name, 'arguments': args})}\n{HERMES_MARKERS[1]}"


def scripted(answer: str, **overrides: Any) -> ChatSpecGuard:
    """:func:`make_llm` (a pair of its own) with its draft and target both writing ``answer``."""
    llm = make_llm(**overrides)
    pair = llm.load()
    force_script(pair.draft, pair.tokenizer, lambda prompt: answer)
    force_script(pair.target, pair.tokenizer, lambda prompt: answer)
    return llm


def test_schema_invalid_draft_call_is_rejected_and_target_writes_the_step() -> None:
    """The draft (scripted) writes a call with a wrong argument type; the real target rewrites it."""
    llm = make_llm(acceptance_threshold=-1.0, max_tokens=100)  # scores alone would accept every draft step
    pair = llm.load()
    bad_call = call_block("calculator", {"expression": 5})  # schema says string
    force_script(pair.draft, pair.tokenizer, lambda prompt: bad_call)
    tools = [convert_to_openai_tool(calculator)]
    params = llm.engine_params(tool_call_markers=HERMES_MARKERS)
    prompt = llm.render_prompt([HumanMessage("What is 17 * 3?")], tools)
    target_alone = generate(pair, prompt, params.model_copy(update={"acceptance_threshold": 2.0}))

    result = generate(pair, prompt, params, CallOptions(validate_step=step_validator(tools)))
    first = result.steps[0]
    assert first.draft_text.strip() == bad_call
    assert first.reason == "schema" and not first.accepted and first.source == "target"
    # ``kind`` describes the committed step: here the random target's text, not a call
    assert first.kind == target_alone.steps[0].kind == "text"
    assert "$.expression: expected string" in str(first.detail)
    # what was committed is the target's own step, identical to the target decoding alone
    assert first.token_ids == target_alone.steps[0].token_ids
    assert bad_call not in result.text

    # the same draft call without a validator is accepted (threshold -1): the rejection is the schema's
    unchecked = generate(pair, prompt, params)
    assert unchecked.steps[0].accepted and unchecked.steps[0].kind == "tool_call"
    assert unchecked.text.startswith(bad_call)


def test_valid_draft_call_is_one_step_and_text_before_it_is_split_off() -> None:
    llm = make_llm(acceptance_threshold=-1.0)
    pair = llm.load()
    good = call_block("lookup", {"country": "France"})
    answer = "Sure thing " + good  # no CoT delimiter between the text and the call
    force_script(pair.draft, pair.tokenizer, lambda prompt: answer)
    tools = [convert_to_openai_tool(lookup)]
    params = llm.engine_params(tool_call_markers=HERMES_MARKERS, step_delimiters=["\n"])
    prompt = llm.render_prompt([HumanMessage("Capital of France?")], tools)
    result = generate(pair, prompt, params, CallOptions(validate_step=step_validator(tools)))
    texts = [(s.kind, s.text) for s in result.steps]
    # the call holds two "\n" delimiters, yet it is one step, opening marker to closing marker
    assert texts[0] == ("text", "Sure thing ")
    assert texts[1] == ("tool_call", good)
    assert all(s.accepted for s in result.steps) and result.text == answer


def test_tool_turns_render_through_templates_without_tool_support() -> None:
    """The tiny ChatML template prints only content: past calls and results are written as text."""
    llm = make_llm()
    history = [
        HumanMessage("What is 2+2?"),
        AIMessage("", tool_calls=[{"name": "calculator", "args": {"expression": "2+2"}, "id": "c1"}]),
        ToolMessage("4", tool_call_id="c1"),
    ]
    text = llm.load().tokenizer.decode(llm.render_prompt(history, [convert_to_openai_tool(calculator)]))
    assert '"name": "calculator"' in text.split("<|im_start|>user")[0]  # the fallback system block
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}' in text
    assert "<tool_response>\n4\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_tool_turns_render_through_the_gemma_template() -> None:
    """The embedded model's template maps every non-assistant turn to 'user' and prints only content."""
    from langchain_specguard.engine.loading import GEMMA_CHAT_TEMPLATE

    llm = make_llm(chat_template=GEMMA_CHAT_TEMPLATE)
    assert not llm.template_profile().native_tools and llm.tool_format().name == "hermes"
    history = [
        HumanMessage("What is 2+2?"),
        AIMessage("Let me add.", tool_calls=[{"name": "calculator", "args": {"expression": "2+2"}, "id": "c1"}]),
        ToolMessage("4", tool_call_id="c1"),
    ]
    text = llm.load().tokenizer.decode(llm.render_prompt(history, [convert_to_openai_tool(calculator)]))
    assert text.startswith("<s><start_of_turn>user\nYou can call these tools:")  # system block folded into user
    assert '<start_of_turn>model\nLet me add.\n<tool_call>\n{"name": "calculator"' in text
    assert "<start_of_turn>user\n<tool_response>\n4\n</tool_response><end_of_turn>" in text
    assert text.endswith("<start_of_turn>model\n")


async def test_streamed_tool_calls_arrive_as_chunks_and_match_invoke() -> None:
    llm = make_llm()
    pair = llm.load()
    answer = "Checking.\n\n" + call_block("lookup", {"country": "Japan"})
    force_script(pair.draft, pair.tokenizer, lambda prompt: answer)
    force_script(pair.target, pair.tokenizer, lambda prompt: answer)
    bound = llm.bind_tools([lookup])
    invoked = await bound.ainvoke("Capital of Japan?")
    chunks = [chunk async for chunk in bound.astream("Capital of Japan?")]
    assert all("<tool_call>" not in str(c.content) for c in chunks)  # call text never leaks into content
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert merged.content == invoked.content == "Checking.\n\n"
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [("lookup", {"country": "Japan"})]
    assert [(c["name"], c["args"]) for c in invoked.tool_calls] == [("lookup", {"country": "Japan"})]
    assert invoked.response_metadata["finish_reason"] == "tool_calls"


QWEN_LIKE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n"
    "Reply with <tool_call></tool_call> blocks.<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "\n</tool_call>{% endfor %}<|im_end|>\n{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ m.content }}\n</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tool_turns_render_through_templates_with_tool_support() -> None:
    llm = make_llm(chat_template=QWEN_LIKE_TEMPLATE)
    assert llm.template_profile().native_tools and llm.tool_format().name == "hermes"
    history = [
        HumanMessage("What is 2+2?"),
        AIMessage("", tool_calls=[{"name": "calculator", "args": {"expression": "2+2"}, "id": "c1"}]),
        ToolMessage("4", tool_call_id="c1"),
    ]
    text = llm.load().tokenizer.decode(llm.render_prompt(history, [convert_to_openai_tool(calculator)]))
    assert text.startswith("<|im_start|>system\n# Tools\n<tools>") and "You can call these tools" not in text
    # arguments reach the template as a dict (HF convention), so they are not JSON-encoded twice
    assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>' in text
    assert "<tool_response>\n4\n</tool_response>" in text


def test_bind_tools_and_forced_choice_on_the_real_tiny_pair() -> None:
    """Unscripted random models: whatever they write comes back as content, tool_calls or invalid_tool_calls."""
    llm = make_llm(max_tokens=40)
    with pytest.raises(ValueError, match="not among the bound tools"):
        llm.bind_tools([calculator], tool_choice="lookup")
    free = llm.bind_tools([calculator, lookup]).invoke("hi")
    assert isinstance(free, AIMessage)
    forced = llm.bind_tools([calculator], tool_choice="calculator").invoke("hi")
    # the forced prefix opened the call; a random model never closes it, so it is an invalid call
    assert forced.content == "" and not forced.tool_calls
    assert forced.invalid_tool_calls and "unterminated" in str(forced.invalid_tool_calls[0]["error"])
    streamed = None
    for chunk in llm.bind_tools([calculator], tool_choice="calculator").stream("hi"):
        streamed = chunk if streamed is None else streamed + chunk
    # streamed, the call arrives as a tool_call_chunk holding the same raw text; how an aggregated
    # chunk reads a broken call is langchain-core's partial-JSON rule, so only the chunk is checked
    assert streamed is not None and streamed.content == ""
    assert [c["args"] for c in streamed.tool_call_chunks] == [forced.invalid_tool_calls[0]["args"]]


def scripted_agent_answer(prompt: str) -> str:
    """The text a capable model would write at each turn of the agent loop."""
    results = prompt.count("<tool_response>\n")  # result blocks, not the system prompt's mention
    if results == 0:
        return "I will compute the product first.\n\n" + call_block("calculator", {"expression": "17 * 3"})
    if results == 1:
        return call_block("lookup", {"country": "France"})
    product = prompt.split("<tool_response>\n")[1].split("\n")[0]
    capital = prompt.split("<tool_response>\n")[2].split("\n")[0]
    return f"17 * 3 = {product}.\n\nThe capital of France is {capital}."


class Answer(BaseModel):
    """A number and a city."""

    number: int
    city: str


def test_structured_output_through_a_forced_tool_call() -> None:
    llm = make_llm()
    pair = llm.load()
    script = lambda prompt: call_block("Answer", {"number": 51, "city": "Paris"})  # noqa: E731
    force_script(pair.draft, pair.tokenizer, script)
    force_script(pair.target, pair.tokenizer, script)
    structured = llm.with_structured_output(Answer, include_raw=True)
    out = structured.invoke("Give me a number and a city.")
    assert out["parsed"] == Answer(number=51, city="Paris") and out["parsing_error"] is None
    assert out["raw"].tool_calls[0]["name"] == "Answer"
    as_json = llm.with_structured_output(convert_to_openai_tool(Answer)).invoke("Go.")
    assert as_json == {"number": 51, "city": "Paris"}


@pytest.mark.parametrize("output_version", ["v0", "v1"])
def test_agent_loop_with_two_real_tools(output_version: str) -> None:
    """langchain's create_agent runs to completion: two tool calls, two ToolMessages, a final answer.

    With ``output_version="v1"`` the model's answers are lists of standard content blocks (text, tool_call),
    which the agent sends back in the history; the second model call failed on them ("content parts of type
    ['tool_call']: this model reads text only"). Origin: issue 29, item 1."""
    from langchain.agents import create_agent

    llm = make_llm(output_version=output_version)
    pair = llm.load()
    # both models follow the script, so whichever writes a step, the text is the same
    force_script(pair.draft, pair.tokenizer, scripted_agent_answer)
    force_script(pair.target, pair.tokenizer, scripted_agent_answer)
    agent = create_agent(llm, tools=[calculator, lookup])
    collector = Collector()
    state = agent.invoke(
        {"messages": [HumanMessage("What is 17 * 3, and what is the capital of France?")]},
        config={"callbacks": [collector]},
    )
    messages = state["messages"]
    tool_messages = [m for m in messages if isinstance(m, ToolMessage)]
    assert [(m.name, m.content) for m in tool_messages] == [("calculator", "51"), ("lookup", "Paris")]
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert [c["args"] for c in calls] == [{"expression": "17 * 3"}, {"country": "France"}]
    assert [m.tool_call_id for m in tool_messages] == [c["id"] for c in calls]
    assert messages[1].text == "I will compute the product first.\n\n"
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert final.text == "17 * 3 = 51.\n\nThe capital of France is Paris."
    answers = [m for m in messages if isinstance(m, AIMessage)]
    if output_version == "v1":  # the answers sent back were content blocks, tool calls among them
        assert all(isinstance(m.content, list) for m in answers)
        assert [b["type"] for b in answers[0].content_blocks] == ["text", "tool_call"]
    else:
        assert all(isinstance(m.content, str) for m in answers)
    kinds = {s["kind"] for s in collector.steps}
    assert kinds == {"text", "tool_call"}
    tool_steps = [s for s in collector.steps if s["kind"] == "tool_call"]
    assert len(tool_steps) == 2 and all(s["text"].lstrip().startswith("<tool_call>") for s in tool_steps)
    assert all(s["reason"] in ("accepted", "score") for s in collector.steps)  # scripted calls fit the schemas


def test_structured_output_forces_the_schemas_own_tool() -> None:
    """``method="function_calling"``; ``json_schema`` and ``json_mode`` constrain decoding instead (test_binding.py)."""
    llm = make_llm()
    pair = llm.load()
    script = lambda prompt: call_block("Answer", {"number": 7, "city": "Oslo"})  # noqa: E731
    force_script(pair.draft, pair.tokenizer, script)
    force_script(pair.target, pair.tokenizer, script)
    out = llm.with_structured_output(Answer, method="function_calling", include_raw=True).invoke("A number and a city?")
    assert out["parsed"] == Answer(number=7, city="Oslo") and out["parsing_error"] is None
    setup = ToolRequest([convert_to_openai_tool(Answer)], "Answer").setup(llm.tool_format(), None, {})
    # the answer starts naming the tool
    assert setup.prefix.endswith('{"name": "Answer", "arguments": ')


def test_structured_output_failure_is_a_parsing_error() -> None:
    llm = make_llm()
    pair = llm.load()
    broken = lambda prompt: call_block("Answer", {"number": "many", "city": "Oslo"})  # noqa: E731
    force_script(pair.draft, pair.tokenizer, broken)
    force_script(pair.target, pair.tokenizer, broken)
    out = llm.with_structured_output(Answer, include_raw=True).invoke("A number and a city?")
    assert out["parsed"] is None and out["parsing_error"] is not None
    assert "number" in str(out["parsing_error"])
    with pytest.raises(Exception, match="no valid 'Answer' call"):
        llm.with_structured_output(Answer).invoke("A number and a city?")


def test_a_call_argument_holding_the_closing_marker_is_one_call_on_every_path() -> None:
    """Issue 25 item 10: a Hermes call whose string argument holds ``</tool_call>`` was cut in two, on invoke and
    every stream path: an invalid call, and the rest of its JSON in the answer's content."""
    llm = make_llm()
    pair = llm.load()
    answer = 'Checking.\n\n<tool_call>\n{"name": "lookup", "arguments": {"country": "a</tool_call>b"}}\n</tool_call>'
    force_script(pair.draft, pair.tokenizer, lambda prompt: answer)
    force_script(pair.target, pair.tokenizer, lambda prompt: answer)
    bound = llm.bind_tools([lookup])
    invoked = bound.invoke("Capital?")
    streamed = None
    for chunk in bound.stream("Capital?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None
    for message in (invoked, streamed):
        assert message.content == "Checking.\n\n"
        assert [(c["name"], c["args"]) for c in message.tool_calls] == [("lookup", {"country": "a</tool_call>b"})]
        assert message.invalid_tool_calls == []


# --------------------------------------------------------------------------------------------------
# create_agent(response_format=Schema): a broken structured call is the schema parser's to judge


def broken_then_fixed(broken: str) -> Any:
    """The structured call ``broken`` first; once the agent has told the model what is wrong, a valid one."""

    def script(prompt: str) -> str:
        if "Please fix your mistakes" in prompt:
            return call_block("Answer", {"number": 7, "city": "Oslo"})
        return f'<tool_call>\n{{"name": "Answer", "arguments": {broken}}}\n</tool_call>'

    return script


@pytest.mark.parametrize("broken", ['{"number": "many", "city": "Oslo"}', '{"number": NaN, "city": "Oslo"}'])
def test_create_agent_retries_a_broken_structured_call(broken: str) -> None:
    """Issue 25 item 11: ``create_agent(response_format=Schema)`` ended silently, with no ``structured_response``
    and no error, when the forced structured call was broken (against the schema, NaN): ChatSpecGuard filed it
    under ``invalid_tool_calls``, which the agent does not read. A call of a tool nothing can run (the agent's
    response-format tool) is now handed to the agent as LangChain's own providers hand it any call that reads
    as JSON: its ``ToolStrategy`` validates it and, by default, asks the model again with the error. (A plain
    ``response_format=Answer`` now picks the native ``ProviderStrategy``, whose decoding cannot break the schema.)"""
    from langchain.agents import create_agent
    from langchain.agents.structured_output import ToolStrategy

    llm = make_llm()
    pair = llm.load()
    force_script(pair.draft, pair.tokenizer, broken_then_fixed(broken))
    force_script(pair.target, pair.tokenizer, broken_then_fixed(broken))
    agent = create_agent(llm, tools=[lookup], response_format=ToolStrategy(Answer))
    state = agent.invoke({"messages": [HumanMessage("A number and a city?")]})
    assert state["structured_response"] == Answer(number=7, city="Oslo")
    first, feedback = state["messages"][1], state["messages"][2]
    assert isinstance(first, AIMessage) and [c["name"] for c in first.tool_calls] == ["Answer"]
    assert isinstance(feedback, ToolMessage) and "Please fix your mistakes" in str(feedback.content)


def test_create_agent_raises_on_a_broken_structured_call_when_told_not_to_retry() -> None:
    """Issue 25 item 11, ``handle_errors=False``: the failure surfaces as the agent's own error, as
    ``with_structured_output`` raises ``OutputParserException``."""
    from langchain.agents import create_agent
    from langchain.agents.structured_output import StructuredOutputValidationError, ToolStrategy

    llm = make_llm()
    pair = llm.load()
    script = broken_then_fixed('{"number": "many", "city": "Oslo"}')
    force_script(pair.draft, pair.tokenizer, script)
    force_script(pair.target, pair.tokenizer, script)
    agent = create_agent(llm, tools=[lookup], response_format=ToolStrategy(Answer, handle_errors=False))
    with pytest.raises(StructuredOutputValidationError, match="Answer"):
        agent.invoke({"messages": [HumanMessage("A number and a city?")]})


def test_an_unreadable_forced_call_keeps_its_tool_name() -> None:
    """Issue 25 item 11: an invalid forced call lost its tool name (``name=None``); like ChatOpenAI's invalid calls,
    it keeps the name it was written with."""
    llm = make_llm()
    pair = llm.load()
    script = lambda prompt: '<tool_call>\n{"name": "Answer", "arguments": {"number": 7, "city": }}\n</tool_call>'  # noqa: E731
    force_script(pair.draft, pair.tokenizer, script)
    force_script(pair.target, pair.tokenizer, script)
    message = llm.bind_tools([Answer], tool_choice="Answer").invoke("A number and a city?")
    assert message.tool_calls == []
    assert [c["name"] for c in message.invalid_tool_calls] == ["Answer"]


def test_a_target_written_call_that_breaks_the_schema_is_invalid() -> None:
    """Origin: the outside audit (issue 11), item 15: a call the target wrote (the draft's step rejected) that
    breaks the schema landed in ``tool_calls`` rather than ``invalid_tool_calls``."""
    call = call_block("lookup", {"country": 7})
    llm = scripted_llm(long_llama_pair(), call, acceptance_threshold=2.0, max_tool_call_tokens=120, max_tokens=150)
    message = llm.bind_tools([lookup]).invoke("Capital?")
    assert message.tool_calls == []
    assert message.invalid_tool_calls and "country" in str(message.invalid_tool_calls[0]["error"])


def test_static_cache_text_then_tool_call() -> None:
    """Origin: the outside audit (issue 11), item 8: on static caches a step holding text followed by
    ``<tool_call>`` (cut there, mid-step) crashed with "Inplace update to inference tensor outside
    InferenceMode"."""
    call = call_block("lookup", {"country": "Japan"})
    llm = scripted_llm(
        long_llama_pair(), "Sure, looking.\n" + call, cache_implementation="static", max_step_tokens=40, max_tokens=150
    )
    message = llm.bind_tools([lookup]).invoke("Capital of Japan?")
    assert message.content == "Sure, looking.\n" and message.tool_calls[0]["args"] == {"country": "Japan"}


def test_a_lone_surrogate_in_tool_arguments_is_an_invalid_call() -> None:
    """Origin: the second outside audit (issue 19), item 7: ``"\\ud800"`` (a lone surrogate escape) in the
    arguments the model writes is no text: the call is invalid, with the reason, and sending the answer back in
    the history does not break later calls. On the byte-level BPE pair (every character, backslashes included);
    the target writes every step, so what is checked is the final message."""
    answer = '<tool_call>\n{"name": "lookup", "arguments": {"country": "\\ud800"}}\n</tool_call>'
    llm = scripted_llm(
        bpe_pair(), answer, max_tokens=100, max_step_tokens=24, max_tool_call_tokens=100, acceptance_threshold=2.0
    )
    bound = llm.bind_tools([lookup])
    message = bound.invoke("Capital?")
    assert message.tool_calls == []
    assert [c["name"] for c in message.invalid_tool_calls] == ["lookup"]
    assert "lone surrogate" in str(message.invalid_tool_calls[0]["error"])
    later = bound.invoke([HumanMessage("Capital?"), message, HumanMessage("Again, please.")])
    assert isinstance(later, AIMessage)


def test_an_infinite_number_written_by_the_model_is_an_invalid_call() -> None:
    """Origin: the second outside audit (issue 19), item 11, end to end: ``1e99999`` would read as infinity and
    pass the "number" schema check."""
    llm = scripted(
        '<tool_call>\n{"name": "scale", "arguments": {"factor": 1e99999}}\n</tool_call>', acceptance_threshold=2.0
    )
    message = llm.bind_tools([scale]).invoke("Scale it.")
    assert message.tool_calls == [] and "too large for a number" in str(message.invalid_tool_calls[0]["error"])


def test_create_agent_with_a_tool_strategy_runs_end_to_end() -> None:
    """Origin: issue 20, item 1: ``create_agent(llm, tools, response_format=...)`` with the tool strategy answers with
    the schema's own tool, validated into ``structured_response``. (A plain ``Schema`` picks the native
    ``ProviderStrategy`` now that the profile says ``structured_output``: test_binding.py.)"""
    from langchain.agents import create_agent
    from langchain.agents.structured_output import ToolStrategy

    llm = scripted(call_block("Answer", {"number": 51, "city": "Paris"}))
    agent = create_agent(llm, tools=[lookup], response_format=ToolStrategy(Answer))
    state = agent.invoke({"messages": [HumanMessage("A number and a city?")]})
    assert state["structured_response"] == Answer(number=51, city="Paris")
    assert isinstance(state["messages"][1], AIMessage) and state["messages"][1].tool_calls[0]["name"] == "Answer"
