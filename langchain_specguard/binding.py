"""Binding tools to a call: tools and ``tool_choice`` checked, one call's tool setup and what it makes of the
answer, structured output.

What ``bind_tools``, ``with_structured_output`` and per-call ``tools=`` need before anything is generated;
how calls are written and read is :mod:`.tools`.
"""

from __future__ import annotations

import functools
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
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import Generation
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.tools import StructuredTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import BaseModel, ValidationError
from pydantic.v1 import BaseModel as BaseModelV1
from pydantic.v1 import ValidationError as ValidationErrorV1

from .engine.grammar import Grammar, json_rule
from .reasoning import ThoughtSpec
from .tools import HERMES, ToolFormat, inert, lenient_call, tools_by_name, validate_tool_call


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
    grammar: Grammar | None = None  # what the answer must match (response_format): decoding is constrained to it

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
    response_format: Any = None  # OpenAI's response_format (checked: response_schema)

    @classmethod
    def take(cls, kwargs: dict[str, Any]) -> ToolRequest:
        """The tool options popped from a call's keyword arguments (their flags and response format checked before
        anything loads)."""
        parallel = tool_flag("parallel_tool_calls", kwargs.pop("parallel_tool_calls", None))
        tool_flag("strict", kwargs.pop("strict", None))  # calls are always schema-checked (see bind_tools)
        kwargs.pop("ls_structured_output_format", None)
        answers = tuple(kwargs.pop("answer_tools", ()))
        response_format = kwargs.pop("response_format", None)
        response_schema(response_format)
        return cls(kwargs.pop("tools", None), kwargs.pop("tool_choice", None), parallel, answers, response_format)

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
            return ToolSetup(grammar=response_grammar(self.response_format, None, fmt))
        options, checked = fmt.step_options(kwargs.get("tool_call_markers", markers))
        for name, value in options.items():
            kwargs.setdefault(name, value)
        prefix = fmt.forced_prefix(forced_tool_name(tool_choice), tool_choice in ("any", "required", True))
        return ToolSetup(
            tools=list(tools),
            format=fmt,
            validate=fmt.validator(tools) if checked else None,
            prefix=prefix,
            single_call=self.parallel_tool_calls is False,
            answers=frozenset([*self.answer_tools, *answer_tools(self.tools or [])]),
            # a forced call is the answer the caller asked for: the response format does not apply to it
            grammar=None if prefix else response_grammar(self.response_format, tools, fmt),
        )


JSON_STEP_DELIMITERS = (", ",)
"""Where a constrained JSON answer's steps also end (after each item of an object or array): each verified field
reaches a stream as it is written, and a streamed JSON answer grows field by field, as other chat models' do."""


def response_schema(response_format: Any) -> tuple[dict[str, Any] | None, str] | None:
    """What ``response_format`` asks for, checked: ``(JSON schema, name)``, ``(None, "any JSON object")`` for JSON
    mode, None for free text (or none given). Takes OpenAI's shapes (``{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}}}``, ``{"type": "json_object"}``, ``{"type": "text"}``) and a pydantic model or
    TypedDict, as ChatOpenAI does; the schema is compiled here, so one the grammar library cannot use fails now."""
    if response_format is None:
        return None
    if isinstance(response_format, type):
        converted = convert_to_json_schema(response_format)
        found: tuple[dict[str, Any] | None, str] = (converted, str(converted.get("title") or response_format.__name__))
    elif isinstance(response_format, dict) and response_format.get("type") == "text":
        return None
    elif isinstance(response_format, dict) and response_format.get("type") == "json_object":
        found = (None, "any JSON object")
    elif isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError(
                "response_format {'type': 'json_schema', ...} needs 'json_schema': {'name': ..., 'schema': {...}} "
                f"with the JSON schema under 'schema', got {spec!r}"
            )
        found = (spec["schema"], str(spec.get("name") or spec["schema"].get("title") or "response"))
    else:
        raise ValueError(
            "response_format must be {'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}, "
            f"{{'type': 'json_object'}}, {{'type': 'text'}}, a pydantic model or a TypedDict; got {response_format!r}"
        )
    given, name = found
    compiled_schema(schema_text(given if given is not None else {"type": "object"}), name)
    return found


def schema_text(schema: dict[str, Any]) -> str:
    """A JSON schema as JSON text (the compiled grammars' cache key), or a ValueError saying it is not JSON."""
    try:
        return json.dumps(schema)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the response_format schema is not JSON: {error}") from error


@functools.lru_cache(maxsize=64)
def compiled_schema(schema: str, name: str) -> Grammar:
    """The grammar of a JSON schema (given as its JSON text: hashable), compiled once per schema. The text keeps the
    schema's key order: the grammar writes an object's properties in the order the schema names them."""
    return Grammar.json_schema(json.loads(schema), name=name)


