"""Schema-constrained decoding: a grammar masks every token the draft proposes and every token the target chooses.

A call that must answer in JSON (``with_structured_output(method="json_schema")``, ``response_format``) carries a
:class:`Grammar` in its :class:`~.options.CallOptions`. Its generation holds a :class:`GrammarState`: one matcher
(llguidance's ``LLMatcher``, the library vLLM, SGLang and llama.cpp use) at the committed output, advanced on each
commit. Every place that turns logits into a token reads the grammar's mask there first, as a logits processor
would, and nothing else changes:

- the draft's decode loop (:func:`decode`, for :mod:`.propose`'s candidates and :mod:`.write`'s speculation rounds):
  each row has its own cursor (a copy of the matcher, advanced by the row's own tokens), whose mask goes into the
  loop's state before each iteration (:attr:`~.runner.DecodeState.bitmask`), so every candidate stays inside the
  grammar;
- the target's passes (:mod:`.judge`, for verification and the speculation rounds): the logits after each fed
  position are masked by the grammar's state there (:meth:`GrammarState.bitmask_along`), so the target's greedy
  choice, its sampled tokens, the scores and the speculative-sampling distributions are all the constrained ones.

The accept rule (:mod:`.accept`) is untouched: it compares proposals with choices that are already inside the grammar,
so every accepted token and every token the target writes stays inside it, and "every step rejected" is the target's
own constrained ``generate()``. Cursors are throwaway copies (copying a matcher costs about a microsecond); rejected
tokens are never pushed into the committed matcher, so nothing has to be rolled back.

The library is an optional dependency (the ``structured`` extra) imported here only when a grammar is built.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .text import token_bytes

if TYPE_CHECKING:
    from .runner import ModelRunner

EXTRA = "structured"
"""The package extra that installs the grammar library."""

JSON_FORMAT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How constrained JSON is written: ``json.dumps``'s separators and no other whitespace. A small model allowed free
whitespace can wander in it until its budget runs out; this spelling is also the one models see most."""

BITS = 32
"""Tokens per word of a bitmask (llguidance's ``int32`` layout: bit ``t % 32`` of word ``t // 32``)."""


