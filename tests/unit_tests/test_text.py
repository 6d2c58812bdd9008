"""The output's text (engine/text.py): multi-byte characters survive step boundaries, its per-tokenizer tables are
freed with their tokenizer, and stop sequences cut where they occur, even one holding U+FFFD. Origins: the outside
audits' findings about the output's text (issue 11 item 1, issue 19 items 8 and 12).

Where a specific answer is needed the text is scripted (:mod:`tests.scripted`); everything downstream of the
logits is the real code.
"""

from __future__ import annotations

import gc
import weakref

import pytest
from transformers import AutoTokenizer

from langchain_specguard import ChatSpecGuard
from langchain_specguard.engine import CallOptions, SpecGuardParams, generate, load_pair
from langchain_specguard.engine.text import token_bytes
from tests.scripted import scripted_llm
from tests.tiny_models import bpe_pair

MULTIBYTE = "ab😀cd é 日本\nAnswer: 42"


@pytest.mark.parametrize("max_step_tokens", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("threshold", [-1.0, 2.0])  # the draft writes every step / the target writes every step
def test_multibyte_characters_survive_step_boundaries(max_step_tokens: int, threshold: float) -> None:
    """Origin: the outside audit (issue 11), item 1: a character whose bytes a step boundary splits (byte-level
    BPE) came out as U+FFFD, in ``invoke`` and in the streamed chunks."""
    llm = scripted_llm(bpe_pair(), MULTIBYTE, max_step_tokens=max_step_tokens, acceptance_threshold=threshold)
    tokenizer = llm.load().tokenizer
    assert any("\ufffd" in tokenizer.decode([t]) for t in tokenizer(MULTIBYTE, add_special_tokens=False)["input_ids"])
    assert llm.invoke("hi").content == MULTIBYTE
    chunks = [str(c.content) for c in llm.stream("hi")]
    assert "".join(chunks) == MULTIBYTE
    assert all("\ufffd" not in c for c in chunks)


# issue 19 item 8: every loaded tokenizer was kept forever by the per-tokenizer tables


def test_tokenizer_is_freed_after_its_pair_is_dropped() -> None:
    target, draft = bpe_pair()
    pair = load_pair(target, draft, tokenizer=AutoTokenizer.from_pretrained(target), device="cpu")
    prompt = pair.tokenizer("<s>Hello", add_special_tokens=False)["input_ids"]
    params = SpecGuardParams(max_tokens=12, max_step_tokens=3, acceptance_threshold=0.5)
    result = generate(pair, prompt, params, CallOptions(stop=("zz",)))  # fills the step-end table of this tokenizer
    assert result.token_ids
    assert token_bytes(pair.tokenizer, result.token_ids[0])  # and its byte table
    tokenizer = weakref.ref(pair.tokenizer)
    del pair, result
    gc.collect()
    assert tokenizer() is None


def test_tokenizer_of_a_chat_model_is_freed_after_the_model_is_dropped() -> None:
    target, draft = bpe_pair()
    llm = ChatSpecGuard(
        target_model=target,
        draft_model=draft,
        tokenizer=AutoTokenizer.from_pretrained(target),  # a pair of its own, shared with no other test
        max_tokens=8,
        max_step_tokens=3,
        logprobs=True,  # reads each token's bytes
        stop=["zz"],
    )
    message = llm.invoke("Hello")
    assert message.response_metadata["logprobs"]["content"]
    tokenizer = weakref.ref(llm.load().tokenizer)
    del llm, message
    gc.collect()
    assert tokenizer() is None


# issue 19 item 12: a stop sequence holding U+FFFD cut the output at the placeholder of a half-decoded character

# "猫" is not in the BPE tokenizer's training text, so it is three byte tokens: after its first byte the output
# decodes to "...\ufffd", a placeholder that is no character of the answer. The real U+FFFD comes later.
STOP_CASES = [
    ("猫猫 x 猫\ufffd y.", "猫\ufffd", True),  # the first "猫" and half of the second read as the stop
    ("猫猫 x 猫\ufffd y.", "\ufffd", True),  # every half-written "猫" reads as the stop
    ("猫猫 x 猫\ufffd", "猫\ufffd", True),  # the real stop ends the output (EOS follows it)
    ("猫猫 x \ufffd猫 y.", "\ufffd猫", False),  # the stop starts with the real U+FFFD
]


@pytest.mark.parametrize(("script", "stop", "half_decoded_holds_it"), STOP_CASES)
@pytest.mark.parametrize("max_step_tokens", [1, 2, 4])
@pytest.mark.parametrize("threshold", [-1.0, 2.0])  # the draft writes every step / the target writes every step
def test_stop_holding_the_replacement_character_cuts_where_it_occurs(
    script: str, stop: str, half_decoded_holds_it: bool, max_step_tokens: int, threshold: float
) -> None:
    llm = scripted_llm(bpe_pair(), script, max_step_tokens=max_step_tokens, acceptance_threshold=threshold)
    tokenizer = llm.load().tokenizer
    ids = tokenizer(script, add_special_tokens=False)["input_ids"]
    # whether the text of the first tokens, decoded with a character still half written, holds the stop early
    early = [tokenizer.decode(ids[:j]).find(stop) for j in range(1, len(ids))]
    assert any(0 <= at < script.index(stop) for at in early) == half_decoded_holds_it
    whole = str(llm.invoke("hi").content)
    assert whole == script
    expected = whole[: whole.index(stop)]
    message = llm.invoke("hi", stop=[stop])
    assert message.content == expected
    assert message.response_metadata["finish_reason"] == "stop"
    chunks = [str(c.content) for c in llm.stream("hi", stop=[stop])]
    assert "".join(chunks) == expected
