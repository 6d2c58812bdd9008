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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "TestChatSpecGuardIntegration" in item.nodeid and item.originalname in NEEDS_A_REAL_TOOL_CALL:  # type: ignore[attr-defined]
            item.add_marker(pytest.mark.xfail(reason=RANDOM_MODEL_CANNOT_CALL_TOOLS, strict=True))
