"""The decoding loop's invariants on tiny random-weight pairs loaded through ``from_pretrained``.

- every step falls back (threshold above any score) => the target's own greedy decoding;
- every step accepted with one greedy candidate => the draft's own greedy decoding;
- same seed => same output; limits, stop sequences and EOS handled exactly.
Float64 keeps near-ties in random logits from flipping greedy choices between batch shapes.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import pytest
import torch

from langchain_specguard import ChatSpecGuard
from langchain_specguard.engine import (
    EVENT_VERSION,
    CallOptions,
    SpecGuardParams,
    decoding,
    generate,
    generate_steps,
    load_pair,
)
from langchain_specguard.engine.generation import AgreementRate, Generation
from langchain_specguard.engine.loading import ModelPair
from langchain_specguard.engine.runner import ModelRunner
from langchain_specguard.engine.runtimes import Runtime
from tests.tiny_models import WINDOW, bpe_pair, gemma_pair, llama_pair, qwen_pair

PROMPTS = ["<s>Hello there, how are you?", "<s>The sum of 3 and 5 is"]
LONG = "<s>" + "Step one, then step two; and the sum of 3 and 5 is 8. " * 2  # far past the sliding window
KINDS = ["llama", "qwen", "self", "gemma", "bpe"]
"""Llama and Qwen pairs, a self-speculative draft, a Gemma-3-style pair (sliding-window layers, window 8,
prompts longer than it) and a Qwen pair with a byte-level BPE tokenizer."""
DECISIONS = ["confidence", "both"]
"""The default, whose passes record no attention, and a decision that records and reads it."""


@functools.cache
def pair(kind: str) -> ModelPair:
    if kind == "llama":
        target, draft = llama_pair()
        return load_pair(target, draft, dtype="float64", device="cpu")
    if kind in ("qwen", "gemma", "bpe"):
        target, draft = {"qwen": qwen_pair, "gemma": gemma_pair, "bpe": bpe_pair}[kind]()
        return load_pair(target, draft, dtype="float64", device="cpu")
    target, _ = llama_pair()
    return load_pair(target, draft_layers=2, dtype="float64", device="cpu")  # self-speculative


def reference(model: torch.nn.Module, prompt: list[int], max_new: int, eos: int | list[int] | None = None) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=eos if eos is not None else sorted(model.generation_config.eos_token_id or []) or None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def ids(p: ModelPair, text: str) -> list[int]:
    return p.tokenizer(text, add_special_tokens=False)["input_ids"]


def prompts(kind: str) -> list[str]:
    return [*PROMPTS, LONG] if kind == "gemma" else PROMPTS


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("signal_source", ["target", "draft"])
@pytest.mark.parametrize("decision", DECISIONS)
def test_all_fallback_equals_target_greedy(kind: str, signal_source: str, cache: str, decision: str) -> None:
    p = pair(kind)
    params = SpecGuardParams(
        acceptance_threshold=1.5,
        n_candidates=3,
        max_tokens=40,
        max_step_tokens=6,
        step_delimiters=["\n"],
        signal_source=signal_source,
        confidence_method="mean" if signal_source == "draft" else "ratio",  # ratio compares with the target
        decision=decision,
        seed=0,
        cache_implementation=cache,
    )
    for text in prompts(kind):
        prompt = ids(p, text)
        result = generate(p, prompt, params)
        assert result.token_ids == reference(p.target, prompt, 40)
        assert all(s.source == "target" and not s.accepted for s in result.steps)
        assert result.summary["target_tokens"] == len(result.token_ids)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("signal_source", ["target", "draft"])
@pytest.mark.parametrize("decision", DECISIONS)
def test_all_accepted_equals_draft_greedy(kind: str, signal_source: str, cache: str, decision: str) -> None:
    p = pair(kind)
    params = SpecGuardParams(
        acceptance_threshold=-1.0,
        n_candidates=1,
        max_tokens=40,
        max_step_tokens=6,
        step_delimiters=["\n"],
        signal_source=signal_source,
        confidence_method="mean" if signal_source == "draft" else "ratio",  # ratio compares with the target
        decision=decision,
        cache_implementation=cache,
    )
    for text in prompts(kind):
        prompt = ids(p, text)
        result = generate(p, prompt, params)
        assert result.token_ids == reference(p.draft, prompt, 40)
        assert all(s.source == "draft" and s.accepted for s in result.steps)
        assert result.summary["accepted_share"] == 1.0


def test_step_events_carry_scores_and_counts() -> None:
    p = pair("llama")
    params = SpecGuardParams(
        acceptance_threshold=0.3, n_candidates=4, max_tokens=30, max_step_tokens=5, seed=1, decision="both"
    )
    result = generate(p, ids(p, PROMPTS[0]), params)
    assert sum(s.num_tokens for s in result.steps) == len(result.token_ids) <= 30
    for i, step in enumerate(result.steps):
        assert step.index == i
        assert 0.0 <= step.grounding <= 1.0 and 0.0 <= step.confidence <= 1.0
        assert step.score == pytest.approx(min(step.grounding, step.confidence))
        assert step.accepted == (step.score >= 0.3)
        assert step.source == ("draft" if step.accepted else "target")
        assert step.n_candidates == 4 and step.drafted_tokens >= step.num_tokens if step.accepted else True
        assert step.seconds > 0 and step.threshold == 0.3
        assert step.to_dict()["version"] == EVENT_VERSION
    summary = result.summary
    assert summary["steps"] == len(result.steps)
    assert summary["draft_tokens"] + summary["target_tokens"] == len(result.token_ids)


def test_default_decision_is_confidence_alone_without_recording_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_specguard.engine.runner import ModelRunner

    p = pair("llama")
    base = SpecGuardParams(acceptance_threshold=0.3, n_candidates=4, max_tokens=30, max_step_tokens=5, seed=1)
    assert base.decision == "confidence" and not base.uses_grounding
    weighted = generate(p, ids(p, PROMPTS[0]), base.model_copy(update={"decision": "weighted", "grounding_weight": 0}))

    def no_recording(*args: object) -> None:
        raise AssertionError("attention recorded for a decision that does not read it")

    monkeypatch.setattr(ModelRunner, "record", no_recording)
    result = generate(p, ids(p, PROMPTS[0]), base)
    assert result.token_ids == weighted.token_ids
    for step in result.steps:
        assert math.isnan(step.grounding) and step.to_dict()["grounding"] is None
        assert step.score == step.confidence and step.accepted == (step.confidence >= 0.3)


def test_same_seed_same_output_when_sampling() -> None:
    p = pair("qwen")
    prompt = ids(p, PROMPTS[1])
    params = SpecGuardParams(
        temperature=0.9, top_p=0.9, n_candidates=3, max_tokens=30, acceptance_threshold=0.2, seed=7
    )
    first = generate(p, prompt, params)
    second = generate(p, prompt, params)
    assert first.token_ids == second.token_ids
    other = generate(p, prompt, params.model_copy(update={"seed": 8}))
    assert len(other.token_ids) > 0


@pytest.mark.parametrize("threshold", [0.5, -1.0])  # -1: the kept (consistency-selected) candidate is always used
def test_greedy_is_deterministic_with_several_candidates(threshold: float) -> None:
    """Origin: the outside audit (issue 11), item 2: at temperature 0 with the default 4 candidates, the kept
    candidate was often one sampled at ``candidate_temperature`` from a randomly seeded generator, so identical
    calls gave different texts. ``temperature=0`` gives the same output on every call."""
    target, draft = llama_pair()
    llm = ChatSpecGuard(
        target_model=target,
        draft_model=draft,
        max_tokens=40,
        max_step_tokens=6,
        torch_dtype="float64",
        acceptance_threshold=threshold,
        n_candidates=4,  # sampled candidates beside the greedy one (a CPU's default is the greedy one alone)
    )
    assert llm.n_candidates == 4 and llm.temperature == 0 and llm.seed is None
    outputs = {str(llm.invoke("Hello there").content) for _ in range(6)}
    assert len(outputs) == 1


def test_max_tokens_is_respected() -> None:
    p = pair("llama")
    prompt = ids(p, PROMPTS[0])
    for limit in (1, 2, 7):
        result = generate(p, prompt, SpecGuardParams(max_tokens=limit, max_step_tokens=3, acceptance_threshold=0.5))
        assert len(result.token_ids) == limit
        assert result.finish_reason == "length"


def test_stop_sequence_cuts_exactly() -> None:
    p = pair("llama")
    prompt = ids(p, PROMPTS[0])
    full = p.tokenizer.decode(reference(p.target, prompt, 40), skip_special_tokens=True)
    stop = full[12:15]
    cut = full.index(stop)
    params = SpecGuardParams(acceptance_threshold=2.0, max_tokens=40, max_step_tokens=4)
    result = generate(p, prompt, params, CallOptions(stop=(stop,)))
    assert result.text == full[:cut]
    assert stop not in result.text
    assert result.finish_reason == "stop"


def test_eos_inside_a_step_ends_generation() -> None:
    base = pair("llama")
    prompt = ids(base, PROMPTS[0])
    greedy = reference(base.target, prompt, 30)
    eos_token = greedy[9]
    p = ModelPair(**{**base.__dict__, "eos_token_ids": frozenset({eos_token})})
    result = generate(p, prompt, SpecGuardParams(acceptance_threshold=2.0, max_tokens=30, max_step_tokens=16))
    assert result.token_ids == reference(base.target, prompt, 30, eos=eos_token)
    assert result.token_ids[-1] == eos_token and result.finish_reason == "stop"


def test_prompt_errors() -> None:
    p = pair("llama")
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(p, [], SpecGuardParams())
    with pytest.raises(ValueError, match=r"prompt has 600 tokens but the model's context window is 512"):
        generate(p, [5] * 600, SpecGuardParams())
    with pytest.raises(ValueError, match="non-empty"):
        generate(p, [5, 6], SpecGuardParams(), CallOptions(stop=("",)))
    # the pair is still usable afterwards
    assert generate(p, [5, 6], SpecGuardParams(max_tokens=3)).token_ids


def test_budget_is_clipped_to_the_context_window() -> None:
    p = pair("llama")
    result = generate(p, [7] * 508, SpecGuardParams(max_tokens=100, acceptance_threshold=2.0))
    assert len(result.token_ids) == 4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("signal_source", ["target", "draft"])
@pytest.mark.parametrize("decision", DECISIONS)
def test_static_cache_path_matches_dynamic(kind: str, signal_source: str, decision: str) -> None:
    """The static-cache path (what CUDA graphs run on) decodes exactly like the dynamic one, over reused caches."""
    p = pair(kind)
    for threshold in (2.0, -1.0, 0.4):
        dynamic = SpecGuardParams(
            acceptance_threshold=threshold,
            n_candidates=3,
            max_tokens=30,
            max_step_tokens=5,
            seed=3,
            signal_source=signal_source,
            confidence_method="mean" if signal_source == "draft" else "ratio",  # ratio compares with the target
            decision=decision,
        )
        static = dynamic.model_copy(update={"cache_implementation": "static"})
        for text in prompts(kind):
            prompt = ids(p, text)
            expected = generate(p, prompt, dynamic)
            got = generate(p, prompt, static)
            assert got.token_ids == expected.token_ids
            assert [s.accepted for s in got.steps] == [s.accepted for s in expected.steps]
            for mine, theirs in zip(got.steps, expected.steps, strict=True):  # the signals themselves agree
                assert mine.grounding == pytest.approx(theirs.grounding, abs=1e-6, nan_ok=True)
                assert mine.confidence == pytest.approx(theirs.confidence, abs=1e-6)


def test_compile_needs_static_cache() -> None:
    with pytest.raises(ValueError, match="needs cache_implementation='static'"):
        SpecGuardParams(compile_decode=True, cache_implementation="dynamic")


def test_interleaved_static_generations_do_not_share_caches() -> None:
    """Two generations in flight on one pair each get their own static caches (the pool hands out one each)."""
    p = pair("llama")
    params = SpecGuardParams(
        cache_implementation="static", acceptance_threshold=0.4, n_candidates=2, max_tokens=24, max_step_tokens=4
    )
    first, second = ids(p, PROMPTS[0]), ids(p, PROMPTS[1])
    expected = (generate(p, first, params).token_ids, generate(p, second, params).token_ids)
    a, b = generate_steps(p, first, params), generate_steps(p, second, params)
    got_a: list[int] = []
    got_b: list[int] = []
    for step_a, step_b in zip(a, b, strict=False):  # alternate steps of the two generations
        got_a += step_a.token_ids
        got_b += step_b.token_ids
    got_a += [t for s in a for t in s.token_ids]
    got_b += [t for s in b for t in s.token_ids]
    assert (got_a, got_b) == expected


def test_long_prompt_is_past_the_window() -> None:
    assert len(ids(pair("gemma"), LONG)) > 3 * WINDOW


@pytest.mark.parametrize("kind", ["llama", "bpe"])
def test_float32_all_fallback_equals_target_greedy(kind: str) -> None:
    """Where the "equals the target's own greedy decoding" claim is made: float32 (and float64) on the CPU."""
    target, draft = llama_pair() if kind == "llama" else bpe_pair()
    p = load_pair(target, draft, dtype="float32", device="cpu")
    params = SpecGuardParams(acceptance_threshold=1.5, n_candidates=2, max_tokens=32, max_step_tokens=5, seed=0)
    for text in PROMPTS:
        prompt = ids(p, text)
        assert generate(p, prompt, params).token_ids == reference(p.target, prompt, 32)


@pytest.mark.parametrize("threshold", [1.5, 0.4])
def test_sampling_is_reproducible_and_kept_prefix_is_counted(threshold: float) -> None:
    """Sampling (speculative rejection sampling in the fallback) is reproducible with a seed."""
    p = pair("llama")
    prompt = ids(p, PROMPTS[0])
    params = SpecGuardParams(
        temperature=0.8, n_candidates=2, max_tokens=30, max_step_tokens=5, acceptance_threshold=threshold, seed=11
    )
    first, second = generate(p, prompt, params), generate(p, prompt, params)
    assert first.token_ids == second.token_ids and len(first.token_ids) == 30
    for step in first.steps:
        assert 0 <= step.kept_tokens <= step.num_tokens
        assert step.kept_tokens == 0 or step.source == "target"


def _held_as_if_fresh(runtime: Runtime, slot: int, sequence: list[int]) -> None:
    """Each of the slot's cache rows holds, on its valid positions, what a fresh prefill of ``sequence`` writes."""
    for runner in (runtime.draft, runtime.target):
        fresh = ModelRunner(runner.view, slots=1, capacity=0, steps=8, growable=True, graphs=False)
        for row in runner.slot_rows(slot):
            n = runner.cache.valid[row]
            if not n:
                continue
            fresh.cache.valid[0] = 0
            fresh.prefill(0, sequence[:n], 0)
            pairs = zip(runner.cache.keys + runner.cache.values, fresh.cache.keys + fresh.cache.values, strict=True)
            for held, expected in pairs:
                assert held is not None and expected is not None
                torch.testing.assert_close(held[row, :, :n], expected[0, :, :n], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rounds", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_between_steps_the_caches_hold_the_committed_sequence_and_no_more(
    cache: str, temperature: float, rounds: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Positions have one owner: passes record how far they fed, the loop cuts back to what it keeps. After every
    step each cache holds no more than the committed sequence but its last token (fed again by the next pass), and
    what it holds is what a fresh prefill of that sequence writes (no position of a token that was not kept counts
    as valid), whichever phases ran (accepted steps, rejected ones, speculation rounds); after an accepted step the
    draft's holds exactly that (it fed the whole step but its last token). A cache that lags catches up later.
    Checked inside the loop, right after each commit, for two generations sharing the batch.

    ``rounds``: a rejected step is written in a speculation round of 4 draft tokens, then by the target
    alone (these tiny models' sizes would make it plain decoding throughout); what is written stays the same."""
    if rounds:
        lengths = itertools.cycle([4, 0])
        monkeypatch.setattr(AgreementRate, "speculation_length", lambda self, room: min(room, next(lengths)))
    sources: set[str] = set()
    commit = decoding.commit

    def checking_commit(runtime: Runtime, gen: Generation, *args: Any) -> Any:
        event = commit(runtime, gen, *args)
        sequence = gen.ids
        for runner in (runtime.draft, runtime.target):
            assert all(runner.cache.valid[row] <= len(sequence) - 1 for row in runner.slot_rows(gen.slot))
        if event.accepted:
            assert runtime.draft.cache.valid[gen.slot * runtime.draft.width] == len(sequence) - 1
        _held_as_if_fresh(runtime, gen.slot, sequence)
        sources.add(event.source)
        return event

    monkeypatch.setattr(decoding, "commit", checking_commit)
    p = pair("llama")
    params = SpecGuardParams(
        cache_implementation=cache,
        # between these models' step scores: some steps pass, some go to the target
        acceptance_threshold=0.555 if temperature == 0 else 0.55,
        n_candidates=3,
        max_tokens=40,
        max_step_tokens=5,
        temperature=temperature,
        seed=3,
    )
    prompt = ids(p, PROMPTS[1])
    together = [generate_steps(p, prompt, params), generate_steps(p, ids(p, PROMPTS[0]), params)]
    sequence = list(prompt)
    for first, _ in itertools.zip_longest(*together):
        sequence += first.token_ids if first is not None else []
    assert sources == {"draft", "target"}  # both kinds of step ran
    if temperature == 0:  # how a rejected step is written never changes what is written
        monkeypatch.undo()
        assert sequence == prompt + generate(p, prompt, params).token_ids