def response_grammar(response_format: Any, tools: Sequence[dict[str, Any]] | None, fmt: ToolFormat) -> Grammar | None:
    """The grammar a call's answer must match: the response format's JSON, or, with tools bound, that JSON or calls
    of the tools in the model's format (the model answers or calls a tool, as it would with ChatOpenAI)."""
    found = response_schema(response_format)
    if found is None:
        return None
    schema, name = found
    answer = schema if schema is not None else {"type": "object"}
    if not tools:
        return compiled_schema(schema_text(answer), name)
    names = ", ".join(tool["function"]["name"] for tool in tools)
    rules = ["start: answer | calls", f"answer: {json_rule(answer)}", fmt.calls_rule(constrainable(tools))]
    return Grammar.lark("\n".join(rules), f"{name} or a call of {names}")


def constrainable(tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``tools`` with any arguments schema the grammar library cannot compile (a keyword it does not implement, such
    as ``not``) loosened to any JSON object: such a tool can still be called, and its calls are checked against its
    schema as every call is (a broken draft call rejected, a broken final call an ``invalid_tool_call``)."""
    out = []
    for tool in tools:
        parameters = tool["function"].get("parameters") or {"type": "object", "properties": {}}
        try:
            compiled_schema(schema_text(parameters), tool["function"]["name"])
        except ValueError:
            tool = {**tool, "function": {**tool["function"], "parameters": {"type": "object"}}}
        out.append(tool)
    return out


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
    response_schema(kwargs.get("response_format"))  # what create_agent passes for a ProviderStrategy, checked now
    unknown = sorted(set(kwargs) - set(decoding) - {"stop", "ls_structured_output_format", "response_format"})
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {unknown} for bind_tools; it takes tool_choice, parallel_tool_calls, "
            f"strict, response_format, stop and the decoding fields {list(decoding)}"
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
    """``model.with_structured_output``: ``json_schema`` and ``json_mode`` constrain decoding to the schema (or to any
    JSON object) through ``response_format``; ``function_calling`` binds a forced call of the schema's tool."""
    if method not in ("function_calling", "json_schema", "json_mode"):
        raise ValueError(f"unknown method {method!r}; use 'function_calling', 'json_schema' or 'json_mode'")
    if schema is None and method != "json_mode":
        raise ValueError(
            "with_structured_output needs a schema (pydantic model, TypedDict or JSON schema), except with "
            "method='json_mode'"
        )
    traced = {"ls_structured_output_format": {"kwargs": {"method": method}, "schema": schema}}
    llm: Runnable[LanguageModelInput, Any]
    parser: Runnable[Any, Any]
    if method == "function_calling":
        assert schema is not None
        name = openai_tools([schema])[0]["function"]["name"]
        llm = model.bind_tools(
            [schema],
            tool_choice=name,
            parallel_tool_calls=False,  # the answer is one call: generation ends with it
            strict=strict,
            **traced,
        )
        parser = RunnableLambda(structured_parser(schema, name), name="specguard_structured_output")
    else:
        response_format = json_response_format(schema)
        response_schema(response_format)  # a schema the grammar library cannot compile fails here, at bind time
        llm = model.bind(response_format=response_format, **traced)
        parser = json_parser(schema)
    if not include_raw:
        return llm | parser
    parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    failed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")


def json_response_format(schema: dict[str, Any] | type | None) -> dict[str, Any]:
    """OpenAI's ``response_format`` for ``schema`` (None: any JSON object)."""
    if schema is None:
        return {"type": "json_object"}
    json_schema = convert_to_json_schema(schema)
    name = str(json_schema.get("title") or getattr(schema, "__name__", "response"))
    return {"type": "json_schema", "json_schema": {"name": name, "schema": json_schema}}


def json_parser(schema: dict[str, Any] | type | None) -> Runnable[Any, Any]:
    """The parser of a constrained JSON answer, langchain-core's own: a pydantic model (v2 or ``pydantic.v1``) gives
    an instance of itself, anything else the object as a dict, and a stream of either grows as the answer is
    written (``JsonOutputParser``'s partial parsing, as ChatOpenAI's and ChatOllama's streams do)."""
    if isinstance(schema, type) and issubclass(schema, (BaseModel, BaseModelV1)):
        return CompletePydanticParser(pydantic_object=schema)
    return CompleteJsonParser()


class CompleteJsonParser(JsonOutputParser):
    """``JsonOutputParser``, whose partial parsing streams the growing object, but whose answer to ``invoke`` must be
    the complete JSON: an answer cut short (``max_tokens`` ran out mid-object, a stop sequence) is an
    ``OutputParserException`` saying so, not the object read as far as it went."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        if not partial:
            text = result[0].text
            try:
                json.loads(text)
            except ValueError as error:
                raise OutputParserException(f"the answer is not complete JSON ({error})", llm_output=text) from error
        return super().parse_result(result, partial=partial)


class CompletePydanticParser(PydanticOutputParser):
    """``PydanticOutputParser`` held to the same rule (:class:`CompleteJsonParser`)."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        if not partial:
            CompleteJsonParser().parse_result(result)
        return super().parse_result(result, partial=partial)