def library() -> Any:
    """The ``llguidance`` module, or an ImportError that names the extra to install."""
    try:
        import llguidance
    except ImportError as error:
        raise ImportError(
            "schema-constrained decoding (structured output with method='json_schema' or 'json_mode', "
            f"response_format) needs llguidance: pip install 'langchain-specguard[{EXTRA}]'"
        ) from error
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """What a call's output must match, compiled and checked, before any tokenizer is known.

    ``text`` is llguidance's serialized grammar; ``name`` says what it is in messages (``JSON schema 'Person'``).
    Build one with :meth:`json_schema` or :meth:`json_object`; both raise ``ValueError`` naming the problem when the
    library cannot compile the schema, so a bad schema fails where it is given (at bind time), not mid-generation.
    """

    text: str
    name: str

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any], name: str | None = None) -> Grammar:
        """The grammar of JSON values that validate against ``schema`` (written as :data:`JSON_FORMAT` says)."""
        if not isinstance(schema, Mapping):
            raise TypeError(f"a JSON schema is a dict, got {type(schema).__name__}")
        title = name or schema.get("title")
        label = f"JSON schema {title!r}" if title else "the JSON schema"
        try:
            text = library().LLMatcher.grammar_from_json_schema(json.dumps(closed(schema)), defaults=JSON_FORMAT)
        except (TypeError, ValueError) as error:  # not serializable, or not a JSON object
            raise ValueError(f"{label} cannot be used for constrained decoding: {error}") from error
        return cls._checked(text, label)

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (``json_mode``: the answer is an object, whatever its keys)."""
        return cls.json_schema({"type": "object"}, name="any JSON object")

    @classmethod
    def lark(cls, text: str, name: str) -> Grammar:
        """A grammar in llguidance's Lark syntax (JSON values inside it: :func:`json_rule`), e.g. an answer that is
        either a JSON object or tool calls."""
        return cls._checked(library().LLMatcher.grammar_from_lark(text), name)

    @classmethod
    def _checked(cls, text: str, label: str) -> Grammar:
        lib = library()
        failed, messages = lib.LLMatcher.validate_grammar_with_warnings(text, None)
        if failed:
            raise ValueError(f"{label} cannot be used for constrained decoding: {messages[0]}")
        return cls(text=text, name=label)


def json_rule(schema: Mapping[str, Any]) -> str:
    """A Lark item (llguidance's ``%json``) for JSON values that validate against ``schema``, closed and written as
    :data:`JSON_FORMAT` says (a schema's own ``x-guidance`` wins)."""
    return "%json " + json.dumps({"x-guidance": JSON_FORMAT, **closed(schema)})


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalItems", "not", "if", "then", "else", "contains", "propertyNames")


def closed(schema: Any) -> Any:
    """``schema`` with every object that does not say ``additionalProperties`` closed to the keys it names.

    A JSON schema object admits any other key unless it says otherwise, and a model let loose in an open object can
    write keys until its budget runs out; OpenAI's strict mode and llama.cpp's grammars close them the same way. What
    is generated still validates against the schema as given. The members of an ``allOf`` are left open (closing each
    would forbid the keys the others name).
    """
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(sub) for sub in out[key]]
    for key in _SCHEMA_ONE:
        if key in out:
            out[key] = [closed(sub) for sub in out[key]] if isinstance(out[key], list) else closed(out[key])
    if isinstance(out.get("additionalProperties"), Mapping):
        out["additionalProperties"] = closed(out["additionalProperties"])
    return out


_TOKENIZERS: weakref.WeakKeyDictionary[Any, dict[frozenset[int], Any]] = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def grammar_tokenizer(tokenizer: Any, eos: frozenset[int]) -> Any:
    """llguidance's view of ``tokenizer`` (its tokens' bytes, ``eos`` as the end), built once per tokenizer.

    The bytes are the engine's own (:func:`~.text.token_bytes`, exact for byte-level, byte-fallback and plain
    vocabularies), not the library's reading of ``tokenizer.json``: that one gets tokens wrong where a tokenizer
    class puts a byte-level decoder over a vocabulary that is not byte-level, and it is slower (5.9 s against 2.9 s
    for Gemma 3's 262,144 tokens, measured on this project's CPU machine)."""
    with _TOKENIZERS_LOCK:
        found = _TOKENIZERS.setdefault(tokenizer, {}).get(eos)
        if found is None:
            lib = library()
            table = _TokenTable(tokenizer)
            found = lib.LLTokenizer(lib.TokenizerWrapper(table), n_vocab=len(tokenizer), eos_token=sorted(eos))
            table.fallback = found.greedy_tokenize
            _TOKENIZERS[tokenizer][eos] = found
        return found


class _TokenTable:
    """A tokenizer as llguidance's ``TokenizerWrapper`` reads one: every token's bytes, and an encoder.

    The library tokenizes the text a grammar forces with the encoder and allows only that tokenization there, so the
    encoder must give back exactly the bytes it was given: where the tokenizer does not (a sentencepiece tokenizer's
    dummy prefix space, a tokenizer class whose pre-tokenizer drops characters of a plain vocabulary), the library's
    own greedy tokenization over the same token bytes is used instead."""

    def __init__(self, tokenizer: Any) -> None:
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = [token_bytes(tokenizer, t) for t in range(len(tokenizer))]
        self.special_token_ids = sorted(tokenizer.all_special_ids)
        self.fallback: Callable[[str], list[int]] | None = None  # set once the library's tokenizer exists
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        known = all(0 <= t < len(self.tokens) for t in ids)
        faithful = known and b"".join(self.tokens[t] for t in ids) == text.encode()
        return ids if faithful or self.fallback is None else self.fallback(text)


class Cursor:
    """A copy of a generation's matcher, advanced by one sequence's own tokens past the committed output.

    It stops at the first end-of-sequence token (the sequence is over; later positions are garbage no one keeps) or
    at a token the grammar refuses (then the same: it is never kept, see the module docstring); its mask stays the
    one of the last position it reached, never empty.
    """

    def __init__(self, matcher: Any, eos: frozenset[int], words: int) -> None:
        self.matcher = matcher
        self.eos = eos
        self.words = words  # the library's mask width
        self.ended = False

    def push(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            if self.ended or token in self.eos or self.matcher.validate_tokens([token]) != 1:
                self.ended = True
                return
            self.matcher.consume_token(token)

    def fill(self, words: torch.Tensor) -> None:
        """Write the mask of the cursor's position into ``words`` (one row of a CPU ``int32`` bitmask)."""
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())


class GrammarState:
    """One generation's grammar: its matcher at the committed output, and cursors from there."""

    def __init__(self, grammar: Grammar, tokenizer: Any, eos: frozenset[int]) -> None:
        lib = library()
        self.grammar = grammar
        self.tokenizer = grammar_tokenizer(tokenizer, eos)
        self.eos = eos
        self.matcher = lib.LLMatcher(self.tokenizer, grammar.text, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"{grammar.name} cannot be used with this tokenizer: {self.matcher.get_error()}")
        self.words = (int(self.tokenizer.vocab_size) + BITS - 1) // BITS  # the library's mask width

    def cursor(self, tokens: Sequence[int] = ()) -> Cursor:
        """A cursor at the committed output followed by ``tokens``."""
        cursor = Cursor(self.matcher.deep_copy(), self.eos, self.words)
        cursor.push(tokens)
        return cursor

    def commit(self, tokens: Sequence[int]) -> None:
        """Advance the matcher by a step's committed tokens (an end-of-sequence token ends the output: not consumed)."""
        kept = [t for t in tokens if t not in self.eos]
        if kept and not self.matcher.consume_tokens(kept):
            raise RuntimeError(f"a committed step left {self.grammar.name}: {self.matcher.get_error()}")

    def bitmask_along(self, before: Sequence[int], proposed: Sequence[int], rows: int) -> torch.Tensor:
        """The masks ``[rows, words]`` of a target pass's logits rows: row ``j`` follows the committed output,
        ``before`` and ``proposed[:j]``."""
        cursor = self.cursor(before)
        out = torch.empty(rows, self.words, dtype=torch.int32)
        for j in range(rows):
            cursor.fill(out[j])
            if j < len(proposed):
                cursor.push(proposed[j : j + 1])
        return out


def masks(cursors: Sequence[Cursor]) -> torch.Tensor:
    """The cursors' masks (cursors of one grammar state), one CPU bitmask row each ``[n, words]``."""
    out = torch.empty(len(cursors), cursors[0].words, dtype=torch.int32)
    for row, cursor in zip(out, cursors, strict=True):
        cursor.fill(row)
    return out


def blocked(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """Bool masks ``[..., width]`` of the tokens ``int32`` bitmasks ``[..., words]`` do not allow (on their device):
    token ``t`` is allowed when bit ``t % 32`` of word ``t // 32`` is set; tokens past the bitmask's words are not.

    On the CPU numpy's ``unpackbits`` reads the bytes (bit ``t % 8`` of byte ``t // 8`` on a little-endian machine):
    at Gemma 3's 262,144 tokens it took 0.75 ms for 22 rows where torch's shifts took 26 ms (this project's shared CPU
    machine). Elsewhere (a GPU, inside a captured decode iteration) the shifts run on the device, no host read."""
    if bitmask.device.type == "cpu" and sys.byteorder == "little":
        units = np.invert(bitmask.contiguous().numpy().view(np.uint8))
        bits = torch.from_numpy(np.unpackbits(units, axis=-1, bitorder="little").view(np.bool_))
    else:
        shifts = torch.arange(BITS, dtype=torch.int32, device=bitmask.device)
        bits = (((bitmask[..., None] >> shifts) & 1) == 0).flatten(-2)
    if bits.shape[-1] >= width:
        return bits[..., :width]
    return torch.nn.functional.pad(bits, (0, width - bits.shape[-1]), value=True)


def fit(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """``bitmask [..., words]`` for logits of ``width`` columns: cut or zero-padded to ``ceil(width / 32)`` words, the
    bits past ``width`` cleared, and a row left with no allowed token allowing every one (everything the grammar
    allows there lies past this model's rows, e.g. a draft with fewer output rows than the tokenizer has tokens: the
    target judges whatever it proposes). Cheap: it reads words, not tokens."""
    words = (width + BITS - 1) // BITS
    if bitmask.shape[-1] >= words:
        out = bitmask[..., :words].clone()
    else:
        out = torch.nn.functional.pad(bitmask, (0, words - bitmask.shape[-1]))
    if width % BITS:
        out[..., -1] &= (1 << (width % BITS)) - 1
    empty = (out == 0).all(dim=-1, keepdim=True)
    return torch.where(empty, torch.full_like(out, -1), out)


def constrain(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits [..., V]`` with the tokens ``bitmask [..., words]`` does not allow at ``-inf`` (see :func:`fit`)."""
    return logits.masked_fill(blocked(fit(bitmask.to(logits.device), logits.shape[-1]), logits.shape[-1]), -math.inf)


def decode(runner: ModelRunner, cursors: dict[int, list[Cursor]], n: int, **kwargs: Any) -> None:
    """``n`` iterations of ``runner``'s decode loop, each row whose slot has cursors (one per decoding row of the slot,
    by slot) sampling only what its cursor's grammar allows there. Without cursors, the loop as it is (its chunk in
    one go); with them, one iteration at a time: the masks go in before it, its tokens advance the cursors after it
    (one host read each). ``kwargs`` go to :meth:`~.runner.ModelRunner.decode`."""
    if not cursors:
        runner.decode(n, **kwargs)
        return
    words = runner.state.bitmask.shape[1]
    slots = list(cursors)
    rows = torch.tensor([runner.decoded_row(s, r) for s in slots for r in range(len(cursors[s]))], device=runner.device)
    for _ in range(n):
        allowed = torch.cat([masks(cursors[s]) for s in slots])[:, :words]  # (a draft may have fewer rows)
        allowed = torch.nn.functional.pad(allowed, (0, words - allowed.shape[1]))  # (or more: never sampled)
        runner.state.bitmask.index_copy_(0, rows, allowed.to(runner.device))
        runner.decode(1, **kwargs)
        fresh = runner.read_decoded(slots, runner.decoded - 1)
        for slot in slots:
            for cursor, tokens in zip(cursors[slot], fresh[slot], strict=True):
                cursor.push(tokens)
