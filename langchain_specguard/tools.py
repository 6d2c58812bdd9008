"""Tool calls in model output: the call formats, parsing, schema validation, and the prompt fallback.

Model output is data. It is read with ``json.loads`` only, never evaluated, and every function here
returns its verdict instead of raising on bad model output: a call that cannot be read becomes an
``InvalidToolCall`` (with the raw text and the reason), a call that reads but does not fit the
bound tools gets a rejection message from :func:`validate_tool_call`.

Two formats are understood, each a :class:`ToolFormat` object that owns its syntax end to end:

* **hermes** (Qwen 2.5/3, Hermes, and this package's fallback prompt):
  ``<tool_call>{"name": "f", "arguments": {...}}</tool_call>``, any number of them, with free text
  around them.
* **json** (Llama 3.x and other templates that ask for a bare JSON answer): the answer opens with
  ``{"name": "f", "parameters": {...}}`` (or a list of such objects), optionally after Llama's
  ``<|python_tag|>`` or in a Markdown code fence; further calls may follow, separated by ``;``
  (Llama's parallel calls). What counts as a call is one rule, :func:`~.engine.steps.json_region`,
  shared with the engine's step boundaries: text after the calls is content, and JSON anywhere else
  (in prose, or an object whose first key is not ``"name"``) is content too.

The engine sees none of this: it gets the format's step syntax as two plain parameters
(``tool_call_markers`` or ``json_tool_calls``) and a ``validate_step(text) -> reason | None`` callable
built by :meth:`ToolFormat.validator`, so it stays free of LangChain.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_core.messages import InvalidToolCall, ToolCall
from langchain_core.messages.tool import invalid_tool_call, tool_call

from .engine import json_region, marker_calls
from .engine.grammar import json_rule

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
            return invalid_tool_call(name=written_name(raw), args=raw, id=call_id, error=error)
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


_NAME = re.compile(r'\s*(?:```(?:json)?\s*)?\[?\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")')


def written_name(raw: str) -> str | None:
    """The tool name a call's text opens with (``{"name": "f", ...``), also when the rest does not read as JSON: an
    invalid call keeps the name it was written with, as LangChain's providers keep it."""
    match = _NAME.match(raw)
    if match is None:
        return None
    name, error = load_json(match.group(1))
    return name if error is None and isinstance(name, str) and name and _lone_surrogate(name) is None else None


def lenient_call(bad: InvalidToolCall) -> ToolCall | None:
    """An invalid call whose text reads as JSON the way Python's ``json`` reads it (``NaN``, ``Infinity``), as a call
    with the same id; None when even that does not give a call. Only for calls whose schema's own parser judges
    them (:attr:`~.binding.ToolSetup.answers`): strict JSON is this package's rule, not the schema's."""
    try:
        value = json.loads(bad.get("args") or "")
    except (ValueError, RecursionError):
        return None
    call = call_from_json(bad.get("args") or "", value) if isinstance(value, dict) else None
    args = call.get("args") if call is not None and call.get("type") != "invalid_tool_call" else None
    if call is None or not isinstance(args, dict):
        return None
    return tool_call(name=str(call["name"]), args=args, id=bad.get("id"))


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
    """Every ``<tool_call>...</tool_call>`` block; an unclosed last block is an invalid call. A block ends at the
    first closing marker outside its JSON strings (:func:`~.engine.steps.marker_calls`, the engine's rule too)."""
    opening, closing = markers
    parsed = ParsedOutput(content="")
    pieces: list[str] = []
    position = 0
    for start, end in marker_calls(text, markers):
        pieces.append(text[position:start])
        body = text[start + len(opening) : end].strip()
        if end is None:
            error = f"unterminated {opening}: no {closing}"
            unterminated = invalid_tool_call(name=written_name(body), args=body, id=new_call_id(), error=error)
            parsed.invalid_tool_calls.append(unterminated)
            position = len(text)
            break
        _add(parsed, call_from_json(body))
        position = end + len(closing)
    pieces.append(text[position:])
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


# --------------------------------------------------------------------------------------------------
# tool-call formats: each owns its syntax end to end


FALLBACK_TOOL_PROMPT = """You can call these tools:
{tools}

{instructions}
Each tool's result comes back in a {result} block. When you have what you need, answer in plain text."""


