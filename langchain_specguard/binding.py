"""Binding tools to a call: tools and ``tool_choice`` checked, one call's tool setup and what it makes of the
answer, structured output.

What ``bind_tools``, ``with_structured_output`` and per-call ``tools=`` need before anything is generated;
how calls are written and read is :mod:`.tools`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, InvalidToolCall, ToolCall
from langchain_core.messages.tool import invalid_tool_call
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.tools import StructuredTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ValidationError
from pydantic.v1 import BaseModel as BaseModelV1
from pydantic.v1 import ValidationError as ValidationErrorV1

from .reasoning import ThoughtSpec
from .tools import HERMES, ToolFormat, inert, lenient_call, load_json, tools_by_name, validate_tool_call


@dataclass(frozen=True)
class ToolSetup:
    """Everything one call needs to know about its bound tools (empty when none are bound), and its think block."""

    tools: list[dict[str, Any]] | None = None
    format: ToolFormat = HERMES  # how the model writes calls: step syntax, parsing, visible text
    validate: Callable[[str], str | None] | None = None
    prefix: str = ""
    single_call: bool = False  # parallel_tool_calls=False: the answer ends with its first call
    thought: ThoughtSpec | None = None  # set when the output is split into reasoning and answer
    answers: frozenset[str] = frozenset()  # tools nothing runs (see answer_tools): their schema's parser judges

    def read_answer(self, text: str) -> tuple[str, dict[str, Any]]:
        """Content and tool-call fields of the final message for ``text`` (the generated answer).

        A call that parses but does not fit the bound tools (unknown name, arguments against the schema),
        whoever wrote it, is an ``invalid_tool_call`` with the reason, never a call an agent would run. A call of
        an answer tool (:func:`answer_tools`: create_agent's ``response_format``) is run by nobody: when it
        reads as JSON (NaN and Infinity as Python reads them) it is a call, also against its schema, so that the
        schema's own parser judges it (the agent's ``ToolStrategy`` raises or asks again, per its
        ``handle_errors``), as with LangChain's own providers.
        """
        if self.tools is None:
            return text, {}
        parsed = self.format.parse(self.prefix + text)
        schemas = tools_by_name(self.tools)
        calls: list[ToolCall] = []
        invalid: list[InvalidToolCall] = []
        candidates = list(parsed.tool_calls)
        for bad in parsed.invalid_tool_calls:
            readable = lenient_call(bad) if bad.get("name") in self.answers else None
            if readable is not None:
                candidates.append(readable)
            else:
                invalid.append(bad)
        for call in candidates:
            reason = None if call["name"] in self.answers else validate_tool_call(call, schemas)
            if reason is None and self.single_call and calls:
                reason = "parallel_tool_calls=False allows one call per answer: this one was not made"
            if reason is None:
                calls.append(call)
            else:
                invalid.append(
                    invalid_tool_call(name=call["name"], args=json.dumps(call["args"]), id=call.get("id"), error=reason)
                )
        # an invalid call's arguments are kept as a JSON string, never an object: see tools.inert_args
        return parsed.content, {"tool_calls": calls, "invalid_tool_calls": [inert(bad) for bad in invalid]}


@dataclass(frozen=True)
class ToolRequest:
    """A call's tool options as LangChain passes them (``bind_tools`` binds them, or per call), checked."""

    tools: Sequence[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    answer_tools: Sequence[str] = ()  # bound tools nothing runs, by name (bind_tools found them: tool_binding)

    @classmethod
    def take(cls, kwargs: dict[str, Any]) -> ToolRequest:
        """The tool options popped from a call's keyword arguments (their flags checked before anything loads)."""
        parallel = tool_flag("parallel_tool_calls", kwargs.pop("parallel_tool_calls", None))
        tool_flag("strict", kwargs.pop("strict", None))  # calls are always schema-checked (see bind_tools)
        kwargs.pop("ls_structured_output_format", None)
        answers = tuple(kwargs.pop("answer_tools", ()))
        return cls(kwargs.pop("tools", None), kwargs.pop("tool_choice", None), parallel, answers)

    def setup(self, fmt: ToolFormat, markers: tuple[str, str] | None, kwargs: dict[str, Any]) -> ToolSetup:
        """The call's tool setup in the model's format ``fmt``.

        Per-call tools get the checks ``bind_tools`` makes. The format's step syntax goes into ``kwargs`` (the
        call's decoding options) in the engine's terms, unless the call sets it: each call one step, checked
        against the tools (``markers``: the instance's own ``tool_call_markers``).
        """
        tools, tool_choice = self.tools, self.tool_choice
        if tools is not None or tool_choice is not None:
            tools = openai_tools(tools or [])
            tool_choice = checked_tool_choice(tool_choice, tools)
        if not tools or tool_choice == "none":
            return ToolSetup()
        options, checked = fmt.step_options(kwargs.get("tool_call_markers", markers))
        for name, value in options.items():
            kwargs.setdefault(name, value)
        return ToolSetup(
            tools=list(tools),
            format=fmt,
            validate=fmt.validator(tools) if checked else None,
            prefix=fmt.forced_prefix(forced_tool_name(tool_choice), tool_choice in ("any", "required", True)),
            single_call=self.parallel_tool_calls is False,
            answers=frozenset([*self.answer_tools, *answer_tools(self.tools or [])]),
        )


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
    """The parser of a structured answer: the named call's arguments, validated into ``schema``.

    A pydantic model gives an instance of itself, a ``pydantic.v1`` model too (as ChatOpenAI's parser does);
    a JSON schema or a TypedDict gives the arguments as a dict."""
    model_class = schema if isinstance(schema, type) and issubclass(schema, (BaseModel, BaseModelV1)) else None

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
            if issubclass(model_class, BaseModel):
                return model_class.model_validate(args)
            return model_class.parse_obj(args)
        except (ValidationError, ValidationErrorV1) as exc:
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


def tool_binding(
    tools: Sequence[Any],
    tool_choice: Any,
    flags: dict[str, bool | None],
    kwargs: dict[str, Any],
    decoding: Sequence[str],
) -> dict[str, Any]:
    """What ``bind_tools`` binds: the tools in OpenAI format, ``tool_choice`` and the flags checked, and the other
    keywords, which must be ``decoding`` fields (or ``stop``)."""
    formatted = openai_tools(tools)
    tool_choice = checked_tool_choice(tool_choice, formatted)
    for name, value in flags.items():
        tool_flag(name, value)
    if "response_format" in kwargs:  # what create_agent passes for a ProviderStrategy (native structured output)
        raise TypeError(
            "bind_tools got response_format, but ChatSpecGuard has no native structured output (its profile "
            "says structured_output=False): give create_agent response_format=ToolStrategy(Schema) (what it "
            "picks from the profile for a plain Schema), or use with_structured_output(Schema)"
        )
    unknown = sorted(set(kwargs) - set(decoding) - {"stop", "ls_structured_output_format"})
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {unknown} for bind_tools; it takes tool_choice, parallel_tool_calls, "
            f"strict, stop and the decoding fields {list(decoding)}"
        )
    bound = {name: value for name, value in flags.items() if value is not None}
    answers = answer_tools(tools)
    return {
        "tools": formatted,
        "tool_choice": tool_choice,
        **bound,
        **({"answer_tools": answers} if answers else {}),
        **kwargs,
    }


