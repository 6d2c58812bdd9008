"""The output as text: where steps end, what a committed step adds, and what may be shown yet.

Steps end by text rules (see :mod:`.steps`), which need decoding. Decoding every token of every
candidate was the engine's main host cost, so the rules are checked only at tokens that *can* end a
step: :class:`MayEnd` says, per tokenizer and set of patterns, whether a token's text contains the
last character of a delimiter, stop sequence or tool-call end (a marker, or a JSON call's closing
bracket), or a partial UTF-8 byte, and EOS ends a step by itself. Every other token is skipped with
one dictionary lookup.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .events import StepKind
from .loading import decode
from .options import CallOptions
from .params import SpecGuardParams
from .steps import call_syntax, find_stop, leading_thought, may_open_thought, new_text, step_complete


def _alive(ref: weakref.ref[Any]) -> Any:
    tokenizer = ref()
    if tokenizer is None:
        raise ReferenceError("the tokenizer of this table was freed")
    return tokenizer


class MayEnd:
    """Whether token ``t`` may complete one of the patterns: a superset, the exact text check decides.

    A token may complete a pattern only if its text (as it reads after other text, so SentencePiece's
    leading space counts) holds the pattern's last character, or a partial UTF-8 byte. Answers are
    computed when a token is first met and kept per tokenizer and pattern set, so a 262k-token
    vocabulary costs nothing up front.
    """

    def __init__(self, tokenizer: Any, last_chars: frozenset[str]) -> None:
        self._tokenizer = weakref.ref(tokenizer)  # weak: the shared tables must not keep a tokenizer alive
        self.last_chars = last_chars
        self.known: dict[int, bool] = {}
        anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1]
        self.anchor = anchor
        self.base = decode(tokenizer, [anchor])

    @property
    def tokenizer(self) -> Any:
        return _alive(self._tokenizer)

    def __call__(self, token: int) -> bool:
        answer = self.known.get(token)
        if answer is None:
            text = decode(self.tokenizer, [self.anchor, token])
            text = text[len(self.base) :] if text.startswith(self.base) else text
            answer = self.known[token] = any(c in text for c in self.last_chars)
        return answer


# Per-tokenizer tables, dropped with their tokenizer: the tables refer to it only weakly (a strong
# reference in a value of a weak-key dictionary would keep the key alive for good).
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


class TokenBytes:
    """The exact UTF-8 bytes of each token, also of tokens that hold part of a character.

    Decoding one token alone loses what a partial character holds (it decodes to U+FFFD), so the
    bytes come from the token's vocabulary entry where the tokenizer stores bytes: byte-level BPE
    (GPT-2, Llama 3, Qwen) maps each byte to a printable character (transformers' ``bytes_to_unicode``),
    and SentencePiece's byte fallback writes a byte as ``<0xNN>``. Other tokens (and added tokens)
    are whole text: their text as it reads after other text, so SentencePiece's leading space counts.
    Filled per token as they are met, and kept per tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self._tokenizer = weakref.ref(tokenizer)  # weak, as in MayEnd
        kinds = _decoder_kinds(tokenizer)
        slow_map = getattr(tokenizer, "byte_decoder", None)
        self.byte_decoder: dict[str, int] | None = (
            {char: byte for byte, char in bytes_to_unicode().items()} if "ByteLevel" in kinds else slow_map
        )
        self.byte_fallback = "ByteFallback" in kinds
        self.added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self.anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1]
        self.base = tokenizer.decode([self.anchor])
        self.known: dict[int, bytes] = {}

    @property
    def tokenizer(self) -> Any:
        return _alive(self._tokenizer)

    def __call__(self, token: int) -> bytes:
        found = self.known.get(token)
        if found is None:
            found = self.known[token] = self._bytes(token)
        return found

    def _bytes(self, token: int) -> bytes:
        if token in self.added:
            return str(self.added[token]).encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if piece is None:  # an LM-head row past the vocabulary (padded heads): no text
            return b""
        if isinstance(piece, str):
            if self.byte_decoder is not None and all(c in self.byte_decoder for c in piece):
                return bytes(self.byte_decoder[c] for c in piece)
            fallback = _BYTE_PIECE.fullmatch(piece)
            if self.byte_fallback and fallback:
                return bytes([int(fallback.group(1), 16)])
        text = self.tokenizer.decode([self.anchor, token])
        text = text[len(self.base) :] if text.startswith(self.base) else self.tokenizer.decode([token])
        return str(text).encode("utf-8")


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_kinds(tokenizer: Any) -> set[str]:
    """Types of the fast tokenizer's decoder and of its parts (``ByteLevel``, ``ByteFallback``...)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    state = json.loads(decoder.__getstate__())
    parts = state.get("decoders") or [state]
    return {str(part.get("type")) for part in parts if isinstance(part, dict)}


_BYTES: weakref.WeakKeyDictionary[Any, TokenBytes] = weakref.WeakKeyDictionary()


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """The exact bytes of ``token`` (see :class:`TokenBytes`); tables are shared per tokenizer."""
    with _TABLES_LOCK:
        table = _BYTES.get(tokenizer)
        if table is None:
            table = _BYTES[tokenizer] = TokenBytes(tokenizer)
    return table(token)


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

    def __init__(self, tokenizer: Any, eos: frozenset[int], params: SpecGuardParams, options: CallOptions) -> None:
        stops, reasoning = options.stop, params.reasoning_markers
        calls = call_syntax(params.tool_call_markers, params.json_tool_calls)
        thinking = options.thinking and reasoning is not None
        self.tokenizer = tokenizer
        self.eos = eos
        self.stops = list(stops)
        self.delimiters = [*params.step_delimiters, *stops]
        self.max_stop = max((len(s) for s in stops), default=0)
        self.calls = calls
        self.max_step = params.max_step_tokens
        self.max_call = params.max_tool_call_tokens
        self.prefix = options.prefix  # assistant text already in the prompt (e.g. a forced "<tool_call>")
        self.generated: list[int] = []
        self.full = ""  # decode(generated), cut at a stop sequence
        self.emitted = 0  # characters of ``full`` already handed out
        self.single_call = options.single_call  # the output ends with its first complete tool call
        self.reasoning = reasoning  # (opening, closing) of the think block a reasoning model starts with
        self.opened = thinking  # the prompt opened the think block: the output starts inside it
        self.thinking = thinking  # the current step starts inside the think block
        self.undecided = False  # nothing written yet that says whether the output opens a think block
        self.answer = ""  # the output past the think block (all of it when there is none)
        patterns = [*self.delimiters, *(calls.patterns if calls else ()), *(reasoning[1:] if reasoning else ())]
        self.step_patterns = tuple(dict.fromkeys(patterns))  # texts that may end a step (where a server stops)
        self.may_end = may_end_table(tokenizer, patterns)
        self.checkpoints = {self.max_step, self.max_call} if calls else set()

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
        if self.calls is not None:
            self.calls.begin(self.prefix + self.answer)

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
        if self.stops and self._stop_in(step, text):
            return True
        thought = self._in_thought(text)
        if thought is not None:
            # a reasoning step follows the CoT rules, and the closing marker ends it: the answer starts a step
            before, inside = thought
            assert self.reasoning is not None
            closing = self.reasoning[1]
            return closing in before + inside or len(step) >= self.max_step or step_complete(inside, self.delimiters)
        if self.calls is not None:
            read = self.calls.read(text)
            if read.maybe:
                return read.complete or len(step) >= self.max_call
            if len(step) >= self.max_step or read.split is not None:
                return True  # a text step that ran into a call ends there (and is cut before it on commit)
        return step_complete(text, self.delimiters)

    def _stop_in(self, step: list[int], text: str) -> bool:
        """Whether a stop sequence ends in the output's text up to the end of ``step`` (``text``: its own decoding).

        A trailing U+FFFD may be the placeholder of a character still half written (a step may end inside one),
        so no stop may end in it yet: it is searched once more text follows, or when the output ends
        (:meth:`commit`). When the output so far ends in one, the step may complete that character, and only
        decoding them together tells which.
        """
        if self.full.endswith("\ufffd"):
            whole = decode(self.tokenizer, self.generated + step)
            return find_stop(self._settled(whole), self.stops, self._searched()) is not None
        tail = self.full[-self.max_stop :] if self.max_stop else ""
        return find_stop(tail + self._settled(text), self.stops) is not None

    @staticmethod
    def _settled(text: str) -> str:
        """``text`` without a trailing placeholder of a character that may still be completed."""
        return text.rstrip("\ufffd")

    def _searched(self) -> int:
        """Where a search for stop sequences in the output so far, and what follows it, starts."""
        return max(0, len(self._settled(self.full)) - self.max_stop)

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

    def finished_call(self, step: list[int]) -> str | None:
        """The whole tool call a finished step completes (or breaks off with EOS), for the schema check.

        None for text steps and for a call cut by the token cap (judged at the step that closes it).
        """
        if self.calls is None or not step:
            return None
        text = self.step_text(step)
        if self.step_thinks(text):
            return None
        read = self.calls.read(text)
        if not read.call or not (read.complete or step[-1] in self.eos):
            return None
        return read.call_text

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
        call_closed = False
        text = self.step_text(step) if self.calls is not None or self.reasoning is not None else ""
        if self.step_thinks(text):
            kind = "reasoning"
        elif self.calls is not None:
            read = self.calls.read(text)
            if read.call:
                kind = "tool_call"
                call_closed = read.complete
            elif read.split is not None:
                keep = self._token_cut(step, read.split)
                if keep > 0:
                    step = step[:keep]
        start = self._searched()
        self.generated.extend(step)
        self.full = decode(self.tokenizer, self.generated)
        ended = step[-1] in self.eos or (call_closed and self.single_call)
        finish: str | None = "stop" if ended else "length" if len(self.generated) >= budget else None
        # a stop sequence never ends in the placeholder of a character still half written, only in text; a
        # trailing U+FFFD is text once the output ends with it
        cut = find_stop(self.full if finish else self._settled(self.full), self.stops, start) if self.stops else None
        if cut is not None:
            self.full = self.full[:cut]
            finish = "stop"
        settled = self.full if finish else self._settled(self.full)  # a partial character may still complete
        upto = len(settled) - (0 if finish else held_back(settled, self.stops))
        shown = new_text(self.full[: self.emitted], self.full[:upto]) if upto >= self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return Committed(step, shown, finish, kind)
