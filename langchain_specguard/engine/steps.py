"""Where a reasoning step ends, and where a stop sequence cuts the output.

Steps are found in decoded text, not in token ids: tokenizers merge a delimiter such as a blank
line into many different tokens (``".\\n\\n"``, ``"\\n\\n\\n"``...), so matching ids would miss most of
them. Tokens are atomic, so a step ends *with* the token that completes its delimiter.

A tool call is one step whatever the delimiters say. Two call syntaxes are known (:class:`CallSyntax`):
calls between markers (``<tool_call>...</tool_call>``, :class:`MarkerCalls`) and bare JSON calls that
open the answer (Llama 3.x, :class:`JsonCalls`; the rule is :func:`json_calls`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol


def step_complete(text: str, delimiters: Sequence[str]) -> bool:
    """True once ``text`` (the step so far) holds a delimiter after some non-blank content.

    Whitespace before the first visible character belongs to the step, so a step never consists of
    a lone delimiter (models often emit the blank line that ends one step at the start of the next).
    """
    body = text.lstrip()
    if not body:
        return False
    return any(delimiter in body for delimiter in delimiters)


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index in ``text`` where the earliest stop sequence begins, searching from ``start``; else None."""
    hits = [i for i in (text.find(stop, start) for stop in stops if stop) if i >= 0]
    return min(hits) if hits else None


def new_text(previous: str, current: str) -> str:
    """Text added by the tokens decoded since ``previous``.

    Steps are decoded as part of the whole output (``decode(all) - decode(before)``) because
    decoding a step alone can drop or add a leading space (SentencePiece) or split a multi-byte
    character. When a split character is completed later the earlier text changes; then the new
    text is what follows the common prefix.
    """
    if current.startswith(previous):
        return current[len(previous) :]
    common = 0
    for a, b in zip(previous, current, strict=False):
        if a != b:
            break
        common += 1
    return current[common:]


def closing_at(text: str, start: int, closing: str) -> int | None:
    """Where the first ``closing`` marker at or after ``start`` begins, outside JSON strings; else None.

    A marker call's body is JSON: a closing marker inside one of its strings (an argument's text) is that
    text, not the call's end, as :func:`json_end` reads brackets. ``start`` must lie outside a string.
    """
    return next((i for i, _ in outside_strings(text, start) if text.startswith(closing, i)), None)


