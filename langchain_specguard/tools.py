"""Tool calls in model output: parsing, schema validation, and the prompt fallback.

Model output is data. It is read with ``json.loads`` only, never evaluated, and every function here
returns its verdict instead of raising on bad model output: a call that cannot be read becomes an
``InvalidToolCall`` (with the raw text and the reason), a call that reads but does not fit the
bound tools gets a rejection message from :func:`validate_tool_call`.

Two output styles are understood:

* **hermes** (Qwen 2.5/3, Hermes, and this package's fallback prompt):
  ``<tool_call>{"name": "f", "arguments": {...}}</tool_call>``, any number of them, with free text
  around them.
* **json** (Llama 3.x and other templates that ask for a bare JSON answer): the answer opens with
  ``{"name": "f", "parameters": {...}}`` (or a list of such objects), optionally after Llama's
  ``<|python_tag|>`` or in a Markdown code fence; further calls may follow, separated by ``;``
  (Llama's parallel calls). What counts as a call is one rule, :func:`~.engine.steps.json_region`,
  shared with the engine's step boundaries: text after the calls is content, and JSON anywhere else
  (in prose, or an object whose first key is not ``"name"``) is content too.

The engine sees none of this: it gets a plain ``validate_step(text) -> reason | None`` callable
built by :func:`step_validator`, so it stays free of LangChain.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, InvalidToolCall, ToolCall
from langchain_core.messages.tool import invalid_tool_call, tool_call
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ValidationError

from .engine.steps import json_region
from .reasoning import ThoughtSpec

ToolCallStyle = Literal["hermes", "json"]
HERMES_MARKERS: tuple[str, str] = ("<tool_call>", "</tool_call>")
RESPONSE_MARKERS: tuple[str, str] = ("<tool_response>", "</tool_response>")
"""How a tool result is written back to the model (the fallback prompt, Qwen's and Hermes' templates)."""

# nesting deeper than this is refused before json.loads can hit Python's recursion limit
_MAX_DEPTH = 64


@dataclass
class ParsedOutput:
    """A model message split into its free text and its tool calls."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _too_deep(text: str) -> bool:
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest > _MAX_DEPTH


def load_json(text: str) -> tuple[Any, str | None]:
    """``(value, None)`` for valid JSON, ``(None, reason)`` otherwise; never raises.

    Strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` (which Python's ``json`` accepts) are refused, and so
    is a number too large for a float (``1e99999``, which would read as infinity).
    """
    if _too_deep(text):
        return None, f"JSON nested deeper than {_MAX_DEPTH} levels"
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError, so are huge ints
        return None, f"not valid JSON: {err}"
    return value, None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a number")
    return value


def _lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) in ``value`` that UTF-8 cannot encode, if any."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value
        return None
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else []
    return next((bad for bad in map(_lone_surrogate, items) if bad is not None), None)


def call_from_json(raw: str, value: Any = None) -> ToolCall | InvalidToolCall:
    """One call from its JSON text (``{"name": ..., "arguments"|"parameters": {...}}``)."""
    call_id = new_call_id()
    if value is None:
        value, error = load_json(raw)
        if error is not None:
            return invalid_tool_call(name=None, args=raw, id=call_id, error=error)
    if not isinstance(value, dict):
        return invalid_tool_call(name=None, args=raw, id=call_id, error="a tool call must be a JSON object")
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return invalid_tool_call(name=None, args=raw, id=call_id, error='a tool call needs a string "name"')
    args: Any = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):  # some models encode the arguments object as a JSON string
        args, error = load_json(args)
        if error is not None:
            return invalid_tool_call(name=name, args=raw, id=call_id, error=f"arguments are a string but {error}")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return invalid_tool_call(name=name, args=raw, id=call_id, error="the arguments must be a JSON object")
    bad = _lone_surrogate([name, args])  # "\ud800" is valid JSON but no text: no later prompt could hold it
    if bad is not None:
        error = f"not valid text: the string {bad!a} holds a lone surrogate"
        return invalid_tool_call(name=None if bad == name else name, args=raw, id=call_id, error=error)
    return tool_call(name=name, args=args, id=call_id)


def inert_args(text: str) -> str:
    """An invalid call's argument text as a JSON string, which reads back (``json.loads``) as that text.

    LangChain adds streamed ``tool_call_chunks`` up by parsing their arguments, and any chunk whose
    arguments parse (even partially: ``{"a": 1`` does) into an object becomes a tool call. A JSON string
    never is an object, so an invalid call written this way stays invalid in every sum of chunks.
    """
    return json.dumps(text, ensure_ascii=False)


def inert(call: InvalidToolCall) -> InvalidToolCall:
    """``call`` with its arguments as :func:`inert_args` writes them (on every path: invoke and stream)."""
    return invalid_tool_call(
        name=call.get("name"), args=inert_args(call.get("args") or ""), id=call.get("id"), error=call.get("error")
    )


def _add(parsed: ParsedOutput, call: ToolCall | InvalidToolCall) -> None:
    if call.get("type") == "invalid_tool_call":
        parsed.invalid_tool_calls.append(call)  # type: ignore[arg-type]
    else:
        parsed.tool_calls.append(call)  # type: ignore[arg-type]


