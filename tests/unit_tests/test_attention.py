"""The engine's attention: same outputs as transformers, step attention equal to eager attention probabilities."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from langchain_specguard.engine.runner import ModelRunner
from langchain_specguard.engine.view import engine_view
from tests.tiny_models import gemma_pair, llama_pair

TOKENS = [5, 9, 14, 20, 33, 41, 7, 8, 12, 60, 61, 62]


def _runner(model: torch.nn.Module, growable: bool, width: int = 1) -> ModelRunner:
    view = engine_view(model)
    return ModelRunner(view, slots=1, width=width, capacity=768, steps=16, growable=growable, graphs=False)


@pytest.mark.parametrize("growable", [True, False])
@pytest.mark.parametrize("context_len", [1, 5, 9])
def test_step_attention_matches_eager_attentions(context_len: int, growable: bool) -> None:
    target, _ = llama_pair()
    eager = AutoModelForCausalLM.from_pretrained(target, attn_implementation="eager", dtype=torch.float64)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64)
    layers = (2, 3)
    L = context_len
    runner = _runner(model, growable)
    record = runner.record(layers)
    with torch.no_grad():
        reference = eager(torch.tensor([TOKENS]), output_attentions=True)  # softmax in float32, even in float64
        plain = model(torch.tensor([TOKENS])).logits
        runner.prefill(0, TOKENS[: L - 1], 0)
        record.context_len.fill_(L)
        logits = runner.forward([TOKENS[L - 1 :]], [L - 1], record=record)
    assert torch.allclose(logits[0], plain[0, L - 1 :], atol=1e-12)  # recording changes nothing

    k = len(TOKENS) - L + 1
    sink, context, step = record.for_row(0, k)
    for i, layer in enumerate(layers):
        rows = reference.attentions[layer][0].mean(0)[L - 1 :]  # [k, kv], head-averaged
        assert torch.allclose(sink[i], rows[:, 0].float(), atol=1e-6)
        assert torch.allclose(context[i], rows[:, 1:L].sum(-1).float(), atol=1e-6)
        expected = rows[:, L - 1 :].clone()
        expected[:, 0] = 0.0
        assert torch.allclose(step[i], expected.float(), atol=1e-6)
        total = sink[i] + context[i] + step[i].sum(-1)  # every row's mass is accounted for exactly once
        if L > 1:
            assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_decode_loop_records_the_same_rows_as_one_pass() -> None:
    target, _ = llama_pair()
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64)
    L, layers = 5, (3,)
    whole, loop = _runner(model, True), _runner(model, True, width=2)
    with torch.no_grad():
        first = whole.record(layers)
        first.context_len.fill_(L)
        whole.prefill(0, TOKENS[: L - 1], 0)
        whole.forward([TOKENS[L - 1 :]], [L - 1], record=first)
        second = loop.record(layers)
        second.context_len.fill_(L)
        loop.prefill(0, TOKENS[: L - 1], 0)
        # greedy decoding from L-1 writes its own tokens; feed the same ones by forcing each iteration's token
        for offset, token in enumerate(TOKENS[L - 1 :]):
            loop.start_decode([token], [L - 1 + offset], [[0.0, 0.0]], [offset + 1])
            loop.state.it.fill_(offset)
            loop.decoded = offset
            loop.decode(1, record=second)
    k = len(TOKENS) - L + 1
    for a, b in zip(first.for_row(0, k), second.for_row(1, k), strict=True):
        assert torch.allclose(a, b)


def test_sliding_window_layers_match_transformers() -> None:
    """A Gemma-3-style model (sliding and full layers) over a prompt longer than its window."""
    target, _ = gemma_pair()
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64)
    window = model.config.sliding_window
    tokens = [(7 * i) % 90 + 6 for i in range(3 * window)]
    with torch.no_grad():
        reference = model(torch.tensor([tokens])).logits[0]
        for growable in (True, False):
            runner = _runner(model, growable)
            runner.prefill(0, tokens[:-5], 0)
            logits = runner.forward([tokens[-5:]], [len(tokens) - 5])[0]
            # Gemma 3's RMSNorm computes in float32 even in a float64 model, so the view's CPU linear layers (another
            # summation order, 1e-16 apart) reach the logits about 1e-7 apart; a wrong window moves them by 1e-2
            assert torch.allclose(logits, reference[-5:], atol=1e-6)


def test_views_leave_the_callers_model_alone() -> None:
    target, _ = llama_pair()
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64)
    model.train()
    before = (
        model.config._attn_implementation,
        [m.config._attn_implementation for m in model.modules() if hasattr(m, "q_proj")],
    )
    modules = list(model.modules())
    view = engine_view(model, num_layers=2)
    assert len(view.model.layers) == 2 and len(model.model.layers) == 4
    assert model.config._attn_implementation == before[0]
    assert [m.config._attn_implementation for m in model.modules() if hasattr(m, "q_proj")] == before[1]
    assert list(model.modules()) == modules and all(m.training for m in modules)
    assert view.lm_head.weight is model.lm_head.weight  # shared, not copied
