"""The output as text: where steps end, what a committed step adds, and what may be shown yet.

Steps end by text rules (see :mod:`.steps`), which need decoding. Decoding every token of every
candidate was the engine's main host cost, so the rules are checked only at tokens that *can* end a
step: :class:`MayEnd` says, per tokenizer and set of patterns, whether a token's text contains the
last character of a delimiter, stop sequence or tool-call marker (or a partial UTF-8 byte), and EOS
ends a step by itself. Every other token is skipped with one dictionary lookup.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .events import StepKind
from .loading import decode
from .steps import (
    find_stop,
    is_tool_call_step,
    leading_thought,
    marker_split,
    may_open_thought,
    new_text,
    open_call_start,
    step_complete,
    tool_step_complete,
)


class MayEnd:
    """Whether token ``t`` may complete one of the patterns: a superset, the exact text check decides.

    A token may complete a pattern only if its text (as it reads after other text, so SentencePiece's
    leading space counts) holds the pattern's last character, or a partial UTF-8 byte. Answers are
    computed when a token is first met and kept per tokenizer and pattern set, so a 262k-token
    vocabulary costs nothing up front.
    """

    def __init__(self, tokenizer: Any, last_chars: frozenset[str]) -> None:
        self.tokenizer = tokenizer
        self.last_chars = last_chars
        self.known: dict[int, bool] = {}
        anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1]
        self.anchor = anchor
        self.base = decode(tokenizer, [anchor])

    def __call__(self, token: int) -> bool:
        answer = self.known.get(token)
        if answer is None:
            text = decode(self.tokenizer, [self.anchor, token])
            text = text[len(self.base) :] if text.startswith(self.base) else text
            answer = self.known[token] = any(c in text for c in self.last_chars)
        return answer


_TABLES: weakref.WeakKeyDictionary[Any, dict[frozenset[str], MayEnd]] = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def may_end_table(tokenizer: Any, patterns: Iterable[str]) -> MayEnd:
    """The (shared, lazily filled) :class:`MayEnd` of ``tokenizer`` for ``patterns``."""
    last_chars = frozenset(p[-1] for p in patterns if p) | {"\ufffd"}
    with _TABLES_LOCK:
        tables = _TABLES.setdefault(tokenizer, {})
        if last_chars not in tables:
            tables[last_chars] = MayEnd(tokenizer, last_chars)
        return tables[last_chars]


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop sequence."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return hold


@dataclass
class Committed:
    tokens: list[int]  # the step as committed (a text step that ran into a tool call is cut before it)
    text: str  # what the step adds to the shown answer
    finish: str | None
    kind: StepKind


class OutputText:
    """Generated tokens, their text, the part already shown, and the step rules that apply to them."""

    def __init__(
        self,
        tokenizer: Any,
        eos: frozenset[int],
        delimiters: Sequence[str],
        stops: Sequence[str],
        markers: tuple[str, str] | None,
        max_step_tokens: int,
        max_tool_call_tokens: int,
        prefix: str = "",
        reasoning: tuple[str, str] | None = None,
        thinking: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos = eos
        self.stops = list(stops)
        self.delimiters = [*delimiters, *stops]
        self.max_stop = max((len(s) for s in stops), default=0)
        self.markers = markers
        self.max_step = max_step_tokens
        self.max_call = max_tool_call_tokens
        self.prefix = prefix  # assistant text already in the prompt (e.g. a forced "<tool_call>")
        self.generated: list[int] = []
        self.full = ""  # decode(generated), cut at a stop sequence
        self.emitted = 0  # characters of ``full`` already handed out
        self.continues = False  # the current step starts inside a tool call left open
        self.reasoning = reasoning  # (opening, closing) of the think block a reasoning model starts with
        self.opened = thinking  # the prompt opened the think block: the output starts inside it
        self.thinking = thinking  # the current step starts inside the think block
        self.undecided = False  # nothing written yet that says whether the output opens a think block
        self.answer = ""  # the output past the think block (all of it when there is none)
        patterns = [*self.delimiters, *(markers or ()), *(reasoning[1:] if reasoning else ())]
        self.may_end = may_end_table(tokenizer, patterns)
        self.checkpoints = {max_step_tokens, max_tool_call_tokens} if markers else set()

    def begin_step(self) -> None:
        self.answer, self.thinking, self.undecided = self.full, False, False
        if self.reasoning is not None:
            thought = leading_thought(self.full, self.reasoning, self.opened)
            if thought is None:
                self.undecided = may_open_thought(self.full, self.reasoning[0])
            elif thought.answer is None:
                self.answer, self.thinking = "", True
            else:
                self.answer = self.full[thought.answer :]
        # tool calls live in the answer: a call mentioned while thinking is reasoning text
        self.continues = open_call_start(self.prefix + self.answer, self.markers) is not None

    def step_thinks(self, text: str) -> bool:
        """Whether the step with this text belongs to the think block (starts inside it, or opens it)."""
        return self._in_thought(text) is not None

    def _in_thought(self, text: str) -> tuple[str, str] | None:
        """``(before, inside)`` for a step of the think block, else None.

        ``inside`` is what the step writes inside the block (past an opening marker it completes);
        ``before`` is the end of the block written before the step, which a closing marker split across
        steps starts in. A step of an output that is still only the start of an opening marker counts as
        one of the block.
        """
        if self.reasoning is None:
            return None
        opening, closing = self.reasoning
        if self.thinking:
            return self.full[len(self.full) - len(closing) + 1 :], text
        if not self.undecided:
            return None
        so_far = (self.full + text).lstrip()
        if so_far.startswith(opening):
            return "", so_far[len(opening) :]
        return ("", "") if so_far and opening.startswith(so_far) else None

    # -- where a step ends -----------------------------------------------------------------------------

    def step_text(self, step: list[int]) -> str:
        return new_text(self.full, decode(self.tokenizer, self.generated + step))

    def is_boundary(self, step: list[int]) -> bool:
        """The exact rule: does the step end with its last token?"""
        text = decode(self.tokenizer, step)
        if self.stops:
            tail = self.full[-self.max_stop :] if self.max_stop else ""
            if find_stop(tail + text, self.stops) is not None:
                return True
        thought = self._in_thought(text)
        if thought is not None:
            # a reasoning step follows the CoT rules, and the closing marker ends it: the answer starts a step
            before, inside = thought
            assert self.reasoning is not None
            closing = self.reasoning[1]
            return closing in before + inside or len(step) >= self.max_step or step_complete(inside, self.delimiters)
        if self.markers is not None:
            if is_tool_call_step(text, self.markers, self.continues):
                return tool_step_complete(text, self.markers, self.continues) or len(step) >= self.max_call
            if len(step) >= self.max_step or self.markers[0] in text:
                return True  # a text step that ran into a call ends there (and is cut before it on commit)
        return step_complete(text, self.delimiters)

    def step_end(self, step: list[int], start: int = 0) -> int | None:
        """Length of the shortest prefix of ``step``, longer than ``start``, that ends the step; else None."""
        for j in range(start, len(step)):
            token = step[j]
            if token in self.eos:
                return j + 1
            maybe = self.may_end(token) or (j + 1) in self.checkpoints
            if maybe and self.is_boundary(step[: j + 1]):
                return j + 1
        return None

    def check_call(self, step: list[int], validate: Callable[[str], str | None] | None) -> str | None:
        """Why a finished tool-call step is unacceptable, or None (also for text steps)."""
        if validate is None or self.markers is None or not step:
            return None
        text = self.step_text(step)
        if self.step_thinks(text) or not is_tool_call_step(text, self.markers, self.continues):
            return None
        if not tool_step_complete(text, self.markers, self.continues) and step[-1] not in self.eos:
            return None  # cut by the token cap: judged at the step that closes it
        context = self.prefix + self.answer
        start = open_call_start(context, self.markers)
        call = (context[start:] if self.continues and start is not None else "") + text.lstrip()
        return validate(call)

    # -- committing --------------------------------------------------------------------------------------

    def _token_cut(self, step: list[int], at: int) -> int:
        """Number of leading ``step`` tokens whose text ends at or before character ``at`` of the step."""
        base = len(self.full)
        for j in range(1, len(step) + 1):
            if len(decode(self.tokenizer, self.generated + step[:j])) - base > at:
                return j - 1
        return len(step)

    def commit(self, step: list[int], budget: int) -> Committed:
        """Add a verified step; return what it adds to the shown text and whether the output is finished.

        Text that could still become a stop sequence, and a trailing partial UTF-8 character (a step
        may end inside one), are held back until later steps decide them.
        """
        kind: StepKind = "text"
        text = self.step_text(step) if self.markers is not None or self.reasoning is not None else ""
        if self.step_thinks(text):
            kind = "reasoning"
        elif self.markers is not None:
            if is_tool_call_step(text, self.markers, self.continues):
                kind = "tool_call"
            else:
                at = marker_split(text, self.markers)
                keep = self._token_cut(step, at) if at is not None else 0
                if keep > 0:
                    step = step[:keep]
        self.generated.extend(step)
        previous = self.full
        self.full = decode(self.tokenizer, self.generated)
        finish: str | None = None
        cut = find_stop(self.full, self.stops, max(0, len(previous) - self.max_stop)) if self.stops else None
        if cut is not None:
            self.full = self.full[:cut]
            finish = "stop"
        elif step[-1] in self.eos:
            finish = "stop"
        elif len(self.generated) >= budget:
            finish = "length"
        settled = self.full if finish else self.full.rstrip("\ufffd")  # a partial character may still complete
        upto = len(settled) - (0 if finish else held_back(settled, self.stops))
        shown = new_text(self.full[: self.emitted], self.full[:upto]) if upto >= self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return Committed(step, shown, finish, kind)
