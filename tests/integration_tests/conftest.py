"""Which standard tests each class of the standard suite runs, and the strict xfails of the random-weight pair.

Every xfail below is a limit of random weights, said for each test, and the same test passes in
``TestChatSpecGuardScripted`` (``test_standard.py``), where the pair is scripted to answer as a perfect caller:
what fails on the random pair is the model, never the package. They are strict, so a pass is noticed.
"""

from __future__ import annotations

import os

import pytest

_FORCED_CALL = (
    "model limitation: the call is forced (the answer starts inside <tool_call>, naming the tool where one is "
    "named), but random weights write random characters where the JSON arguments go: never {schema_json}, and "
    "never the closing </tool_call> within max_tokens=24, so no valid call comes out; TestChatSpecGuardScripted "
    "passes it with a perfect caller"
)
_UNFORCED_CALL = (
    "model limitation: with tools bound and no tool_choice the model must decide to call get_weather; random "
    "weights answer with random text, never a <tool_call> block, so the loop has no call to run; "
    "TestChatSpecGuardScripted passes it with a perfect caller"
)
RANDOM_PAIR_XFAILS = {
    "test_tool_calling": _FORCED_CALL.format(schema_json="magic_function's {'input': 3} read from the question"),
    "test_tool_calling_async": _FORCED_CALL.format(schema_json="magic_function's {'input': 3} read from the question"),
    "test_bind_runnables_as_tools": _FORCED_CALL.format(schema_json="a non-empty answer_style"),
    "test_tool_choice": _FORCED_CALL.format(schema_json="magic_function's or get_weather's arguments"),
    "test_tool_calling_with_no_arguments": _FORCED_CALL.format(schema_json="magic_function_no_args' {}"),
    "test_structured_output": _FORCED_CALL.format(schema_json="a Joke with setup and punchline"),
    "test_structured_output_async": _FORCED_CALL.format(schema_json="a Joke with setup and punchline"),
    "test_structured_output_pydantic_2_v1": _FORCED_CALL.format(schema_json="a Joke with setup and punchline"),
    "test_structured_output_optional_param": _FORCED_CALL.format(schema_json="a Joke with its setup"),
    "test_json_mode": _FORCED_CALL.format(schema_json="a Joke with setup and punchline"),
    "test_unicode_tool_call_integration": _FORCED_CALL.format(schema_json="unicode_customer's customer_name"),
    "test_agent_loop": _UNFORCED_CALL,
}
"""The standard tests that need a model able to write a correct call, and why random weights cannot."""

SCRIPTED_RUNS = {
    "test_no_overrides_DO_NOT_OVERRIDE",
    "test_stop_sequence",
    "test_tool_message_error_status",
    "test_structured_few_shot_examples",
    *RANDOM_PAIR_XFAILS,
}
"""The standard tests the scripted class runs: the ones whose outcome depends on what the model answers. The rest
(invoke, stream, batch, usage, tool histories...) pass whatever the answer and run in the random-pair class; the
whole suite passed on the scripted pair too when this class was written (39 passed, 11 skipped);
``SPECGUARD_SCRIPTED_ALL=1`` runs it all."""

QWEN_RUNS = {"test_tool_calling", "test_tool_calling_with_no_arguments", "test_structured_output"}
"""The standard tests the real Qwen2.5-Coder pair runs (test_qwen_coder.py): the tool tests a random pair
cannot pass; the rest of the suite runs on the tiny pair, minutes faster."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def runs(item: pytest.Item) -> bool:
        name = getattr(item, "originalname", item.name)  # notebooks (nbmake) and docs blocks have no originalname
        if "TestQwenCoderStandard" in item.nodeid:
            return name in QWEN_RUNS
        if "TestChatSpecGuardScripted" in item.nodeid:
            return name in SCRIPTED_RUNS or os.environ.get("SPECGUARD_SCRIPTED_ALL") == "1"
        return True

    skipped = [item for item in items if not runs(item)]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [item for item in items if runs(item)]
    for item in items:
        reason = RANDOM_PAIR_XFAILS.get(getattr(item, "originalname", item.name))
        if "TestChatSpecGuardIntegration" in item.nodeid and reason is not None:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