class ToolFormat(ABC):
    """One way of writing tool calls, end to end.

    ``name`` is its ``tool_call_format`` value and ``syntax`` its marker texts (kept plain text in messages
    where the tokenizer has them as tokens of their own). It owns the engine's step syntax for its calls
    (:meth:`step_options`: the ``SpecGuardParams`` fields that make each call one checked step), the start
    of an answer that must be a call (:meth:`forced_prefix`), past calls written as text for templates
    that print only content (:meth:`render_calls`) and the fallback prompt's instructions, parsing
    (:meth:`parse`), what streaming may show of a partial answer (:meth:`visible`), and the engine's check
    of one call step (:meth:`validator`, over :meth:`step_calls`). A new format (Mistral's
    ``[TOOL_CALLS]``, pythonic calls) is one more subclass.
    """

    name: ToolCallStyle
    syntax: tuple[str, ...]
    instructions: str  # the fallback prompt's description of the format

    @abstractmethod
    def step_options(self, caller_markers: tuple[str, str] | None) -> tuple[dict[str, Any], bool]:
        """The engine fields that make each call a step of its own (defaults: per-call values win), and whether
        each call step can be checked against the tools (``caller_markers``: the caller's own
        ``tool_call_markers``, if set)."""

    @abstractmethod
    def forced_prefix(self, name: str | None, any_call: bool) -> str:
        """The start of an answer that must be a call: of tool ``name``, or of any tool (``any_call``)."""

    @abstractmethod
    def calls_rule(self, tools: Sequence[Mapping[str, Any]]) -> str:
        """Lark rules (llguidance's syntax) that define ``calls``: one or more calls of ``tools`` (OpenAI format) as
        this format writes them, each one's arguments held to its tool's schema. Schema-constrained decoding with
        tools bound (``response_format``) allows an answer that is the JSON response or these calls."""

    @abstractmethod
    def render_calls(self, content: str, calls: Sequence[Mapping[str, Any]]) -> str:
        """An assistant turn's ``content`` and its ``calls`` (``{"name", "arguments"}``) as the model writes them."""

    @abstractmethod
    def parse(self, text: str) -> ParsedOutput:
        """``text`` split into content, tool calls and invalid tool calls; never raises on model output."""

    @abstractmethod
    def visible(self, text: str) -> str:
        """Content of a partial answer that is certain not to belong to a call (a prefix of the final content)."""

    @abstractmethod
    def step_calls(self, text: str) -> list[ToolCall | InvalidToolCall]:
        """The calls in the text of one call step (empty: the step holds no call)."""

    def validator(self, tools: Sequence[Mapping[str, Any]]) -> Callable[[str], str | None]:
        """The engine's ``validate_step``: the text of one tool-call step in, a rejection reason or None out."""
        schemas = tools_by_name(tools)

        def validate(text: str) -> str | None:
            calls = self.step_calls(text)
            if not calls:
                return f"no {self.syntax[0]} block in the step"
            return next((r for r in (validate_tool_call(c, schemas) for c in calls) if r is not None), None)

        return validate

    def fallback_prompt(self, tools: Sequence[Mapping[str, Any]]) -> str:
        """The system-prompt block that describes ``tools`` and this format, for templates that ignore ``tools``."""
        lines = [json.dumps(tool.get("function", tool), ensure_ascii=False) for tool in tools]
        result = RESPONSE_MARKERS[0]
        return FALLBACK_TOOL_PROMPT.format(tools="\n".join(lines), instructions=self.instructions, result=result)


