"""Property-based tests (hypothesis) of the step segmenter, the stop-sequence hold-back and message rendering.

The pure functions get thousands of examples each; rendering runs the tiny pair's real tokenizer and
chat template. Each property states documented behaviour, and the only exceptions allowed are the
documented ``ValueError``/``TypeError``.
"""

from __future__ import annotations

import functools
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage

from langchain_specguard import ChatSpecGuard
from langchain_specguard.engine import CallOptions, SpecGuardParams, generate_steps, load_pair
from langchain_specguard.engine.loading import ModelPair
from langchain_specguard.engine.steps import find_stop, new_text, step_complete
from langchain_specguard.engine.text import held_back as _held_back
from langchain_specguard.prompts import MESSAGE_ROLES
from tests.tiny_models import CHARS, llama_pair

PURE = settings(
    max_examples=2000, deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
RENDER = settings(
    max_examples=2000, deadline=None, database=None, print_blob=True, suppress_health_check=list(HealthCheck)
)
ENGINE = settings(
    max_examples=40, deadline=None, database=None, print_blob=True, suppress_health_check=list(HealthCheck)
)

# small alphabets make delimiters and stops actually occur in the generated text
small_text = st.text(alphabet="ab \n.", max_size=30)
pieces = st.text(alphabet="ab \n.", min_size=1, max_size=4)


# --------------------------------------------------------------------------------------------
# steps.py


@PURE
@given(text=st.text(max_size=40) | small_text, delimiters=st.lists(pieces, min_size=1, max_size=3), more=small_text)
def test_step_complete(text: str, delimiters: list[str], more: str) -> None:
    done = step_complete(text, delimiters)
    if not text.strip():
        assert not done  # a step never consists of whitespace alone
    if done:
        assert step_complete(text + more, delimiters)  # once complete, more tokens never undo it
        assert any(d in text for d in delimiters)
    body = text.lstrip()
    if body and any(d in body for d in delimiters):
        assert done


@PURE
@given(text=small_text, stops=st.lists(pieces, max_size=3), start=st.integers(0, 35))
def test_find_stop(text: str, stops: list[str], start: int) -> None:
    cut = find_stop(text, stops, start)
    occurrences = [i for i in range(start, len(text)) for s in stops if text.startswith(s, i)]
    if cut is None:
        assert occurrences == []
    else:
        assert cut == min(occurrences) and cut >= start


@PURE
@given(previous=small_text | st.text(max_size=20), current=small_text | st.text(max_size=20))
def test_new_text(previous: str, current: str) -> None:
    added = new_text(previous, current)
    assert current.endswith(added)
    prefix = current[: len(current) - len(added)]
    assert previous.startswith(prefix)  # everything before the new text was already there
    if current.startswith(previous):
        assert previous + added == current
    else:  # the common prefix is maximal
        assert len(prefix) == len(previous) or len(prefix) == len(current) or previous[len(prefix)] != added[0]


@PURE
@given(text=small_text, stops=st.lists(pieces, max_size=3))
def test_held_back(text: str, stops: list[str]) -> None:
    hold = _held_back(text, stops)
    assert 0 <= hold <= max([len(s) - 1 for s in stops], default=0)
    assert hold <= len(text)

    def could_grow(size: int) -> bool:
        return size > 0 and any(len(s) > size and s.startswith(text[len(text) - size :]) for s in stops)

    if hold:
        assert could_grow(hold)
    assert not any(could_grow(size) for size in range(hold + 1, len(text) + 1))


@PURE
@given(text=small_text, stops=st.lists(pieces, min_size=1, max_size=3), cuts=st.lists(st.integers(0, 30), max_size=8))
def test_streamed_pieces_never_show_a_stop(text: str, stops: list[str], cuts: list[int]) -> None:
    """The emission rule of ``generate_steps`` (cut at a stop, hold back what could still become one),
    run over one-character tokens grouped into steps at ``cuts``: the pieces add up to the text before
    the first stop to *complete* and never include a stop, however the text is split into steps.

    As in the engine, a step also ends at the token that completes a stop (``is_boundary``), so the
    output is cut at the earliest-starting stop in the shortest prefix that holds one.
    """
    completed = next((k for k in range(1, len(text) + 1) if find_stop(text[:k], stops) is not None), None)
    end_of_text = completed if completed is not None else len(text)
    bounds = sorted({min(c, end_of_text) for c in cuts} | {end_of_text})
    max_stop = max(len(s) for s in stops)
    emitted, out, previous = 0, "", ""
    for end in bounds:
        full = text[:end]
        cut = find_stop(full, stops, max(0, len(previous) - max_stop))
        final = cut is not None or end == len(text)
        if cut is not None:
            full = full[:cut]
        upto = len(full) if final else len(full) - _held_back(full, stops)
        if upto >= emitted:
            out += new_text(full[:emitted], full[:upto])
        emitted = max(emitted, upto)
        previous = full
        if final:
            break
    if completed is None:
        assert out == text
    else:
        assert out == text[: find_stop(text[:completed], stops)]
    assert all(s not in out for s in stops)


# --------------------------------------------------------------------------------------------
# message rendering through the tiny pair's real tokenizer and chat template


@functools.cache
def chat() -> ChatSpecGuard:
    target, draft = llama_pair()
    model = ChatSpecGuard(target_model=target, draft_model=draft, torch_dtype="float64")
    model.load()
    return model


vocab_text = st.text(alphabet="".join(CHARS), max_size=20)
any_text = vocab_text | st.text(max_size=20)
good_part = any_text | st.builds(lambda t: {"type": "text", "text": t}, any_text)
bad_part = st.sampled_from(
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": 5},
        {"text": "no type"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ]
)
content = any_text | st.lists(good_part | bad_part, max_size=3)
role = st.sampled_from([*MESSAGE_ROLES, "developer", "robot", "", "User", "human", "ai"])


@st.composite
def message(draw: Any) -> tuple[BaseMessage, bool]:
    """A message and whether the documented rules accept it."""
    kind = draw(st.sampled_from(["system", "human", "ai", "ai-tool", "tool", "chat"]))
    body = draw(content)
    parts = body if isinstance(body, list) else []
    ok = all(isinstance(p, str) or (p.get("type") == "text" and isinstance(p.get("text"), str)) for p in parts)
    if kind == "system":
        return SystemMessage(body), ok
    if kind == "human":
        return HumanMessage(body), ok
    if kind == "ai":
        return AIMessage(body), ok
    if kind == "ai-tool":
        args = {"code": draw(any_text)}
        return AIMessage(body, tool_calls=[{"name": "run", "args": args, "id": "call-1"}]), ok
    if kind == "tool":
        return ToolMessage(body, tool_call_id="call-1"), ok
    name = draw(role)
    return ChatMessage(role=name, content=body), ok and name in (*MESSAGE_ROLES, "developer")


@RENDER
@given(messages=st.lists(message(), max_size=5))
def test_render_prompt_accepts_valid_and_rejects_invalid_messages(messages: list[tuple[BaseMessage, bool]]) -> None:
    model = chat()
    valid = bool(messages) and all(ok for _, ok in messages) and _tool_results_answer_calls([m for m, _ in messages])
    try:
        ids = model.render_prompt([m for m, _ in messages])
    except (ValueError, TypeError):
        assert not valid
        return
    assert valid and ids and all(isinstance(i, int) for i in ids)
    rendered = model.load().tokenizer.decode(ids)
    for m, _ in messages:
        if isinstance(m.content, str) and set(m.content) <= set(CHARS):
            assert m.content in rendered  # text arrives verbatim: never evaluated, never dropped


def _tool_results_answer_calls(messages: list[BaseMessage]) -> bool:
    """The documented rule for tool results: each answers a call of the latest AIMessage before it."""
    latest: AIMessage | None = None
    for m in messages:
        if isinstance(m, AIMessage):
            latest = m
        elif isinstance(m, ToolMessage) and (latest is None or not latest.tool_calls):
            return False  # every call here has the id "call-1", as every result answers
    return True


# --------------------------------------------------------------------------------------------
# the real decoding loop: random stops and step sizes on the tiny pair


@functools.cache
def pair() -> ModelPair:
    target, draft = llama_pair()
    return load_pair(target, draft, dtype="float64", device="cpu")


@functools.cache
def greedy_text() -> str:
    params = SpecGuardParams(acceptance_threshold=2.0, n_candidates=1, max_tokens=30, max_step_tokens=30)
    return "".join(e.text for e in generate_steps(pair(), prompt(), params))


def prompt() -> list[int]:
    return pair().tokenizer("<s>Hello there, how are you?", add_special_tokens=False)["input_ids"]


@ENGINE
@given(
    spans=st.lists(st.tuples(st.integers(0, 29), st.integers(1, 5)), max_size=3),
    step=st.integers(1, 7),
    max_tokens=st.integers(1, 30),
    delimiters=st.lists(st.sampled_from(["\n", "\n\n", " ", ".", "a"]), min_size=1, max_size=2),
)
def test_decoding_loop_limits_and_stops(
    spans: list[tuple[int, int]], step: int, max_tokens: int, delimiters: list[str]
) -> None:
    """Target-only greedy: the text is the greedy text cut at max_tokens or the first stop, whatever the
    step size and delimiters, and every step's text is stop-free."""
    full = greedy_text()
    stops = [s for s in (full[a : a + n] for a, n in spans) if s]
    params = SpecGuardParams(
        acceptance_threshold=2.0,
        n_candidates=1,
        max_tokens=max_tokens,
        max_step_tokens=step,
        step_delimiters=delimiters,
    )
    events = list(generate_steps(pair(), prompt(), params, CallOptions(stop=tuple(stops))))
    text = "".join(e.text for e in events)
    assert sum(e.num_tokens for e in events) <= max_tokens
    limited = pair().tokenizer.decode([t for e in events for t in e.token_ids], skip_special_tokens=True)
    first = find_stop(limited, stops)
    assert text == limited[: first if first is not None else len(limited)]
    assert full.startswith(text)
    assert all(s not in e.text for e in events for s in stops)
    assert all(e.num_tokens <= step for e in events)