def parse_hermes(text: str, markers: tuple[str, str] = HERMES_MARKERS) -> ParsedOutput:
    """Every ``<tool_call>...</tool_call>`` block; an unclosed last block is an invalid call."""
    opening, closing = markers
    parsed = ParsedOutput(content="")
    pieces: list[str] = []
    pos = 0
    while True:
        start = text.find(opening, pos)
        if start < 0:
            pieces.append(text[pos:])
            break
        pieces.append(text[pos:start])
        body_start = start + len(opening)
        end = text.find(closing, body_start)
        body = text[body_start:] if end < 0 else text[body_start:end]
        if end < 0:
            parsed.invalid_tool_calls.append(
                invalid_tool_call(
                    name=None, args=body.strip(), id=new_call_id(), error=f"unterminated {opening}: no {closing}"
                )
            )
            break
        _add(parsed, call_from_json(body.strip()))
        pos = end + len(closing)
    parsed.content = "".join(pieces)
    return parsed


def json_value_calls(raw: str) -> list[ToolCall | InvalidToolCall]:
    """The calls in one JSON value: an object is one call, a list holds one per item."""
    value, error = load_json(raw)
    if error is not None:
        return [invalid_tool_call(name=None, args=raw, id=new_call_id(), error=error)]
    items = value if isinstance(value, list) else [value]
    if not items:
        return [invalid_tool_call(name=None, args=raw, id=new_call_id(), error="an empty list of tool calls")]
    return [call_from_json(json.dumps(item), item) for item in items]


def parse_json_style(text: str) -> ParsedOutput | None:
    """The JSON calls that open ``text`` (:func:`~.engine.steps.json_region`) and the content after them.

    None when the text opens with no call (it is all content). A call the text breaks off is an
    invalid call holding its raw text.
    """
    region = json_region(text)
    if not region.spans and region.open_at is None:
        return None
    parsed = ParsedOutput(content=text[region.content :])
    for start, end in region.spans:
        for call in json_value_calls(text[start:end]):
            _add(parsed, call)
    if region.open_at is not None:
        raw = text[region.open_at :].strip()
        _, error = load_json(raw)
        reason = error or "the JSON tool call is not finished"
        parsed.invalid_tool_calls.append(invalid_tool_call(name=None, args=raw, id=new_call_id(), error=reason))
    return parsed


def parse_tool_calls(text: str, style: ToolCallStyle | Literal["auto"] = "auto") -> ParsedOutput:
    """Split ``text`` into content, tool calls and invalid tool calls; never raises on model output.

    ``auto`` reads Hermes blocks when the text has an opening marker and the bare-JSON style
    otherwise. Text with no call is returned unchanged as content.
    """
    if style in ("hermes", "auto") and HERMES_MARKERS[0] in text:
        return parse_hermes(text)
    if style in ("json", "auto"):
        parsed = parse_json_style(text)
        if parsed is not None:
            return parsed
    return ParsedOutput(content=text)


