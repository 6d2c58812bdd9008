"""Engine views (``engine/view.py``): the CPU's skinny linear layers, the draft's subset LM head, the int8 draft.

They came with the CPU work of issue 30: ``SkinnyLinear`` computes ``weight @ x.T`` for a few rows (MKL's
``x @ weight.T`` repacks the weight on every call), ``SubsetHead`` gives a draft an LM head over the most
frequent tokens (FR-Spec), ``int8_view`` runs a draft's linear layers in int8. Each must compute what the
caller's layers compute (the int8 draft within int8 rounding) and change nothing the caller holds.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from langchain_specguard.engine.cache import KVCache
from langchain_specguard.engine.runner import model_pass, output_vocab
from langchain_specguard.engine.view import (
    SKINNY_ROWS,
    Int8Linear,
    SkinnyLinear,
    SubsetHead,
    engine_view,
    int8_available,
    int8_view,
    read_bytes,
    subset_head_view,
    use_int8,
)
from tests.tiny_models import bpe_pair


def logits_of(view: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """The view's logits over ``tokens`` from position 0, through the engine's pass (its mask and cache)."""
    layers = int(view.config.num_hidden_layers)
    cache = KVCache(layers, 0, growable=True)
    cache.ensure(len(tokens))
    with torch.inference_mode():
        return model_pass(view, cache, (None,) * layers, torch.tensor([tokens]), torch.arange(len(tokens))[None],
                          len(tokens))  # fmt: skip


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 7, SKINNY_ROWS, SKINNY_ROWS + 1, 40])
def test_skinny_linear_equals_linear_in_float64(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = torch.nn.Linear(24, 56, bias=bias, dtype=torch.float64)
    skinny = SkinnyLinear.of(linear)
    x = torch.randn(1, rows, 24, dtype=torch.float64)
    out = skinny(x)
    assert out.shape == (1, rows, 56)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, linear.weight, linear.bias), rtol=1e-12, atol=1e-12)
    assert skinny.weight is linear.weight and (skinny.bias is linear.bias)
    assert type(linear) is torch.nn.Linear  # the caller's layer is untouched


def test_cpu_view_runs_skinny_layers_over_the_callers_weights() -> None:
    target, _ = bpe_pair()
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64)
    before = {name: type(m) for name, m in model.named_modules()}
    view = engine_view(model)
    linears = [m for m in view.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, SkinnyLinear) for m in linears)
    assert {name: type(m) for name, m in model.named_modules()} == before  # nothing the caller holds changed
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for p in view.parameters())  # no weight copied
    tokens = [1, 5, 9, 13, 40, 41]
    with torch.inference_mode():
        own = model(torch.tensor([tokens])).logits
    torch.testing.assert_close(logits_of(view, tokens), own, rtol=1e-10, atol=1e-10)


def test_subset_head_gives_the_full_heads_logits_of_its_tokens() -> None:
    target, _ = bpe_pair()
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64)
    view = engine_view(model)
    ids = torch.tensor([0, 2, 3, 17, 100, 260, 301])
    subset = subset_head_view(view, ids)
    head = subset.get_output_embeddings()
    assert isinstance(head, SubsetHead) and head.ids.tolist() == ids.tolist()
    assert output_vocab(subset) == output_vocab(view) == model.config.vocab_size  # token ids, not columns
    assert view.get_output_embeddings() is not head  # the full view keeps its head
    tokens = [1, 5, 9, 13]
    torch.testing.assert_close(logits_of(subset, tokens), logits_of(view, tokens)[..., ids], rtol=1e-12, atol=1e-12)


def test_subset_head_refuses_ids_outside_the_head() -> None:
    target, _ = bpe_pair()
    view = engine_view(AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64))
    with pytest.raises(ValueError, match="rows of the head"):
        subset_head_view(view, torch.tensor([0, 10**6]))
    with pytest.raises(ValueError, match="non-empty"):
        subset_head_view(view, torch.tensor([], dtype=torch.long))


@pytest.mark.skipif(not int8_available(), reason="this torch has no quantized kernels")
@pytest.mark.parametrize("rows", [1, 4, 20])
def test_int8_linear_is_the_float_layer_within_int8_rounding(rows: int) -> None:
    torch.manual_seed(rows)
    linear = torch.nn.Linear(64, 96)
    layer = Int8Linear(linear)
    x = torch.randn(2, rows, 64)
    exact = linear(x)
    out = layer(x)
    assert out.shape == exact.shape and out.dtype == torch.float32
    assert (out - exact).abs().max() <= 0.05 * exact.abs().max()  # int8 weights and inputs: about 1% of the range
    assert layer.nbytes == 64 * 96 + 4 * 96 and not list(layer.parameters())


@pytest.mark.skipif(not int8_available(), reason="this torch has no quantized kernels")
def test_an_int8_rows_output_is_its_own_whatever_rides_beside_it() -> None:
    """Origin: issue 30's int8 draft quantized a whole pass's input on one scale, so a row's numbers moved with the
    other rows of the batch: 32 concurrent calls with one seed gave two different texts
    (test_runtimes.py::test_runtime_pool_stays_bounded_after_a_burst). Each token now has its own scale: a row alone,
    beside rows a thousand times larger, or as one of several positions, gives the same bits."""
    torch.manual_seed(0)
    layer = Int8Linear(torch.nn.Linear(64, 96))
    row = torch.randn(1, 64)
    alone = layer(row)
    for others in (1000 * torch.randn(5, 64), 1e-3 * torch.randn(3, 64), torch.zeros(2, 64)):
        assert torch.equal(layer(torch.cat([others, row]))[-1:], alone)
    assert torch.equal(layer(torch.cat([row, 50 * torch.randn(1, 64)])[None])[0, :1], alone)  # [1, q, d] passes


@pytest.mark.skipif(not int8_available(), reason="this torch has no quantized kernels")
def test_int8_view_keeps_the_callers_model_and_agrees_with_it() -> None:
    target, _ = bpe_pair()
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    before = {name: type(m) for name, m in model.named_modules()}
    view = engine_view(model)
    subset = subset_head_view(view, torch.arange(0, 300, 3))
    for quantized, full in ((int8_view(view), view), (int8_view(subset), subset)):
        assert {name: type(m) for name, m in model.named_modules()} == before
        assert not [m for m in quantized.model.layers.modules() if type(m) in (torch.nn.Linear, SkinnyLinear)]
        tokens = [1, 5, 9, 13, 40, 41]
        exact, approx = logits_of(full, tokens), logits_of(quantized, tokens)
        assert (approx - exact).abs().max() <= 0.1 * exact.abs().max()
        assert read_bytes(quantized) < read_bytes(full) / 2  # its layers and head read a quarter of the bytes
    assert isinstance(int8_view(subset).get_output_embeddings(), SubsetHead)  # still maps columns to ids


def test_int8_is_a_cpu_float32_default_and_a_clear_error_elsewhere() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_int8(None, cpu, torch.float32) == int8_available()
    assert not use_int8(None, cpu, torch.float64) and not use_int8(None, cuda, torch.float32)
    assert not use_int8(False, cpu, torch.float32)
    with pytest.raises(ValueError, match="draft_int8=True needs"):
        use_int8(True, cuda, torch.bfloat16)
