"""Binding tools to a call: tools and ``tool_choice`` checked, one call's tool setup, structured output.

What ``bind_tools``, ``with_structured_output`` and per-call ``tools=`` need before anything is generated;
how calls are written and read is :mod:`.tools`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ValidationError

from .reasoning import ThoughtSpec
from .tools import HERMES, ToolFormat, load_json


@dataclass
class ToolSetup:
    """Everything one call needs to know about its bound tools (empty when none are bound), and its think block."""

    tools: list[dict[str, Any]] | None = None
    format: ToolFormat = HERMES  # how the model writes calls: step syntax, parsing, visible text
    validate: Callable[[str], str | None] | None = None
    prefix: str = ""
    single_call: bool = False  # parallel_tool_calls=False: the answer ends with its first call
    thought: ThoughtSpec | None = None  # set when the output is split into reasoning and answer


TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""What OpenAI accepts as a function name; anything else (markup, quotes) could leak into the prompt."""


def openai_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    formatted = [convert_to_openai_tool(tool) for tool in tools]
    for tool in formatted:
        name = tool["function"]["name"]
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise ValueError(
                f"tool name {name!r} is not allowed: tool names are 1 to 64 letters, digits, '_' or '-' "
                "(the OpenAI function-name rule)"
            )
    return formatted


def checked_tool_choice(tool_choice: Any, tools: list[dict[str, Any]]) -> Any:
    """``tool_choice`` checked against the tools it applies to (False means no preference)."""
    names = [tool["function"]["name"] for tool in tools]
    if isinstance(tool_choice, dict) and not isinstance(tool_choice.get("function", {}), dict):
        raise ValueError(
            f"tool_choice {tool_choice!r} is malformed: use {{'type': 'function', 'function': {{'name': ...}}}}"
        )
    forced = forced_tool_name(tool_choice)
    if forced is not None and forced not in names:
        raise ValueError(f"tool_choice names {forced!r}, which is not among the bound tools {names}")
    if tool_choice not in (None, "auto", "none", "any", "required", True, False) and forced is None:
        raise ValueError(f"unsupported tool_choice {tool_choice!r}")
    if tool_choice in ("any", "required", True) and not names:
        raise ValueError(f"tool_choice={tool_choice!r} forces a tool call, but no tools are bound")
    return None if tool_choice is False else tool_choice


def forced_tool_name(tool_choice: Any) -> str | None:
    """The tool a ``tool_choice`` forces by name, if it names one."""
    if isinstance(tool_choice, dict):
        name = tool_choice.get("function", {}).get("name") or tool_choice.get("name")
        return str(name) if name else None
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "any", "required"):
        return tool_choice
    return None


def tool_flag(name: str, value: Any) -> bool | None:
    """``parallel_tool_calls``/``strict`` checked: a bool or None, never silently a truthy string."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be True, False or None, got {value!r}")
    return value


def structured_parser(schema: Any, name: str) -> Callable[[AIMessage], Any]:
    """The parser of a structured answer: the named call's arguments, validated into ``schema``."""
    model_class = schema if isinstance(schema, type) and issubclass(schema, BaseModel) else None

    def parse(message: AIMessage) -> Any:
        calls = [c for c in message.tool_calls if c["name"] == name]
        if not calls:
            reasons = [str(c.get("error")) for c in message.invalid_tool_calls if c.get("error")]
            why = "; ".join(reasons) or "it wrote no call"
            raise OutputParserException(
                f"the model wrote no valid {name!r} call: {why}", llm_output=str(message.content)
            )
        args = calls[0]["args"]
        if model_class is None:
            return args
        try:
            return model_class.model_validate(args)
        except ValidationError as exc:
            raise OutputParserException(f"the {name!r} call does not fit the schema: {exc}") from exc

    return parse


def json_object(message: AIMessage) -> dict[str, Any]:
    """``json_mode`` without a schema: the answer's JSON object (a Markdown code fence around it is fine)."""
    text = str(message.content).strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
    value, error = load_json(fenced.group(1) if fenced else text)
    if not isinstance(value, dict):
        why = error or f"a JSON {type(value).__name__}"
        raise OutputParserException(f"the answer is not a JSON object: {why}", llm_output=str(message.content))
    return value
