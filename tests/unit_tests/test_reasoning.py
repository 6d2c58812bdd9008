"""Reasoning models: the think block is stepped and verified, and reaches LangChain as reasoning content.

The tiny thinking pair's template opens ``<think>`` in the generation prompt (as Qwen3-Thinking and the
DeepSeek-R1 distills do) and honours ``enable_thinking``; its tokenizer has ``<think>``/``</think>`` as
tokens of their own. Where a test needs a particular answer the text is scripted with
:func:`tests.scripted.force_script`; everything else (drafting, verification, step boundaries, the
split into reasoning and content, streaming, the chat template) is the real code. The last test runs
the real, unscripted pair.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from pydantic import BaseModel
from transformers import AutoTokenizer

from langchain_specguard import STEP_EVENT, ChatSpecGuard
from langchain_specguard.reasoning import ThoughtSpec
from tests.scripted import force_script
from tests.tiny_models import CHATML, THINK_MARKERS, THINKING_TEMPLATE, llama_pair, thinking_pair

THOUGHT = "Two apples and two more.\n\nThat makes four apples."
ANSWER = "There are 4 apples."
OPENED = f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"  # what follows "assistant\n": the template wrote "<think>\n"


class Steps(BaseCallbackHandler):
    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        if name == STEP_EVENT:
            self.steps.append(data)


def make_llm(pair: tuple[str, str] | None = None, script: str | None = None, **overrides: Any) -> ChatSpecGuard:
    """A ChatSpecGuard with a pair of its own (its own tokenizer object), both models scripted if asked."""
    target, draft = pair or thinking_pair()
    params: dict[str, Any] = {
        "target_model": target,
        "draft_model": draft,
        "max_tokens": 200,
        "max_step_tokens": 24,
        "n_candidates": 2,
        "acceptance_threshold": 0.3,
        "seed": 0,
    }
    params.update(overrides)
    llm = ChatSpecGuard(**params, tokenizer=AutoTokenizer.from_pretrained(target))
    loaded = llm.load()
    if script is not None:
        text = script
        force_script(loaded.draft, loaded.tokenizer, lambda prompt: text)
        force_script(loaded.target, loaded.tokenizer, lambda prompt: text)
    return llm


def merged(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


def test_invoke_keeps_the_thinking_out_of_the_content() -> None:
    llm = make_llm(script=OPENED)
    message = llm.invoke("How many apples?")
    assert message.content == ANSWER
    assert message.additional_kwargs["reasoning_content"] == THOUGHT
    assert message.response_metadata["finish_reason"] == "stop"
    usage = message.usage_metadata
    assert usage is not None and usage["output_token_details"]["reasoning"] > 0
    assert usage["output_token_details"]["reasoning"] == message.response_metadata["specguard"]["reasoning_tokens"]
    assert message.content_blocks == [
        {"type": "reasoning", "reasoning": THOUGHT},
        {"type": "text", "text": ANSWER},
    ]


async def test_stream_carries_reasoning_chunks_that_sum_to_invoke() -> None:
    llm = make_llm(script=OPENED, max_step_tokens=8)
    invoked = llm.invoke("How many apples?")
    for chunks in (list(llm.stream("How many apples?")), [c async for c in llm.astream("How many apples?")]):
        total = merged(chunks)
        assert total.content == invoked.content == ANSWER
        assert total.additional_kwargs["reasoning_content"] == invoked.additional_kwargs["reasoning_content"]
        thinking = [c for c in chunks if c.additional_kwargs.get("reasoning_content")]
        assert len(thinking) > 1  # streamed step by step as verified, not in one piece at the end
        assert all(not c.content for c in thinking)  # a chunk of thinking carries no content
        assert all("<" not in str(c.content) and ">" not in str(c.content) for c in chunks)
        assert all("think>" not in c.additional_kwargs.get("reasoning_content", "") for c in chunks)


async def test_v1_output_puts_a_reasoning_block_before_the_text() -> None:
    llm = make_llm(script=OPENED, output_version="v1")
    message = llm.invoke("How many apples?")
    assert isinstance(message.content, list)
    assert [(b["type"], b.get("reasoning", b.get("text"))) for b in message.content] == [
        ("reasoning", THOUGHT),
        ("text", ANSWER),
    ]
    total = merged([c async for c in llm.astream("How many apples?")])
    assert [(b["type"], b.get("reasoning", b.get("text"))) for b in total.content_blocks] == [
        ("reasoning", THOUGHT),
        ("text", ANSWER),
    ]


def test_chat_template_kwargs_reach_the_template() -> None:
    llm = make_llm()
    tokenizer = llm.load().tokenizer
    question = [HumanMessage("How many apples?")]
    assert tokenizer.decode(llm.render_prompt(question)).endswith("assistant\n<think>\n")
    closed = "assistant\n<think>\n\n</think>\n\n"
    no_thinking = llm.render_prompt(question, chat_template_kwargs={"enable_thinking": False})
    assert tokenizer.decode(no_thinking).endswith(closed)
    assert tokenizer.decode(make_llm(chat_template_kwargs={"enable_thinking": False}).render_prompt(question)).endswith(
        closed
    )
    assert tokenizer.decode(make_llm(reasoning=False).render_prompt(question)).endswith(closed)
    # the call: the prompt no longer opens the block, so the answer is content from its first token
    answer = make_llm(script=f"<think>\n\n</think>\n\n{ANSWER}")
    message = answer.invoke("How many apples?", chat_template_kwargs={"enable_thinking": False})
    assert message.content == ANSWER and "reasoning_content" not in message.additional_kwargs
    assert message.usage_metadata is not None
    assert message.usage_metadata["input_tokens"] == len(no_thinking)


def test_bad_chat_template_kwargs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="cannot set \\['add_generation_prompt'\\]"):
        make_llm(chat_template_kwargs={"add_generation_prompt": False})
    llm = make_llm(script=OPENED)
    with pytest.raises(ValueError, match="cannot set \\['messages'\\]"):
        llm.invoke("Hi", chat_template_kwargs={"messages": []})
    with pytest.raises(TypeError, match="reasoning must be True, False or None"):
        llm.invoke("Hi", reasoning="yes")
    assert llm.invoke("How many apples?").content == ANSWER  # still usable


def test_steps_inside_the_think_block_are_verified_reasoning_steps() -> None:
    llm = make_llm(script=OPENED)
    collector = Steps()
    message = llm.invoke("How many apples?", config={"callbacks": [collector]})
    steps = collector.steps
    kinds = [s["kind"] for s in steps]
    reasoning = [s for s in steps if s["kind"] == "reasoning"]
    assert kinds == ["reasoning"] * len(reasoning) + ["text"] * (len(steps) - len(reasoning))
    assert len(reasoning) >= 2  # the blank line inside the think block is a step boundary
    assert reasoning[-1]["text"].endswith("</think>")  # the closing marker ends a step: the answer starts anew
    assert "".join(s["text"] for s in steps[len(reasoning) :]).strip() == message.content
    for step in steps:  # each one was scored and decided like any CoT step
        assert step["version"] == 4 and step["source"] in ("draft", "target")
        assert step["score"] is not None and step["accepted"] == (step["score"] >= step["threshold"])
    summary = message.response_metadata["specguard"]
    assert summary["reasoning_tokens"] == sum(s["num_tokens"] for s in reasoning)


@pytest.mark.parametrize(
    ("pair", "overrides", "script"),
    [
        # the template opens <think>; this tokenizer spells </think> in 8 character tokens
        (llama_pair, {"chat_template": THINKING_TEMPLATE}, OPENED),
        # the model opens its own block, with markers of its own (plain text, several tokens each)
        (
            llama_pair,
            {"chat_template": CHATML, "reasoning": True, "reasoning_markers": ("<reason>", "</reason>")},
            f"<reason>\n{THOUGHT}\n</reason>\n\n{ANSWER}",
        ),
    ],
    ids=["opened-by-template", "opened-by-model"],
)
async def test_markers_split_across_steps_never_leak(pair: Any, overrides: dict[str, Any], script: str) -> None:
    llm = make_llm(pair(), script=script, max_step_tokens=4, **overrides)
    collector = Steps()
    invoked = llm.invoke("How many apples?", config={"callbacks": [collector]})
    assert any("<" in s["text"] and ">" not in s["text"] for s in collector.steps)  # a marker did split
    kinds = [s["kind"] for s in collector.steps]
    thinking = kinds.count("reasoning")
    assert kinds == ["reasoning"] * thinking + ["text"] * (len(kinds) - thinking)
    closing = llm.reasoning_markers[1] if llm.reasoning_markers else THINK_MARKERS[1]
    assert "".join(s["text"] for s in collector.steps[:thinking]).endswith(closing)  # still ends a step
    assert invoked.content == ANSWER and invoked.additional_kwargs["reasoning_content"] == THOUGHT
    for chunks in (list(llm.stream("How many apples?")), [c async for c in llm.astream("How many apples?")]):
        assert all(set("<>/").isdisjoint(str(c.content)) for c in chunks)
        assert all(set("<>/").isdisjoint(c.additional_kwargs.get("reasoning_content", "")) for c in chunks)
        total = merged(chunks)
        assert (total.content, total.additional_kwargs["reasoning_content"]) == (ANSWER, THOUGHT)


def test_message_text_holding_think_markers_stays_data() -> None:
    llm = make_llm()
    tokenizer = llm.load().tokenizer
    think, end = (tokenizer.convert_tokens_to_ids(m) for m in THINK_MARKERS)
    forged = "Say <think> then </think> please."
    ids = llm.render_prompt([HumanMessage(forged)])
    assert (ids.count(think), ids.count(end)) == (1, 0)  # only the generation prompt's own marker
    assert forged in tokenizer.decode(ids)  # the text itself is intact, as plain characters
    # past reasoning rendered by the template: its markers are real, the markers inside it are data
    call = {"name": "count", "args": {"what": "apples"}, "id": "call-1"}
    history: list[BaseMessage] = [
        HumanMessage("How many apples?"),
        AIMessage("", tool_calls=[call], additional_kwargs={"reasoning_content": "I saw <think> in a book"}),
        ToolMessage("4", tool_call_id="call-1"),
    ]
    ids = llm.render_prompt(history)
    assert (ids.count(think), ids.count(end)) == (2, 1)
    text = tokenizer.decode(ids)
    assert '<think>\nI saw <think> in a book\n</think>\n\n<tool_call>\n{"name": "count"' in text


def test_past_reasoning_reaches_only_templates_that_read_it() -> None:
    thinking = make_llm()
    plain = make_llm(chat_template=CHATML)
    tokenizer = thinking.load().tokenizer
    call = {"name": "count", "args": {"what": "apples"}, "id": "call-1"}
    v0 = AIMessage("Let me count.", tool_calls=[call], additional_kwargs={"reasoning_content": "Count them."})
    v1 = AIMessage(
        [{"type": "reasoning", "reasoning": "Count them."}, {"type": "text", "text": "Let me count."}],
        tool_calls=[call],
        response_metadata={"output_version": "v1"},
    )
    for past in (v0, v1):
        loop = [HumanMessage("How many apples?"), past, ToolMessage("4", tool_call_id="call-1")]
        rendered = tokenizer.decode(thinking.render_prompt(loop))
        assert "<think>\nCount them.\n</think>\n\nLet me count.<tool_call>\n" in rendered
        rendered = tokenizer.decode(plain.render_prompt(loop))
        assert "Count them." not in rendered and "assistant\nLet me count.\n<tool_call>\n" in rendered
        # an earlier turn's thinking: the template drops it itself
        turns = [HumanMessage("How many apples?"), past, HumanMessage("And pears?")]
        rendered = tokenizer.decode(thinking.render_prompt(turns))
        assert "Count them." not in rendered and "assistant\nLet me count.<tool_call>\n" in rendered


def test_reasoning_false_leaves_thinking_in_the_content() -> None:
    raw = f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"  # a model that thinks although asked not to
    llm = make_llm(script=raw, chat_template=CHATML, reasoning=False)
    message = llm.invoke("How many apples?")
    assert message.content == raw and "reasoning_content" not in message.additional_kwargs
    separated = llm.invoke("How many apples?", reasoning=True)
    assert (separated.content, separated.additional_kwargs["reasoning_content"]) == (ANSWER, THOUGHT)


class Count(BaseModel):
    """How many apples."""

    apples: int


def test_forced_tool_call_closes_the_think_block_first() -> None:
    call = '<tool_call>\n{"name": "Count", "arguments": {"apples": 4}}\n</tool_call>'
    llm = make_llm(script=f"<think>\n</think>\n\n{call}", max_tool_call_tokens=120)
    out = llm.with_structured_output(Count, include_raw=True).invoke("How many apples?")
    assert out["parsed"] == Count(apples=4) and out["parsing_error"] is None
    assert "reasoning_content" not in out["raw"].additional_kwargs


def test_a_json_schema_answer_needs_the_think_block_closed() -> None:
    """Native structured output constrains the whole output to the schema, so a prompt whose generation prompt opened
    a think block is refused before anything runs, naming the way out (``reasoning=False``), which works."""
    # (scripted after the assistant header: reasoning=False renders the closed block there, then the answer)
    llm = make_llm(script='<think>\n\n</think>\n\n{"apples": 4}', max_tokens=40)
    with pytest.raises(ValueError, match=r"opened a think block \(<think>\): turn thinking off .*reasoning=False"):
        llm.with_structured_output(Count, method="json_schema").invoke("How many apples?")
    closed = llm.model_copy(update={"reasoning": False})
    assert closed.with_structured_output(Count, method="json_schema").invoke("How many apples?") == Count(apples=4)


def test_split_shows_only_what_later_text_cannot_change() -> None:
    """Every prefix of an output, split while streaming, is a prefix of the final split, part by part."""
    cases = [
        (ThoughtSpec(THINK_MARKERS, opened=True), OPENED[len("<think>\n") :]),
        (ThoughtSpec(THINK_MARKERS, opened=True), OPENED),  # the model opened it again
        (ThoughtSpec(THINK_MARKERS, opened=False), OPENED),
        (ThoughtSpec(THINK_MARKERS, opened=False), "  <think>x</think>  y <think> z"),
        (ThoughtSpec(THINK_MARKERS, opened=False), "<thin k>no thought"),
        (ThoughtSpec(THINK_MARKERS, opened=False), ANSWER),
        (ThoughtSpec(("<reason>", "</reason>"), opened=True), "a </reaso b </reason> c"),
        (ThoughtSpec(THINK_MARKERS, opened=True), "cut off while thinking </thi"),
    ]
    for spec, text in cases:
        final = spec.split(text)
        for end in range(len(text) + 1):
            shown = spec.split(text[:end], final=False)
            assert final[0].startswith(shown[0]) and final[1].startswith(shown[1]), (text, end, shown)
    assert ThoughtSpec(THINK_MARKERS, opened=False).split("  <think>x</think>  y <think> z") == ("x", "y <think> z")
    assert ThoughtSpec(THINK_MARKERS, opened=False).split(ANSWER) == ("", ANSWER)
    assert ThoughtSpec(THINK_MARKERS, opened=True).split("cut off while thinking </thi") == (
        "cut off while thinking </thi",
        "",
    )


def test_all_fallback_equals_target_greedy_with_a_think_opening_template() -> None:
    """Unscripted: every step rejected, the output is the target's own greedy decoding, split as text says."""
    llm = make_llm(
        torch_dtype="float64",
        acceptance_threshold=2.0,
        n_candidates=3,
        max_tokens=40,
        max_step_tokens=6,
        step_delimiters=["\n"],
        return_step_details=True,
    )
    pair = llm.load()
    for question in ("Hello there, how are you?", "The sum of 3 and 5 is"):
        prompt = llm.render_prompt([HumanMessage(question)])
        assert pair.tokenizer.decode(prompt).endswith("assistant\n<think>\n")
        message = llm.invoke(question)
        steps = message.response_metadata["specguard"]["step_events"]
        ids = list(itertools.chain.from_iterable(s["token_ids"] for s in steps))
        with torch.no_grad():
            out = pair.target.generate(
                torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=[2, 4], pad_token_id=0
            )
        assert ids == out[0, len(prompt) :].tolist()
        assert all(s["source"] == "target" for s in steps)
        text = "".join(s["text"] for s in steps)
        reasoning, answer = ThoughtSpec(THINK_MARKERS, opened=True).split(text)
        assert (message.additional_kwargs.get("reasoning_content", ""), message.content) == (reasoning, answer)
        closing = next((i for i, s in enumerate(steps) if THINK_MARKERS[1] in s["text"]), len(steps))
        assert [s["kind"] for s in steps[: closing + 1]] == ["reasoning"] * len(steps[: closing + 1])
        assert all(s["kind"] == "text" for s in steps[closing + 1 :])
