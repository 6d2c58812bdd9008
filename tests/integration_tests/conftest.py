"""Strict xfails for standard tests that need a model able to decide on and write a tool call."""

from __future__ import annotations

import pytest

RANDOM_MODEL_CANNOT_CALL_TOOLS = (
    "model limitation: the tiny random-weight pair cannot decide to call a tool or write a correct call "
    "(e.g. magic_function with {'input': 3}); the same path passes with scripted output in "
    "tests/unit_tests/test_tool_calling.py"
)
NEEDS_A_REAL_TOOL_CALL = {
    "test_tool_calling",
    "test_tool_calling_async",
    "test_bind_runnables_as_tools",
    "test_tool_choice",
    "test_tool_calling_with_no_arguments",
    "test_structured_output",
    "test_structured_output_async",
    "test_structured_output_pydantic_2_v1",
    "test_structured_output_optional_param",
    "test_agent_loop",
    "test_unicode_tool_call_integration",
}


QWEN_RUNS = {"test_tool_calling", "test_tool_calling_with_no_arguments", "test_structured_output"}
"""The standard tests the real Qwen2.5-Coder pair runs (test_qwen_coder.py): the tool tests a random pair
cannot pass; the rest of the suite runs on the tiny pair, minutes faster."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skipped = [i for i in items if "TestQwenCoderStandard" in i.nodeid and i.originalname not in QWEN_RUNS]  # type: ignore[attr-defined]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [i for i in items if i not in skipped]
    for item in items:
        if "TestChatSpecGuardIntegration" in item.nodeid and item.originalname in NEEDS_A_REAL_TOOL_CALL:  # type: ignore[attr-defined]
            item.add_marker(pytest.mark.xfail(reason=RANDOM_MODEL_CANNOT_CALL_TOOLS, strict=True))
