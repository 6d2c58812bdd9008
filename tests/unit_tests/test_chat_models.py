"""ChatSpecGuard on a tiny pair: events, streaming, async, batching, and bad input."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from langchain_specguard import STEP_EVENT, SUMMARY_EVENT, ChatSpecGuard
from tests.tiny_models import llama_pair, mismatched_draft
from tests.unit_tests.test_binding import echo


class Collector(BaseCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.tokens: list[str] = []

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        self.events.append((name, data))

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


@pytest.fixture(scope="module")
def llm() -> ChatSpecGuard:
    target, draft = llama_pair()
    return ChatSpecGuard(
        target_model=target,
        draft_model=draft,
        max_tokens=30,
        max_step_tokens=6,
        acceptance_threshold=0.3,
        torch_dtype="float64",
        step_delimiters=["\n", "\n\n"],
    )


def test_construction_is_lazy() -> None:
    target, draft = llama_pair()
    model = ChatSpecGuard(target_model=target, draft_model=draft)
    assert model._pairs().pair is None
    assert model._llm_type == "specguard"
    assert model._get_ls_params()["ls_model_name"] == target


def test_invoke_reports_every_step(llm: ChatSpecGuard) -> None:
    collector = Collector()
    message = llm.invoke("Hello", config={"callbacks": [collector]})
    assert isinstance(message, AIMessage) and message.content
    summary = message.response_metadata["specguard"]
    steps = [data for name, data in collector.events if name == STEP_EVENT]
    assert [name for name, _ in collector.events][-1] == SUMMARY_EVENT
    assert len(steps) == summary["steps"] > 0
    assert [s["index"] for s in steps] == list(range(len(steps)))
    assert "".join(s["text"] for s in steps) == message.content
    for step in steps:
        assert step["source"] in ("draft", "target")
        assert step["accepted"] == (step["source"] == "draft")
        assert step["threshold"] == 0.3
        assert {"grounding", "confidence", "score", "num_tokens", "n_candidates", "seconds", "version"} <= set(step)
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] == summary["output_tokens"] == sum(s["num_tokens"] for s in steps)
    assert message.response_metadata["model_name"]
    assert "".join(collector.tokens) == message.content  # streaming handlers see each verified step


def test_stream_yields_verified_steps_only(llm: ChatSpecGuard) -> None:
    expected = llm.invoke("Hello").content
    collector = Collector()
    chunks = list(llm.stream("Hello", config={"callbacks": [collector]}))
    assert "".join(str(c.content) for c in chunks) == expected
    steps = [d for n, d in collector.events if n == STEP_EVENT]
    text_chunks = [c for c in chunks if c.content]
    assert len(text_chunks) <= len(steps)
    assert chunks[-1].chunk_position == "last"
    assert sum(1 for c in chunks if c.usage_metadata) == 1


async def test_astream_events_interleaves_steps_and_chunks(llm: ChatSpecGuard) -> None:
    order = []
    async for event in llm.astream_events("Hello", version="v2"):
        if event["event"] == "on_custom_event":
            order.append(event["name"])
            if event["name"] == STEP_EVENT:
                assert event["data"]["source"] in ("draft", "target")
        elif event["event"] == "on_chat_model_stream":
            order.append("chunk")
    steps = order.count(STEP_EVENT)
    assert steps > 0 and order[-2:] == [SUMMARY_EVENT, "chunk"]
    # each step event comes right before the chunk that carries its text
    for i, name in enumerate(order[:-2]):
        if name == STEP_EVENT:
            assert order[i + 1] == "chunk"


async def test_async_matches_sync(llm: ChatSpecGuard) -> None:
    expected = [llm.invoke(p).content for p in ("Hello", "Hey")]
    assert [m.content for m in await llm.abatch(["Hello", "Hey"])] == expected
    gathered = await asyncio.gather(llm.ainvoke("Hello"), llm.ainvoke("Hey"))
    assert [m.content for m in gathered] == expected
    streamed = "".join([str(c.content) async for c in llm.astream("Hey")])
    assert streamed == expected[1]


def test_batch_with_threads_matches_sequential(llm: ChatSpecGuard) -> None:
    prompts = ["Hello", "Hey", "Good morning", "hi"]
    expected = [llm.invoke(p).content for p in prompts]
    assert [m.content for m in llm.batch(prompts, config={"max_concurrency": 3})] == expected


async def test_event_loop_stays_free(llm: ChatSpecGuard) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    await llm.ainvoke("Hello")
    elapsed = time.perf_counter() - started
    task.cancel()
    assert ticks >= min(3, int(elapsed / 0.01) // 4)


async def test_cancelled_stream_leaves_model_usable(llm: ChatSpecGuard) -> None:
    expected = (await llm.ainvoke("Hello")).content

    async def consume() -> None:
        async for _ in llm.astream("Hello", max_tokens=200):
            await asyncio.sleep(0)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await asyncio.wait_for(llm.ainvoke("Hello"), timeout=120)).content == expected


def test_lcel_chain_and_message_roles(llm: ChatSpecGuard) -> None:
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])
    chain = prompt | llm | StrOutputParser()
    assert isinstance(chain.invoke({"question": "2 + 2?"}), str)
    history = [
        SystemMessage("sys"),
        HumanMessage("hi"),
        AIMessage("hello", tool_calls=[{"name": "echo", "args": {"text": "42"}, "id": "call-1"}]),
        ToolMessage("42", tool_call_id="call-1"),
        HumanMessage("and?"),
    ]
    assert llm.invoke(history).usage_metadata["input_tokens"] > 20


def test_per_call_overrides_and_stop(llm: ChatSpecGuard) -> None:
    short = llm.invoke("Hello", max_tokens=3)
    assert short.usage_metadata["output_tokens"] == 3
    assert short.response_metadata["finish_reason"] == "length"
    full = llm.invoke("Hello", acceptance_threshold=2.0).content
    stop = full[5:7]
    cut = llm.invoke("Hello", acceptance_threshold=2.0, stop=[stop]).content
    assert cut == full[: full.index(stop)]


# --------------------------------------------------------------------------------------------
# bad input: clear errors, and the model stays usable


def test_bad_construction() -> None:
    target, draft = llama_pair()
    with pytest.raises(ValidationError, match="max_tokens"):
        ChatSpecGuard(target_model=target, draft_model=draft, max_tokens=0)
    with pytest.raises(ValidationError, match="n_candidates"):
        ChatSpecGuard(target_model=target, draft_model=draft, n_candidates=0)
    with pytest.raises(ValidationError, match="finite"):
        ChatSpecGuard(target_model=target, draft_model=draft, acceptance_threshold=float("nan"))
    with pytest.raises(ValidationError, match="grounding_weight"):
        ChatSpecGuard(target_model=target, draft_model=draft, grounding_weight=1.5)
    with pytest.raises(ValidationError, match="step_delimiters"):
        ChatSpecGuard(target_model=target, draft_model=draft, step_delimiters=[])
    with pytest.raises(ValidationError, match="empty strings"):
        ChatSpecGuard(target_model=target, draft_model=draft, step_delimiters=["\n", ""])
    with pytest.raises(ValidationError, match="not both"):
        ChatSpecGuard(target_model=target, draft_model=draft, draft_layers=2)
    with pytest.raises(ValidationError, match="needs a draft"):
        ChatSpecGuard(target_model=target)
    with pytest.raises(ValidationError, match="stop sequences"):
        ChatSpecGuard(target_model=target, draft_model=draft, stop=[""])


def test_bad_calls_then_same_output(llm: ChatSpecGuard) -> None:
    expected = llm.invoke("Hello").content
    with pytest.raises(ValueError, match="messages is empty"):
        llm.invoke([])
    with pytest.raises(ValidationError, match="max_tokens"):
        llm.invoke("Hello", max_tokens=-1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        llm.invoke("Hello", temprature=0.5)
    with pytest.raises(ValueError, match="text only"):
        llm.invoke([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])])
    with pytest.raises(ValueError, match="context window is 512"):
        llm.invoke("x" * 700)
    with pytest.raises(ValueError, match="non-empty"):
        llm.invoke("Hello", stop=[""])
    with pytest.raises(TypeError, match="BaseMessage"):
        llm.render_prompt(["not a message"])  # type: ignore[list-item]
    assert llm.invoke("Hello").content == expected


def test_generation_error_leaves_model_usable(llm: ChatSpecGuard, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = llm.invoke("Hello").content
    pair = llm.load()
    original = type(pair.target).forward
    calls = {"n": 0}

    def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pair.target), "forward", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        llm.invoke("Hello", acceptance_threshold=2.0)
    monkeypatch.setattr(type(pair.target), "forward", original)
    assert llm.invoke("Hello").content == expected
    target, draft = llama_pair()
    fresh = ChatSpecGuard(**{**llm.model_dump(), "target_model": target, "draft_model": draft})
    assert fresh.invoke("Hello").content == expected


def test_mismatched_tokenizers() -> None:
    target, _ = llama_pair()
    model = ChatSpecGuard(target_model=target, draft_model=mismatched_draft())
    with pytest.raises(ValueError, match="tokenizers do not match"):
        model.invoke("Hello")


def test_draft_layers_out_of_range() -> None:
    target, _ = llama_pair()
    with pytest.raises(ValueError, match="draft_layers must be between 1 and 3"):
        ChatSpecGuard(target_model=target, draft_layers=4).invoke("Hello")


def test_missing_chat_template() -> None:
    target, draft = llama_pair()
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.chat_template = None
    model = ChatSpecGuard(target_model=target, draft_model=draft, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="no chat template"):
        model.invoke("Hello")
    fixed = ChatSpecGuard(target_model=target, draft_model=draft, chat_template="{{ messages[-1]['content'] }}:")
    assert fixed.invoke("Hello", max_tokens=2).usage_metadata["input_tokens"] == len("Hello:")


def test_missing_local_path_and_unknown_hub_id_fail_fast() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ChatSpecGuard(target_model="/no/such/model", draft_layers=1).invoke("Hello")
    started = time.perf_counter()
    with pytest.raises(OSError, match="not in the Hugging Face cache"):
        ChatSpecGuard(target_model="no-such-org/no-such-model", draft_layers=1).invoke("Hello")
    assert time.perf_counter() - started < 20


def test_unknown_options_are_rejected() -> None:
    """Origin: the outside audit (issue 11), item 12: unknown constructor arguments (``max_new_tokens``, a
    misspelt option) were silently ignored, and ``ChatSpecGuard(draft_model=X)`` quietly loaded the embedded
    model. ``model`` is the usual LangChain alias of ``target_model``."""
    target, draft = llama_pair()
    assert ChatSpecGuard(model=target, draft_model=draft).target_model == target
    for bad in ({"max_new_tokens": 5}, {"acceptence_threshold": 0.9}):
        with pytest.raises(ValidationError, match=r"unknown option\(s\) .* the options are .*acceptance_threshold"):
            ChatSpecGuard(model=target, draft_model=draft, **bad)
    with pytest.raises(ValidationError, match="draft_model was given without target_model"):
        ChatSpecGuard(draft_model=draft)


def test_score_layers_checked_against_the_scoring_model() -> None:
    """Origin: the outside audit (issue 11), item 13: ``score_layers`` was checked against the draft even when
    the target scores, and only at call time; it is checked against the model that computes the signals, at
    construction where that model is known."""
    target, draft = llama_pair()  # 4-layer target, 2-layer draft
    llm = ChatSpecGuard(target_model=target, draft_model=draft, score_layers=[3], max_tokens=4, seed=0)
    assert llm.invoke("hi").content is not None  # layer 3 exists in the target, which scores
    with pytest.raises(ValueError, match=r"score_layers must be .* in \[-2, 1\]"):
        ChatSpecGuard(
            target_model=target,
            draft_model=draft,
            score_layers=[3],
            signal_source="draft",
            confidence_method="mean",
            acceptance_threshold=0.5,
        ).load()
    loaded = AutoModelForCausalLM.from_pretrained(target)
    with pytest.raises(ValidationError, match=r"score_layers must be .* in \[-4, 3\]"):  # known at construction
        ChatSpecGuard(
            target_model=loaded, draft_layers=2, tokenizer=AutoTokenizer.from_pretrained(target), score_layers=[7]
        )


def test_bad_values_get_clear_errors(tmp_path: Path) -> None:
    """Origin: the outside audit (issue 11), item 14: ``seed=2**64``, ``stop=5``, a lone surrogate in a message,
    a truncated safetensors file and a malformed ``tool_choice`` each gave an error naming neither the option
    nor the cause; each is now a clear error, and the instance stays usable."""
    target, draft = llama_pair()
    with pytest.raises(ValidationError, match="seed"):
        ChatSpecGuard(model=target, draft_model=draft, seed=2**64)
    llm = ChatSpecGuard(model=target, draft_model=draft, max_tokens=4, seed=0)
    with pytest.raises(TypeError, match="stop must be a list of strings, got int"):
        llm.invoke("hi", stop=5)
    with pytest.raises(ValueError, match=r"user message is not valid text: .*lone surrogates"):
        llm.invoke("bad \ud800 text")
    with pytest.raises(ValueError, match=r"tool_choice .* is malformed"):
        llm.bind_tools([echo], tool_choice={"type": "function", "function": None})
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in Path(target).iterdir():
        (broken / name.name).write_bytes(name.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"could not load target_model from '{broken}'"):
        ChatSpecGuard(model=str(broken), draft_model=draft).invoke("hi")
    assert llm.invoke("hi").content is not None  # still usable