@dataclass(frozen=True)
class MarkerFormat(ToolFormat):
    """Calls between an opening and a closing marker, anywhere in the answer, any number of them, text around
    them: Hermes and Qwen's ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, also this package's
    fallback prompt. The engine makes each block one step (``tool_call_markers``)."""

    markers: tuple[str, str] = HERMES_MARKERS
    name: ToolCallStyle = "hermes"

    @property
    def syntax(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.markers

    @property
    def instructions(self) -> str:  # type: ignore[override]
        opening, closing = self.markers
        return (
            "To call a tool, answer with one block per call, exactly like this:\n"
            f'{opening}\n{{"name": "<tool name>", "arguments": {{<arguments as a JSON object>}}}}\n{closing}'
        )

    def step_options(self, caller_markers: tuple[str, str] | None) -> tuple[dict[str, Any], bool]:
        return {"tool_call_markers": self.markers}, True

    def forced_prefix(self, name: str | None, any_call: bool) -> str:
        if not (name or any_call):
            return ""
        # the answer starts inside a block (and names the tool)
        return self.markers[0] + "\n" + (f'{{"name": {json.dumps(name)}, "arguments": ' if name else "")

    def calls_rule(self, tools: Sequence[Mapping[str, Any]]) -> str:
        opening, closing = (json.dumps(marker) for marker in (self.markers[0] + "\n", "\n" + self.markers[1]))
        return f'calls: call ("\\n" call)*\ncall: {opening} {json_rule(call_schema(tools, "arguments"))} {closing}'

    def render_calls(self, content: str, calls: Sequence[Mapping[str, Any]]) -> str:
        opening, closing = self.markers
        blocks = [f"{opening}\n{json.dumps(dict(call), ensure_ascii=False)}\n{closing}" for call in calls]
        return "\n".join([content, *blocks]) if content else "\n".join(blocks)  # content verbatim, spaces included

    def parse(self, text: str) -> ParsedOutput:
        return parse_hermes(text, self.markers)

    def visible(self, text: str) -> str:
        """An end that could still grow into the opening marker (``ab<tool_``) is held back too."""
        content = parse_hermes(text, self.markers).content
        opening = self.markers[0]
        for size in range(min(len(opening) - 1, len(content)), 0, -1):
            if content.endswith(opening[:size]):
                return content[:-size]
        return content

    def step_calls(self, text: str) -> list[ToolCall | InvalidToolCall]:
        parsed = parse_hermes(text, self.markers)
        return [*parsed.tool_calls, *parsed.invalid_tool_calls]


@dataclass(frozen=True)
class JsonFormat(ToolFormat):
    """Bare JSON calls that open the answer (Llama 3.x): ``{"name": ..., "parameters": {...}}``, or a list,
    more calls after ``;``, text after the calls is content (:func:`~.engine.steps.json_region`). The engine
    makes each JSON value one step (``json_tool_calls``)."""

    name: ToolCallStyle = "json"
    syntax: tuple[str, ...] = ("<|python_tag|>",)
    instructions: str = (
        'To call a tool, answer with nothing but the call, exactly like this (more calls follow after "; "):\n'
        '{"name": "<tool name>", "parameters": {<arguments as a JSON object>}}'
    )

    def step_options(self, caller_markers: tuple[str, str] | None) -> tuple[dict[str, Any], bool]:
        if caller_markers is not None:  # JSON read between the caller's own markers: checked when parsed
            return {}, False
        return {"json_tool_calls": True}, True

    def forced_prefix(self, name: str | None, any_call: bool) -> str:
        if name:
            return f'{{"name": {json.dumps(name)}, "parameters": '
        return '{"name": "' if any_call else ""  # the answer is a call; the model names the tool

    def calls_rule(self, tools: Sequence[Mapping[str, Any]]) -> str:
        return f'calls: call ("; " call)*\ncall: {json_rule(call_schema(tools, "parameters"))}'

    def render_calls(self, content: str, calls: Sequence[Mapping[str, Any]]) -> str:
        written = "; ".join(
            json.dumps({"name": call.get("name"), "parameters": call.get("arguments")}, ensure_ascii=False)
            for call in calls
        )
        return f"{written}\n\n{content}" if content else written

    def parse(self, text: str) -> ParsedOutput:
        return parse_json_style(text) or ParsedOutput(content=text)

    def visible(self, text: str) -> str:
        """The calls open the answer: what follows them is content once they are over."""
        region = json_region(text)
        return "" if region.growing else text[region.content :]

    def step_calls(self, text: str) -> list[ToolCall | InvalidToolCall]:
        return json_value_calls(text.strip())  # the engine hands over exactly one balanced JSON value


def call_schema(tools: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    """The JSON schema of one call of any of ``tools`` (OpenAI format): ``{"name": <its name>, key: <arguments>}``."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool["function"]["name"]},
                key: tool["function"].get("parameters") or {"type": "object", "properties": {}},
            },
            "required": ["name", key],
        }
        for tool in tools
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


HERMES = MarkerFormat()
JSON_CALLS = JsonFormat()
FORMATS: dict[str, ToolFormat] = {fmt.name: fmt for fmt in (HERMES, JSON_CALLS)}
OUTPUT_SYNTAX: tuple[str, ...] = tuple(
    dict.fromkeys([*(t for f in FORMATS.values() for t in f.syntax), *RESPONSE_MARKERS])
)
"""Every marker text of the known formats and of tool results: never a token of its own in message text."""


def parse_tool_calls(text: str, style: ToolCallStyle | Literal["auto"] = "auto") -> ParsedOutput:
    """Split ``text`` into content, tool calls and invalid tool calls; never raises on model output.

    ``auto`` reads Hermes blocks when the text has an opening marker and the bare-JSON style
    otherwise. Text with no call is returned unchanged as content.
    """
    if style == "auto":
        style = "hermes" if HERMES_MARKERS[0] in text else "json"
    return FORMATS[style].parse(text)


def step_validator(
    tools: Sequence[Mapping[str, Any]], style: ToolCallStyle = "hermes", markers: tuple[str, str] = HERMES_MARKERS
) -> Callable[[str], str | None]:
    """The engine's ``validate_step`` for ``style`` (:meth:`ToolFormat.validator`).

    Hermes: the step's ``<tool_call>`` blocks (between ``markers``). JSON: the step is one call's JSON value
    (the engine hands over exactly the balanced ``{...}``), an object or a list of calls.
    """
    return (MarkerFormat(markers) if style == "hermes" else FORMATS[style]).validator(tools)


def fallback_tool_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-prompt block that describes ``tools`` and the Hermes call format."""
    return HERMES.fallback_prompt(tools)
