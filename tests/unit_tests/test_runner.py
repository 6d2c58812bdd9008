"""The runners' limits: pairs whose output layers have different row counts (:class:`~.runner.Rows`), and passes
longer than the largest bucket.

Origins (the outside audit of f71f2c4, issue 19): pairs like Qwen2.5-7B (152,064 rows) / Qwen2.5-0.5B (151,936)
crashed sampling and could feed the target a token it cannot embed (item 5); fixed-cache passes were capped at
256 tokens, and steps may be longer (item 6).
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from langchain_specguard.engine import SpecGuardParams, generate, load_pair
from langchain_specguard.engine.loading import ModelPair
from tests.tiny_models import _llama, _save, llama_pair, make_tokenizer, tiny_dir

EXTRA_ROWS = 9
"""Rows one model of a pair has past the other's (random weights: their logits compete with real tokens')."""


@functools.cache
def rows_pair(more: str) -> ModelPair:
    """A Llama pair whose target (``more="target"``) or draft has ``EXTRA_ROWS`` output and input rows more."""
    tok = make_tokenizer()
    root = tiny_dir()
    extra = {"target": (EXTRA_ROWS, 0), "draft": (0, EXTRA_ROWS)}[more]
    target = _save(_llama(len(tok) + extra[0], 4, seed=0), tok, root / f"rows-{more}-target")
    draft = _save(_llama(len(tok) + extra[1], 2, seed=1), tok, root / f"rows-{more}-draft")
    return load_pair(target, draft, dtype="float64", device="cpu")


PROMPTS = ["<s>Hello there, how are you?", "<s>The sum of 3 and 5 is"]


def ids(p: ModelPair, text: str) -> list[int]:
    return p.tokenizer(text, add_special_tokens=False)["input_ids"]


def params(**options: object) -> SpecGuardParams:
    base: dict[str, object] = {"n_candidates": 3, "max_tokens": 40, "max_step_tokens": 6, "seed": 0}
    return SpecGuardParams(**{**base, **options})


# different vocabulary rows


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("more", ["target", "draft"])
def test_all_fallback_equals_target_greedy_when_rows_differ(more: str, cache: str) -> None:
    p = rows_pair(more)
    for text in PROMPTS:
        prompt = ids(p, text)
        out = generate(p, prompt, params(acceptance_threshold=1.5, cache_implementation=cache))
        reference = p.target.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=[2, 4], pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert out.token_ids == reference


@pytest.mark.parametrize("more", ["target", "draft"])
def test_accept_all_is_the_drafts_greedy_over_the_rows_the_target_has(more: str) -> None:
    """Every step accepted with one greedy candidate: the draft's greedy decoding, never proposing a row the
    target cannot embed (a draft with more rows is kept to the target's)."""
    p = rows_pair(more)
    target_rows = int(p.target.get_input_embeddings().weight.shape[0])
    draft_rows = int(p.draft.get_output_embeddings().weight.shape[0])
    suppress = list(range(target_rows, draft_rows))  # empty unless the draft has more rows
    for text in PROMPTS:
        prompt = ids(p, text)
        out = generate(p, prompt, params(acceptance_threshold=-1.0, n_candidates=1))
        reference = p.draft.generate(
            torch.tensor([prompt]),
            max_new_tokens=40,
            do_sample=False,
            eos_token_id=[2, 4],
            pad_token_id=0,
            suppress_tokens=suppress or None,
        )[0, len(prompt) :].tolist()
        assert out.token_ids == reference
        assert all(t < target_rows for t in out.token_ids)


@pytest.mark.parametrize("threshold", [1.5, 0.3, -1.0])
@pytest.mark.parametrize("more", ["target", "draft"])
def test_sampling_runs_and_stays_inside_the_targets_rows(more: str, threshold: float) -> None:
    p = rows_pair(more)
    target_rows = int(p.target.get_input_embeddings().weight.shape[0])
    for seed in range(3):
        out = generate(
            p, ids(p, PROMPTS[0]), params(acceptance_threshold=threshold, temperature=0.9, seed=seed, top_k=0)
        )
        assert out.token_ids and all(t < target_rows for t in out.token_ids)


def test_a_token_only_the_target_has_reaches_the_draft_safely() -> None:
    """A target with extra rows writes one of them (its random weights make them likely): the draft, which
    cannot embed it, is fed its last row and the call goes on, equal to the target's own decoding."""
    p = rows_pair("target")
    vocab = len(p.tokenizer)
    seen_extra = False
    for text in [*PROMPTS, "<s>abc", "<s>Zq", "<s>Step"]:
        prompt = ids(p, text)
        out = generate(p, prompt, params(acceptance_threshold=1.5, max_tokens=60))
        seen_extra |= any(t >= vocab for t in out.token_ids)
    assert seen_extra  # the case under test happened


# 6. steps longer than the largest fixed-cache bucket


@pytest.mark.parametrize("decision", ["confidence", "both"])
@pytest.mark.parametrize("threshold", [2.0, -1.0])
def test_a_step_longer_than_256_tokens_runs_on_a_fixed_cache(decision: str, threshold: float) -> None:
    target, draft = llama_pair()
    p = load_pair(target, draft, dtype="float64", device="cpu")
    prompt = ids(p, PROMPTS[1])
    base = SpecGuardParams(
        acceptance_threshold=threshold,
        n_candidates=2,
        max_tokens=300,
        max_step_tokens=300,
        step_delimiters=["@@@@"],  # never written: the step runs to its cap
        decision=decision,
        seed=0,
        cache_implementation="dynamic",
    )
    static = generate(p, prompt, base.model_copy(update={"cache_implementation": "static"}))
    dynamic = generate(p, prompt, base)
    assert static.token_ids == dynamic.token_ids
    assert max(s.num_tokens for s in static.steps) > 256  # the case under test happened
    for mine, theirs in zip(static.steps, dynamic.steps, strict=True):
        assert mine.grounding == pytest.approx(theirs.grounding, abs=1e-6, nan_ok=True)
        assert mine.confidence == pytest.approx(theirs.confidence, abs=1e-6)


def test_step_buffers_are_sized_by_what_the_call_can_produce() -> None:
    """A step cap far past the budget allocates for the budget. Origin: issue 25 item 6, where
    ``invoke("hi", max_tokens=8, max_step_tokens=10**7)`` tried to allocate 6.4 GB for step buffers sized by the cap."""
    from langchain_specguard import ChatSpecGuard
    from langchain_specguard.engine.runtimes import RuntimePool

    target, draft = llama_pair()
    llm = ChatSpecGuard(model=target, draft_model=draft, max_tokens=8)
    for options in ({"max_step_tokens": 10**7}, {"max_tool_call_tokens": 10**7, "max_step_tokens": 500_000}):
        assert isinstance(llm.invoke("hi", **options).content, str)
        pool = RuntimePool.for_pair(llm.load())
        for _ in range(100):  # the batch's worker gives the runtime back just after the call's last step
            if pool.idle:
                break
            time.sleep(0.05)
        assert pool.idle and all(runtime.shape.steps == 16 for runtime in pool.idle)  # the smallest tier
        assert all(runtime.draft.state.tokens.shape[1] == 16 for runtime in pool.idle)