# --------------------------------------------------------------------------------------------------
# validation against the bound tools' JSON schemas

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_errors(value: Any, schema: Mapping[str, Any], path: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema``, for the JSON-schema subset ``convert_to_openai_tool`` emits.

    Checked: ``type`` (one or a list), ``enum``, ``const``, ``properties``/``required``/
    ``additionalProperties``, array ``items``/``minItems``/``maxItems``, ``anyOf``/``oneOf``/
    ``allOf``, string ``minLength``/``maxLength`` and number bounds. Keywords outside that subset
    (``$ref``, ``pattern``, ``format``...) are not checked: a call is only rejected for a reason
    this function can name.
    """
    if not isinstance(schema, Mapping):
        return []
    errors: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        known = [k for k in kinds if k in _TYPES]
        if known and not any(_TYPES[k](value) for k in known):
            return [f"{path}: expected {' or '.join(known)}, got {type(value).__name__}"]
    if "enum" in schema and isinstance(schema["enum"], list) and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']!r}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: must be {schema['const']!r}")
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options and all(schema_errors(value, o, path) for o in options):
            errors.append(f"{path}: matches none of the {key} options")
    for sub in schema.get("allOf") or []:
        errors.extend(schema_errors(value, sub, path))
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for name in schema.get("required") or []:
            if name not in value:
                errors.append(f"{path}: missing required property {name!r}")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                errors.extend(schema_errors(item, properties[name], f"{path}.{name}"))
            elif extra is False:
                errors.append(f"{path}: unexpected property {name!r}")
            elif isinstance(extra, Mapping):
                errors.extend(schema_errors(item, extra, f"{path}.{name}"))
    if isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            for i, item in enumerate(value):
                errors.extend(schema_errors(item, items, f"{path}[{i}]"))
        if isinstance(schema.get("minItems"), int) and len(value) < schema["minItems"]:
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if isinstance(schema.get("maxItems"), int) and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
    if isinstance(value, str):
        if isinstance(schema.get("minLength"), int) and len(value) < schema["minLength"]:
            errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if isinstance(schema.get("maxLength"), int) and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']} characters")
    if _TYPES["number"](value):
        for key, ok in (
            ("minimum", lambda b: value >= b),
            ("maximum", lambda b: value <= b),
            ("exclusiveMinimum", lambda b: value > b),
            ("exclusiveMaximum", lambda b: value < b),
        ):
            bound = schema.get(key)
            if _TYPES["number"](bound) and not ok(bound):
                errors.append(f"{path}: violates {key} {bound}")
    return errors


def tools_by_name(tools: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """``{name: parameters schema}`` from OpenAI-format tools (``convert_to_openai_tool`` output)."""
    out: dict[str, Mapping[str, Any]] = {}
    for tool in tools:
        function = tool.get("function", tool)
        out[function["name"]] = function.get("parameters") or {"type": "object", "properties": {}}
    return out


def validate_tool_call(call: ToolCall | InvalidToolCall, tools: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Why ``call`` does not fit the bound ``tools`` (``{name: parameters schema}``), or None if it does."""
    if call.get("type") == "invalid_tool_call":
        return str(call.get("error") or "the tool call could not be parsed")
    name = call.get("name")
    if name not in tools:
        return f"unknown tool {name!r}; bound tools: {sorted(tools)}"
    errors = schema_errors(call.get("args"), tools[str(name)])
    return "; ".join(errors[:5]) or None


def step_validator(
    tools: Sequence[Mapping[str, Any]], style: ToolCallStyle = "hermes", markers: tuple[str, str] = HERMES_MARKERS
) -> Callable[[str], str | None]:
    """The engine's ``validate_step``: the text of one tool-call step in, a rejection reason or None out.

    Hermes: the step's ``<tool_call>`` blocks. JSON: the step is one call's JSON value (the engine
    hands over exactly the balanced ``{...}``), an object or a list of calls.
    """
    schemas = tools_by_name(tools)

    def validate(text: str) -> str | None:
        if style == "json":
            calls = json_value_calls(text.strip())
        else:
            parsed = parse_hermes(text, markers)
            calls = [*parsed.tool_calls, *parsed.invalid_tool_calls]
            if not calls:
                return f"no {markers[0]} block in the step"
        for call in calls:
            reason = validate_tool_call(call, schemas)
            if reason is not None:
                return reason
        return None

    return validate


# --------------------------------------------------------------------------------------------------
# prompt fallback for chat templates that ignore ``tools``

FALLBACK_TOOL_PROMPT = """You can call these tools:
{tools}

To call a tool, answer with one block per call, exactly like this:
<tool_call>
{{"name": "<tool name>", "arguments": {{<arguments as a JSON object>}}}}
</tool_call>
Each tool's result comes back in a <tool_response> block. When you have what you need, answer in plain text."""


def fallback_tool_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-prompt block that describes ``tools`` and the Hermes call format."""
    lines = [json.dumps(tool.get("function", tool), ensure_ascii=False) for tool in tools]
    return FALLBACK_TOOL_PROMPT.format(tools="\n".join(lines))


# --------------------------------------------------------------------------------------------------
# binding: tools and tool_choice checked, one call's tool setup, past calls rendered, structured output


@dataclass
class ToolSetup:
    """Everything one call needs to know about its bound tools (empty when none are bound), and its think block."""

    tools: list[dict[str, Any]] | None = None
    style: ToolCallStyle = "hermes"
    markers: tuple[str, str] | None = None
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


def render_tool_turns(messages: list[dict[str, Any]], native: bool) -> list[dict[str, Any]]:
    """Past tool calls (their arguments already parsed) and results in the shape the chat template can render.

    Templates that take tools get HF's convention (``tool_calls[].function.arguments`` as a dict,
    ``role: tool`` results). The others get the calls written into the assistant's content as
    ``<tool_call>`` blocks and each result as a user turn holding a ``<tool_response>`` block, so a
    template that only prints ``content`` (Gemma's, plain ChatML) still shows them to the model.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        calls = message.get("tool_calls") or []
        if message["role"] == "assistant" and calls:
            structured = [
                {"name": call.get("function", {}).get("name"), "arguments": call.get("function", {}).get("arguments")}
                for call in calls
            ]
            if native:
                message = {
                    **message,
                    "tool_calls": [
                        {"type": "function", "id": c.get("id"), "function": s}
                        for c, s in zip(calls, structured, strict=True)
                    ],
                }
            else:
                blocks = [
                    f"{HERMES_MARKERS[0]}\n{json.dumps(s, ensure_ascii=False)}\n{HERMES_MARKERS[1]}" for s in structured
                ]
                content = message.get("content") or ""  # verbatim: the model's own words, spaces included
                text = "\n".join([content, *blocks]) if content else "\n".join(blocks)
                message = {**{k: v for k, v in message.items() if k != "tool_calls"}, "content": text}
        elif message["role"] == "tool" and not native:
            opening, closing = RESPONSE_MARKERS
            message = {"role": "user", "content": f"{opening}\n{message.get('content', '')}\n{closing}"}
        out.append(message)
    return out
