"""Soak: many mixed calls on one instance of the tiny pair; nothing lost, nothing leaks.

``SPECGUARD_SOAK_CALLS`` calls (default 200; CI keeps the default, about half a minute on two
cores) cycle through invoke / stream / ainvoke / astream / batch, and every fifth call is invalid in
one of several ways. Every valid call must return exactly the greedy text a fresh instance gives,
every invalid one its documented error, and the process RSS after the run may exceed the RSS after
warm-up only by a generous bound (a leak of caches or threads per call would blow it). Deselect
with ``-m "not soak"``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import threading
import time
from typing import Any

import psutil
import pytest
from langchain_core.messages import ChatMessage, HumanMessage

from langchain_specguard import ChatSpecGuard
from tests.tiny_models import llama_pair

pytestmark = pytest.mark.soak

CALLS = int(os.environ.get("SPECGUARD_SOAK_CALLS", "200"))
WARM_UP = 25
RSS_BOUND_MB = 150  # generous: one tiny-pair call allocates well under 1 MB that it keeps
PROMPTS = ["Hello", "Hey", "Good morning", "What is 2 + 2?"]
CONFIG: dict[str, Any] = {
    "max_tokens": 6,
    "max_step_tokens": 3,
    "acceptance_threshold": 0.3,
    "torch_dtype": "float64",
    "step_delimiters": ["\n"],
    "seed": 0,
}

# (description, per-call kwargs or a bad message list, expected error, message pattern)
INVALID: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("max_tokens above the context", {"max_tokens": 10_000}, ValueError, "max_tokens is 10000"),
    ("n_candidates 0", {"n_candidates": 0}, ValueError, "n_candidates"),
    ("empty stop string", {"stop": [""]}, ValueError, "stop sequences must be non-empty"),
    ("unknown keyword", {"temprature": 0.1}, TypeError, "unexpected keyword"),
    ("unknown role", {"messages": [ChatMessage(role="robot", content="hi")]}, ValueError, "unknown message role"),
    ("image part", {"messages": [HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}])]},
     ValueError, "text only"),
    ("prompt too long", {"messages": [HumanMessage("z" * 600)]}, ValueError, "context window is 512"),
]  # fmt: skip


def _text(chunks: list[Any]) -> str:
    return "".join(str(c.content) for c in chunks)


async def _astream(llm: ChatSpecGuard, messages: Any, kwargs: dict[str, Any]) -> str:
    return _text([c async for c in llm.astream(messages, **kwargs)])


def _call(llm: ChatSpecGuard, kind: str, messages: Any, kwargs: dict[str, Any]) -> str:
    if kind == "invoke":
        return str(llm.invoke(messages, **kwargs).content)
    if kind == "stream":
        return _text(list(llm.stream(messages, **kwargs)))
    if kind == "ainvoke":
        return str(asyncio.run(llm.ainvoke(messages, **kwargs)).content)
    if kind == "astream":
        return asyncio.run(_astream(llm, messages, kwargs))
    results = llm.batch([messages, messages], config={"max_concurrency": 2}, **kwargs)
    texts = {str(m.content) for m in results}
    assert len(texts) == 1
    return texts.pop()


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.timeout(600)
def test_soak_mixed_calls() -> None:
    target, draft = llama_pair()
    llm = ChatSpecGuard(target_model=target, draft_model=draft, **CONFIG)
    fresh = ChatSpecGuard(target_model=target, draft_model=draft, **CONFIG)
    expected = {p: str(fresh.invoke(p).content) for p in PROMPTS}
    del fresh
    kinds = ["invoke", "stream", "ainvoke", "astream", "batch"]
    counts = {"valid": 0, "invalid": 0}
    rss_after_warm_up = 0.0
    threads_after_warm_up = 0
    started = time.perf_counter()
    for i in range(CALLS):
        if i == WARM_UP:
            rss_after_warm_up, threads_after_warm_up = _rss_mb(), threading.active_count()
        kind = kinds[(i // 5 if i % 5 == 4 else i) % len(kinds)]  # invalid calls go through every API too
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 5 == 4:
            _, bad, error, pattern = INVALID[(i // 5) % len(INVALID)]
            kwargs = {k: v for k, v in bad.items() if k != "messages"}
            with pytest.raises(error, match=re.escape(pattern)):
                _call(llm, kind, bad.get("messages", prompt), kwargs)
            counts["invalid"] += 1
        else:
            assert _call(llm, kind, prompt, {}) == expected[prompt], f"call {i} ({kind})"
            counts["valid"] += 1
    seconds = time.perf_counter() - started
    growth = _rss_mb() - rss_after_warm_up
    print(f"soak: {counts} calls in {seconds:.1f} s, RSS growth after warm-up {growth:+.1f} MB")
    assert counts["valid"] + counts["invalid"] == CALLS
    assert growth < RSS_BOUND_MB
    assert threading.active_count() <= threads_after_warm_up + 2  # no thread leaked per call
