"""Regression tests for issue 19's findings about the output's text (engine/text.py), one or more per finding.

Where a specific answer is needed the text is scripted (:mod:`tests.scripted`); everything downstream of the
logits is the real code.
"""

from __future__ import annotations

import gc
import weakref

from transformers import AutoTokenizer

from langchain_specguard import ChatSpecGuard
from langchain_specguard.engine import SpecGuardParams, generate, load_pair
from langchain_specguard.engine.text import token_bytes
from tests.tiny_models import bpe_pair

# 8. every loaded tokenizer was kept forever by the per-tokenizer tables


def test_tokenizer_is_freed_after_its_pair_is_dropped() -> None:
    target, draft = bpe_pair()
    pair = load_pair(target, draft, tokenizer=AutoTokenizer.from_pretrained(target), device="cpu")
    prompt = pair.tokenizer("<s>Hello", add_special_tokens=False)["input_ids"]
    params = SpecGuardParams(max_tokens=12, max_step_tokens=3, acceptance_threshold=0.5)
    result = generate(pair, prompt, params, stop=["zz"])  # fills the step-end table of this tokenizer
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