def answer_tools(tools: Sequence[Any]) -> list[str]:
    """The names of the tools nothing can run, whose call is the answer itself: a ``StructuredTool`` without a
    function, which is how ``create_agent`` binds its ``response_format`` (``ToolStrategy``)."""
    return [
        tool.name for tool in tools if isinstance(tool, StructuredTool) and tool.func is None and tool.coroutine is None
    ]


def structured_output(
    model: BaseChatModel, schema: dict[str, Any] | type | None, *, include_raw: bool, method: str, strict: bool | None
) -> Runnable[LanguageModelInput, Any]:
    """``model.with_structured_output``: ``model`` bound to a forced call of the schema's tool, and its parser."""
    if method not in ("function_calling", "json_schema", "json_mode"):
        raise ValueError(f"unknown method {method!r}; use 'function_calling', 'json_schema' or 'json_mode'")
    llm: Runnable[LanguageModelInput, Any]
    if schema is None and method == "json_mode":
        llm = model.bind(ls_structured_output_format={"kwargs": {"method": method}, "schema": None})
        parser = RunnableLambda(json_object, name="specguard_structured_output")
    elif schema is None:
        raise ValueError(
            "with_structured_output needs a schema (pydantic model, TypedDict or JSON schema), except with "
            "method='json_mode'"
        )
    else:
        name = openai_tools([schema])[0]["function"]["name"]
        llm = model.bind_tools(
            [schema],
            tool_choice=name,
            parallel_tool_calls=False,  # the answer is one call: generation ends with it
            strict=strict,
            ls_structured_output_format={"kwargs": {"method": method}, "schema": schema},
        )
        parser = RunnableLambda(structured_parser(schema, name), name="specguard_structured_output")
    if not include_raw:
        return llm | parser
    parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    failed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")
