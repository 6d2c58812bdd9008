"""The attention capture on scored layers matches eager attention probabilities exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from langchain_specguard.engine.attention import capture, instrument
from tests.tiny_models import llama_pair


@pytest.mark.parametrize("context_len", [1, 5, 9])
def test_capture_matches_eager_attentions(context_len: int) -> None:
    target, _ = llama_pair()
    eager = AutoModelForCausalLM.from_pretrained(target, attn_implementation="eager", dtype=torch.float64)
    fast = AutoModelForCausalLM.from_pretrained(target, attn_implementation="sdpa", dtype=torch.float64)
    tokens = torch.tensor([[5, 9, 14, 20, 33, 41, 7, 8, 12, 60, 61, 62]])
    layers = (2, 3)
    instrument(fast, layers)
    with torch.no_grad():
        reference = eager(tokens, output_attentions=True)
        with capture(fast, layers, context_len) as record:
            logits = fast(tokens).logits
    assert torch.allclose(logits, reference.logits, atol=1e-7)  # capturing changes nothing

    sink, context, step = record.stacked(batch=1)
    L = context_len
    for i, layer in enumerate(layers):
        probs = reference.attentions[layer][0].mean(0)  # [q, kv], head-averaged
        rows = probs[L - 1 :]
        assert torch.allclose(sink[i, 0], rows[:, 0])
        assert torch.allclose(context[i, 0], rows[:, 1:L].sum(-1))
        expected = rows[:, L - 1 :].clone()
        expected[:, 0] = 0.0
        assert torch.allclose(step[i, 0], expected)
        # every row's mass is accounted for exactly once
        total = sink[i, 0] + context[i, 0] + step[i, 0].sum(-1)
        if L > 1:
            assert torch.allclose(total, torch.ones_like(total))


def test_incremental_capture_matches_one_pass() -> None:
    target, _ = llama_pair()
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64)
    instrument(model, (3,))
    tokens = [5, 9, 14, 20, 33, 41, 7, 8]
    L = 5
    with torch.no_grad():
        with capture(model, (3,), L) as whole:
            model(torch.tensor([tokens]))
        from transformers import DynamicCache

        cache = DynamicCache()
        with capture(model, (3,), L) as steps:
            model(torch.tensor([tokens[:L]]), past_key_values=cache, use_cache=True)
            for t in tokens[L:]:
                model(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
    for a, b in zip(whole.stacked(1), steps.stacked(1), strict=True):
        assert torch.allclose(a, b)
