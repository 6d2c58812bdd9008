"""The runtime pool (engine/runtimes.py): a burst of concurrent calls leaves few idle runtimes behind; what a target
pass costs by device."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from langchain_specguard.engine import SpecGuardParams, generate, load_pair
from langchain_specguard.engine.generation import AgreementRate
from langchain_specguard.engine.runtimes import CPU_FLOPS_PER_BYTE, MAX_IDLE_RUNTIMES, RuntimePool, pass_token_cost
from tests.tiny_models import llama_pair


def test_runtime_pool_stays_bounded_after_a_burst() -> None:
    """Origin: the outside audit (issue 11), item 9: a burst of 32 concurrent calls left 32 pooled cache pairs
    for the life of the process. After 32 calls on 16 threads the pool keeps at most ``MAX_IDLE_RUNTIMES``
    idle runtimes, and every call decoded the same text."""
    target, draft = llama_pair()
    pair = load_pair(target, draft, dtype="float32", device="cpu")
    prompt = pair.tokenizer("<s>Hello", add_special_tokens=False)["input_ids"]
    params = SpecGuardParams(max_tokens=8, max_step_tokens=3, n_candidates=2, seed=0)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: generate(pair, prompt, params).token_ids, range(32)))
    assert len({tuple(r) for r in results}) == 1
    assert len(RuntimePool.for_pair(pair).idle) <= MAX_IDLE_RUNTIMES


def test_a_cpu_target_pass_costs_compute_per_token_and_a_gpus_does_not() -> None:
    """Origin: issue 30's CPU profile (benchmarks/results/cpu/): on two AVX2 cores a target pass of 8 tokens cost
    about 3.5 one-token passes, so speculation rounds sized as a GPU's (a pass of a few tokens costing one) made the
    target's writing slower than writing alone. The pool prices each token past the first on a CPU (0.45 of a
    one-token pass in float32, twice that in half precision) and nothing on a GPU or for a served target; the
    rounds it then picks stay short unless the draft agrees often."""
    target, draft = llama_pair()
    pair = load_pair(target, draft, dtype="float32", device="cpu")
    pool = RuntimePool.for_pair(pair)
    assert pool.token_cost == pytest.approx(2 / (4 * CPU_FLOPS_PER_BYTE)) and 0.4 < pool.token_cost < 0.5
    assert pass_token_cost(None) == 0.0
    assert pass_token_cost(copy.deepcopy(pair.target).to(torch.bfloat16)) == pytest.approx(2 * pool.token_cost)

    def length(rate: float, token_cost: float) -> int:
        agreement = AgreementRate(cost=0.13, token_cost=token_cost)  # an int8 0.5B draft beside a 1.5B target
        agreement.agreed, agreement.disagreed = round(rate * 1000), round((1 - rate) * 1000)
        return agreement.speculation_length(32)

    assert length(0.7, 0.0) >= 4  # a GPU's round at 70% agreement
    assert length(0.7, pool.token_cost) == 1 and length(0.5, pool.token_cost) == 0
    assert length(0.95, pool.token_cost) >= 4  # a draft that almost always agrees still pays for long rounds
