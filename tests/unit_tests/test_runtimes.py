"""The runtime pool (engine/runtimes.py): a burst of concurrent calls leaves few idle runtimes behind."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from langchain_specguard.engine import SpecGuardParams, generate, load_pair
from langchain_specguard.engine.runtimes import MAX_IDLE_RUNTIMES, RuntimePool
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
