"""Loading the way Hugging Face users write it (issue 20 item 3), and packaged pairs by name (issue 18 item 1)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer

from langchain_specguard import ChatSpecGuard
from tests.tiny_models import llama_pair, mismatched_draft


def test_dtype_objects_and_the_dtype_alias_are_accepted() -> None:
    target, draft = llama_pair()
    for options in ({"torch_dtype": torch.float64}, {"dtype": torch.float64}, {"dtype": "float64"}):
        llm = ChatSpecGuard(model=target, draft_model=draft, max_tokens=4, **options)  # type: ignore[arg-type]
        pair = llm.load()
        assert pair.target.dtype == torch.float64 and pair.draft.dtype == torch.float64
        assert llm.invoke("Hello").content is not None


def test_a_misspelt_dtype_fails_at_construction() -> None:
    target, draft = llama_pair()
    with pytest.raises(ValidationError, match="torch dtype name such as 'float32' or 'bfloat16', got 'float65'"):
        ChatSpecGuard(model=target, draft_model=draft, torch_dtype="float65")


def test_model_kwargs_reach_each_models_from_pretrained() -> None:
    target, draft = llama_pair()
    llm = ChatSpecGuard(
        model=target,
        draft_model=draft,
        model_kwargs={"attn_implementation": "eager"},
        draft_model_kwargs={"attn_implementation": "sdpa"},
        max_tokens=4,
    )
    pair = llm.load()
    assert pair.target.config._attn_implementation == "eager"
    assert pair.draft.config._attn_implementation == "sdpa"
    assert llm.invoke("Hello").content is not None  # the engine's own attention runs over either


def test_model_kwargs_that_clash_with_an_option_name_it() -> None:
    target, draft = llama_pair()
    llm = ChatSpecGuard(model=target, draft_model=draft, model_kwargs={"torch_dtype": torch.float16})
    with pytest.raises(ValueError, match=r"target model_kwargs cannot set \['torch_dtype'\]: use the dedicated"):
        llm.load()
    fine = ChatSpecGuard(model=target, draft_model=draft, max_tokens=4)
    assert fine.invoke("Hello").content is not None  # nothing was left half-loaded


def test_a_separate_draft_tokenizer_is_checked_against_the_targets() -> None:
    target, draft = llama_pair()
    same = ChatSpecGuard(model=target, draft_model=draft, draft_tokenizer=AutoTokenizer.from_pretrained(draft))
    assert same.load() is not None
    other = ChatSpecGuard(model=target, draft_model=draft, draft_tokenizer=mismatched_draft())
    with pytest.raises(ValueError, match="draft and target tokenizers do not match"):
        other.load()


def test_a_packaged_pair_names_both_models() -> None:
    target, draft = llama_pair()
    with pytest.raises(ValidationError, match=r"pair='qwen2.5-coder' names both models already: drop \['target_model'"):
        ChatSpecGuard(pair="qwen2.5-coder", model=target, draft_model=draft)
    with pytest.raises(ValidationError, match="pair"):
        ChatSpecGuard(pair="qwen9")  # type: ignore[arg-type]
    llm = ChatSpecGuard(pair="qwen2.5-coder")  # nothing loads before the first call
    assert llm.model_name == "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    assert llm.draft_name == "qwen2.5-coder-0.5b-instruct.gguf"
    assert llm.profile is not None and llm.profile.get("max_input_tokens") == 32768
