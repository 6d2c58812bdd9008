"""The engine calls models the way the installed transformers expects (issue 20 item 6).

transformers 5 renamed the forward's ``past_key_values`` to ``cache`` and warns on every call with the old name
("will be removed in version 5.40.0"); releases before the rename (the declared range starts at 4.56) know only
``past_key_values``. A generation must warn about neither, and must still read its cache (the all-fallback
output is the target's own greedy decoding, which it is only when every pass sees the keys written before).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from langchain_specguard.engine import SpecGuardParams, generate, load_pair
from langchain_specguard.engine.loading import ModelPair
from langchain_specguard.engine.runner import cache_argument
from tests.tiny_models import gemma_pair, llama_pair, qwen_pair

PROMPT = "<s>Hello there, how are you?"


@functools.cache
def pair(kind: str) -> ModelPair:
    if kind == "self":
        target, _ = llama_pair()
        return load_pair(target, draft_layers=2, dtype="float64", device="cpu")
    target, draft = {"llama": llama_pair, "qwen": qwen_pair, "gemma": gemma_pair}[kind]()
    return load_pair(target, draft, dtype="float64", device="cpu")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", ["llama", "qwen", "gemma", "self"])
def test_generation_emits_no_deprecation_warning(kind: str, cache: str) -> None:
    p = pair(kind)
    prompt = p.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    params = SpecGuardParams(max_tokens=12, max_step_tokens=4, acceptance_threshold=2.0, cache_implementation=cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, also one already shown from the same line
        result = generate(p, prompt, params)
    deprecations = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == [], [str(w.message) for w in deprecations]
    expected = p.target.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=sorted(p.eos_token_ids), pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert result.token_ids == expected  # every step fell back: the target's greedy text, so the cache was read


def test_cache_argument_follows_the_forward_signature() -> None:
    class OldStyle(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, past_key_values: object = None, **kwargs: object) -> None: ...

    class NewStyle(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, cache: object = None, **kwargs: object) -> None: ...

    assert cache_argument(OldStyle()) == "past_key_values"  # ``cache`` would land in **kwargs, unread
    assert cache_argument(NewStyle()) == "cache"
