"""Decoding parameters (``engine/params.py``): the defaults that depend on the device.

Issue 30 chose them from CPU measurements (benchmarks/results/cpu_*): on a CPU every extra draft candidate costs
compute the target alone never pays, so the CPU default is one (greedy) candidate; a GPU keeps four, which cost
about what one does there. Pinned here, with the draft's subset head default (tests/unit_tests/test_draft_vocab.py).
"""

from __future__ import annotations

import pytest
import torch

from langchain_specguard.engine import SpecGuardParams, generate, load_pair
from langchain_specguard.engine.params import CPU_CANDIDATES, CUDA_CANDIDATES
from tests.tiny_models import llama_pair


def test_candidates_default_to_one_on_a_cpu_and_four_on_a_gpu() -> None:
    params = SpecGuardParams()
    assert params.n_candidates is None
    assert (CPU_CANDIDATES, CUDA_CANDIDATES) == (1, 4)
    assert params.on_device(torch.device("cpu")).n_candidates == 1
    assert params.on_device(torch.device("cuda")).n_candidates == 4
    assert params.on_device(torch.device("cuda")).candidate_temperatures == [0.0, 0.8, 0.8, 0.8]
    chosen = SpecGuardParams(n_candidates=3)
    assert chosen.on_device(torch.device("cpu")) is chosen and chosen.candidates == 3  # a choice is kept everywhere


def test_unfilled_candidates_are_refused_where_decoding_needs_a_count() -> None:
    with pytest.raises(ValueError, match="on_device"):
        _ = SpecGuardParams().candidate_temperatures


def test_a_cpu_call_drafts_one_candidate_by_default() -> None:
    target, draft = llama_pair()
    pair = load_pair(target, draft, dtype="float64", device="cpu")
    ids = pair.tokenizer("<s>Hello there", add_special_tokens=False)["input_ids"]
    result = generate(pair, ids, SpecGuardParams(max_tokens=12, max_step_tokens=4))
    assert result.steps and all(s.n_candidates == 1 for s in result.steps)