def outside_strings(text: str, start: int) -> Iterator[tuple[int, str]]:
    """The characters of ``text`` from ``start`` (outside a string) that lie outside JSON strings, with their index.

    A quote opens a string, which a quote not escaped by a backslash closes; the quotes themselves are not yielded.
    """
    in_string = escaped = False
    for i in range(start, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        else:
            yield i, char


def marker_calls(text: str, markers: tuple[str, str]) -> list[tuple[int, int | None]]:
    """Each marker call in ``text``: where its opening marker starts and where its closing marker starts (None
    for a call still open at the end). Markers inside a call's JSON strings belong to the call."""
    opening, closing = markers
    calls: list[tuple[int, int | None]] = []
    position = 0
    while (start := text.find(opening, position)) >= 0:
        end = closing_at(text, start + len(opening), closing)
        calls.append((start, end))
        if end is None:
            break
        position = end + len(closing)
    return calls


def open_call_start(text: str, markers: tuple[str, str] | None) -> int | None:
    """Index of the opening marker of a tool call still open at the end of ``text``, else None."""
    if markers is None:
        return None
    calls = marker_calls(text, markers)
    return calls[-1][0] if calls and calls[-1][1] is None else None


def is_tool_call_step(text: str, markers: tuple[str, str] | None, continues_call: bool = False) -> bool:
    """True when the step (so far) is, or may still become, a tool call.

    A tool-call step opens with the opening marker after optional whitespace, or continues a call
    left open by the previous step (one cut by the token cap). While the step is still a prefix of
    the opening marker it may become one, so it must not end at a CoT delimiter yet.
    """
    if markers is None:
        return False
    if continues_call:
        return True
    body = text.lstrip()
    return bool(body) and (body.startswith(markers[0]) or markers[0].startswith(body))


def tool_step_complete(text: str, markers: tuple[str, str], continues_call: bool = False) -> bool:
    """A tool-call step ends with the token that completes its closing marker, never before; a closing marker
    inside the call's JSON strings is argument text (:func:`closing_at`). ``continues_call``: ``text`` starts
    inside a call, outside its strings (:class:`MarkerCalls` reads a continued call from its opening marker)."""
    opening, closing = markers
    start = 0 if continues_call else text.find(opening)
    if start < 0:
        return False
    return closing_at(text, start + (0 if continues_call else len(opening)), closing) is not None


def marker_split(text: str, markers: tuple[str, str] | None) -> int | None:
    """Where a text step must be cut so a tool call it ran into starts a step of its own.

    Returns the index of the opening marker when it follows some non-blank text, else None.
    """
    if markers is None:
        return None
    at = text.find(markers[0])
    if at <= 0 or not text[:at].strip():
        return None
    return at


# --------------------------------------------------------------------------------------------------
# bare JSON tool calls (Llama 3.x: the answer is ``{"name": ..., "parameters": {...}}``)

PYTHON_TAG = "<|python_tag|>"
FENCE = "```"
_CALL_OPENING = ("{", '"name"', ":")


def json_end(text: str, start: int) -> int | None:
    """Index just past the JSON object or array opened at ``text[start]``, else None while it is open.

    Brackets are matched outside strings only (a ``}`` inside ``"a}"`` or after ``\\"`` does not
    count), so the end is found without parsing; whether the value is valid JSON is the validator's
    question.
    """
    depth = 0
    for i, char in outside_strings(text, start):
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _skip_separators(text: str, i: int) -> tuple[int, bool]:
    """Past the whitespace, ``;``, ``<|python_tag|>`` and code fences at ``i``; and whether the text ends there.

    The text also ends "there" when what is left may still grow into a tag or a fence (``<|pyth``,
    ````` ``js`` `````).
    """
    n = len(text)
    while i < n:
        if text[i].isspace() or text[i] == ";":
            i += 1
        elif text.startswith(PYTHON_TAG, i):
            i += len(PYTHON_TAG)
        elif text.startswith(FENCE, i):
            j = i + len(FENCE)
            while j < n and (text[j].isalpha() or text[j] == "_"):  # the fence's language word
                j += 1
            if j == n:
                return i, True
            if j > i + len(FENCE) and not text[j].isspace():
                return i, False  # letters glued to a fence: prose, not a fence opener
            i = j
        else:
            rest = text[i:]
            return i, PYTHON_TAG.startswith(rest) or FENCE.startswith(rest)
    return i, True


def _call_opening(text: str, i: int) -> Literal["call", "maybe", "no"]:
    """Whether ``text[i:]`` opens a call: ``{"name":`` or ``[{"name":``, whitespace allowed between the parts.

    ``maybe``: the text ends in a prefix of such an opening.
    """
    n = len(text)
    if text.startswith("[", i):
        i += 1
    for piece in _CALL_OPENING:
        while i < n and text[i].isspace():
            i += 1
        got = text[i : i + len(piece)]
        if got != piece:
            return "maybe" if i + len(got) == n and piece.startswith(got) else "no"
        i += len(piece)
    return "call"


@dataclass(frozen=True)
class JsonRegion:
    """The bare-JSON tool calls that open a text, as :func:`json_region` reads them."""

    spans: tuple[tuple[int, int], ...]  # each finished call's JSON value (an object, or a list of them)
    open_at: int | None  # where a call still open at the end of the text starts
    content: int  # where the content after the calls starts (0: no call, the whole text is content)
    growing: bool  # the text ends where the calls may still go on (inside one, between two, in an opening)
    opening_at: int | None = None  # the text ends in what may still become a call's opening (``{"na``): there


def json_region(text: str) -> JsonRegion:
    """The JSON tool calls that open ``text``: the one rule for "this JSON is a tool call".

    A call is a JSON object whose first key is ``"name"`` (``{"name": ...}``, whitespace allowed), or
    a list that starts with one, and it counts only where the answer starts: after nothing but
    whitespace, Llama's ``<|python_tag|>`` or a Markdown code fence. Further calls may follow, separated
    by ``;`` (Llama's parallel calls), whitespace or fences. The first other character ends the calls
    for good: what follows is content, and JSON inside prose (``the set {"name": 1}``) never is a call.
    Each call ends at the bracket that balances its first one (outside strings).
    """
    spans: list[tuple[int, int]] = []
    i = 0
    while True:
        at, ends = _skip_separators(text, i)
        if ends:
            return JsonRegion(tuple(spans), None, len(text) if spans else 0, True)
        opening = _call_opening(text, at)
        if opening == "maybe":
            return JsonRegion(tuple(spans), None, at if spans else 0, True, at)
        if opening == "no":
            return JsonRegion(tuple(spans), None, at if spans else 0, False)
        end = json_end(text, at)
        if end is None:
            return JsonRegion(tuple(spans), at, len(text), True)
        spans.append((at, end))
        i = end


# --------------------------------------------------------------------------------------------------
# one interface over both syntaxes, for the step rules in :mod:`.text`


@dataclass(frozen=True)
class CallStep:
    """A step (so far) as the tool-call rules see it."""

    call: bool  # the step is (part of) a tool call: it is committed with kind "tool_call"
    maybe: bool  # the step is, or may still become, a call: no CoT delimiter may end it
    complete: bool  # the call in the step is finished: the step ends here
    call_text: str  # the call from its opening (maybe in an earlier step) to its end, for the validator
    split: int | None = None  # a text step that ran into a call: where the call starts (the step is cut there)


class CallSyntax(Protocol):
    """How tool calls look in the output; :meth:`begin` once per step, then :meth:`read` any number of times."""

    patterns: tuple[str, ...]  # texts whose last character may end a call step (for the may-end table)

    def begin(self, context: str) -> None: ...

    def read(self, text: str) -> CallStep: ...


class MarkerCalls:
    """Calls between an opening and a closing marker, anywhere in the answer (Hermes ``<tool_call>``)."""

    def __init__(self, markers: tuple[str, str]) -> None:
        self.markers = markers
        self.patterns: tuple[str, ...] = markers
        self.continues = False  # the step starts inside a call left open (cut by the token cap)
        self.open_text = ""

    def begin(self, context: str) -> None:
        start = open_call_start(context, self.markers)
        self.continues = start is not None
        self.open_text = context[start:] if start is not None else ""

    def read(self, text: str) -> CallStep:
        maybe = is_tool_call_step(text, self.markers, self.continues)
        # a continued call is read from its opening marker, so that its strings are known to be open or closed
        complete = maybe and tool_step_complete(self.open_text + text, self.markers)
        split = None if maybe else marker_split(text, self.markers)
        return CallStep(maybe, maybe, complete, self.open_text + text.lstrip(), split)


class JsonCalls:
    """Bare JSON calls at the start of the answer (:func:`json_region`); each call is one step."""

    patterns: tuple[str, ...] = ("}", "]")

    def __init__(self) -> None:
        self.closed = False  # the calls are over (or there were none): every step is text
        self.base = ""  # committed text after the last finished call: separators, or an open call

    def begin(self, context: str) -> None:
        region = json_region(context)
        self.closed = not region.growing
        last = region.spans[-1][1] if region.spans else 0
        self.base = context[last:]

    def read(self, text: str) -> CallStep:
        if self.closed:
            return CallStep(False, False, False, "")
        joined = self.base + text
        region = json_region(joined)
        if region.spans:
            start, end = region.spans[0]
            return CallStep(True, True, True, joined[start:end])
        at = region.open_at if region.open_at is not None else region.opening_at
        if at is not None:  # an open call, or the start of one (a step cut by the cap may end there)
            return CallStep(True, True, False, joined[at:])
        return CallStep(False, region.growing, False, "")


def call_syntax(markers: tuple[str, str] | None, json_calls: bool) -> CallSyntax | None:
    """The syntax a generation's tool calls are read in (None: no call is a step)."""
    if markers is not None:
        return MarkerCalls(markers)
    return JsonCalls() if json_calls else None


@dataclass(frozen=True)
class Thought:
    """Where the think block that opens an answer lies in it (reasoning models' ``<think>...</think>``)."""

    start: int  # where the reasoning starts (past the opening marker)
    end: int  # where it ends: the closing marker, or the end of the text while the block is open
    answer: int | None  # where the answer starts (past the closing marker); None while the block is open


def leading_thought(text: str, markers: tuple[str, str], opened: bool) -> Thought | None:
    """The think block at the start of ``text`` (the output), or None when the output does not open with one.

    Only a block at the very start counts (after whitespace): that is where reasoning models think, and a
    marker later in the answer is answer text. ``opened``: the prompt already opened the block (templates
    that put ``<think>`` in the generation prompt), so the output starts inside it; an opening marker the
    model writes again there is skipped.
    """
    opening, closing = markers
    body = text.lstrip()
    start = len(text) - len(body)
    if body.startswith(opening):
        start += len(opening)
    elif not opened:
        return None
    end = text.find(closing, start)
    if end < 0:
        return Thought(start, len(text), None)
    return Thought(start, end, end + len(closing))


def may_open_thought(text: str, opening: str) -> bool:
    """True while ``text`` (blank, or the start of ``opening``) could still grow into an opening marker."""
    body = text.lstrip()
    return len(body) < len(opening) and opening.startswith(body)
