"""A call's ``timeout`` is a deadline the decode loop checks inside a step, not only between steps.

Origin: an outside probe (issue 29, item 5) saw ``timeout=0.5`` with steps of up to 600 tokens raise after 8.9 s,
because the deadline was checked once per step. The loop now checks it after every draft chunk and every target
pass, so a call ends within one of those of its deadline. The tiny pair is slowed down (each forward sleeps) so a
single step would take many times the timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from langchain_specguard import ChatSpecGuard
from tests.tiny_models import llama_pair

PASS_SECONDS = 0.02
"""What every forward pass of the slowed pair costs at least."""


@pytest.fixture
def slow_llm() -> Iterator[ChatSpecGuard]:
    target, draft = llama_pair()
    llm = ChatSpecGuard(model=target, draft_model=draft, dtype="float32", max_tokens=400, max_step_tokens=400,
                        step_delimiters=["@@@@"], acceptance_threshold=2.0, n_candidates=2, timeout=0.5)  # fmt: skip
    pair = llm.load()
    hooks = [m.register_forward_hook(lambda *_: time.sleep(PASS_SECONDS)) for m in (pair.target, pair.draft)]
    yield llm
    for hook in hooks:
        hook.remove()


def test_a_step_far_longer_than_the_timeout_stops_near_the_deadline(slow_llm: ChatSpecGuard) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"timeout of 0\.5 s"):
        slow_llm.invoke("Hello")
    elapsed = time.monotonic() - started
    # one step alone would run ~400 target passes (> 8 s); the deadline is checked after each draft chunk and
    # each target pass, so the call ends within a few passes of it (2 s leaves room for a loaded CI machine)
    assert elapsed < 0.5 + 2.0, f"raised {elapsed:.1f} s after the call started"


def test_the_model_is_usable_after_a_timeout(slow_llm: ChatSpecGuard) -> None:
    with pytest.raises(TimeoutError):
        slow_llm.invoke("Hello")
    answer = slow_llm.model_copy(update={"timeout": 60.0}).invoke("Hello", max_tokens=3)
    assert isinstance(answer.content, str) and answer.usage_metadata["output_tokens"] == 3
    assert torch.is_grad_enabled()  # nothing global was left changed
