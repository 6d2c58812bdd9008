"""Where a reasoning step ends, and where a stop sequence cuts the output.

Steps are found in decoded text, not in token ids: tokenizers merge a delimiter such as a blank
line into many different tokens (``".\\n\\n"``, ``"\\n\\n\\n"``...), so matching ids would miss most of
them. Tokens are atomic, so a step ends *with* the token that completes its delimiter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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


def open_call_start(text: str, markers: tuple[str, str] | None) -> int | None:
    """Index of the opening marker of a tool call still open at the end of ``text``, else None."""
    if markers is None:
        return None
    opening, closing = markers
    start = text.rfind(opening)
    if start < 0 or text.find(closing, start + len(opening)) >= 0:
        return None
    return start


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
    """A tool-call step ends with the token that completes its closing marker, never before."""
    opening, closing = markers
    start = 0 if continues_call else text.find(opening)
    if start < 0:
        return False
    return text.find(closing, start + (0 if continues_call else len(opening))) >= 0


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
