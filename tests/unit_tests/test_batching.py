"""Concurrent calls share batched passes, and each call's output is what it would be alone (engine/scheduler.py).

On tiny random-weight pairs in float64 (near-ties in random logits never flip between batch shapes there):
greedy calls match token for token, seeded sampling calls match exactly too (each generation draws from its own
generator, in amounts that depend on its own step alone), with 1 to 16 calls at once, with calls joining and
leaving mid-way, with per-row options mixed (temperature, seed, stop, max_tokens, threshold, logprobs) and with
options that cannot share a pass (they run in batches of their own, in turn). The passes really are shared: a
target pass of the batch holds several generations' rows.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from langchain_specguard import ChatSpecGuard
from langchain_specguard.engine import CallOptions, SpecGuardParams, decoding, generate, generate_steps, load_pair
from langchain_specguard.engine.loading import ModelPair
from langchain_specguard.engine.runner import ModelRunner
from langchain_specguard.tools import HERMES_MARKERS, step_validator
from tests.scripted import force_script
from tests.threads import together
from tests.tiny_models import llama_pair, qwen_pair

TEXTS = [
    "<s>Hello there, how are you?",
    "<s>The sum of 3 and 5 is",
    "<s>abc def ghi",
    "<s>Zyx w, v u.",
    "<s>One two three four five six",
    "<s>(1 + 2) * 3 =",
]


@functools.cache
def pair(kind: str = "llama") -> ModelPair:
    target, draft = (llama_pair if kind == "llama" else qwen_pair)()
    return load_pair(target, draft, dtype="float64", device="cpu")


def ids(p: ModelPair, text: str) -> list[int]:
    return p.tokenizer(text, add_special_tokens=False)["input_ids"]


BASE = SpecGuardParams(acceptance_threshold=0.5, n_candidates=3, max_tokens=30, max_step_tokens=5)
"""Between these models' step scores: some steps are accepted, some written by the target."""

MIXED = [
    {},
    {"temperature": 0.8, "seed": 5},
    {"max_tokens": 7},
    {"acceptance_threshold": 0.7, "seed": 2, "temperature": 0.5},
    {"logprobs": True, "top_logprobs": 2},
    {"acceptance_threshold": -1.0},
    {"acceptance_threshold": 2.0, "max_step_tokens": 3},
    {"temperature": 1.2, "seed": 11, "candidate_temperature": 0.5},
]
"""Per-row options that share a pass."""


@pytest.fixture
def pass_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of generations each target pass fed (how much the passes were shared)."""
    sizes: list[int] = []
    forward = ModelRunner.forward

    def counting(self: ModelRunner, fed: Any, starts: Any, **kwargs: Any) -> Any:
        if self.width == 1:  # the target's runner
            sizes.append(sum(1 for f in fed if f))
        return forward(self, fed, starts, **kwargs)

    monkeypatch.setattr(ModelRunner, "forward", counting)
    return sizes


def signature(result: Any) -> tuple[Any, ...]:
    """What must not change with the company a call keeps: tokens, text, verdicts and log-probabilities."""
    logprobs = [(e.token, round(e.logprob, 9)) for s in result.steps for e in (s.logprobs or [])]
    return result.token_ids, result.text, [(s.source, s.num_tokens) for s in result.steps], logprobs


@pytest.mark.parametrize(("n", "cache"), [(1, "dynamic"), (4, "dynamic"), (16, "dynamic"), (4, "static")])
def test_concurrent_calls_decode_what_they_decode_alone(n: int, cache: str, pass_sizes: list[int]) -> None:
    p = pair()
    jobs = [
        (
            ids(p, TEXTS[i % len(TEXTS)]),
            BASE.model_copy(update={**MIXED[i % len(MIXED)], "cache_implementation": cache}),
        )
        for i in range(n)
    ]
    alone = [signature(generate(p, prompt, params)) for prompt, params in jobs]
    pass_sizes.clear()
    got = together([functools.partial(generate, p, prompt, params) for prompt, params in jobs])
    assert [signature(r) for r in got] == alone
    if n > 1:
        assert max(pass_sizes) > 1  # the calls shared their passes


def test_stop_sequences_and_thresholds_are_per_row() -> None:
    p = pair()
    prompt = ids(p, TEXTS[0])
    full = generate(p, prompt, BASE).text
    stop = full[8:10]
    options = [CallOptions(stop=(stop,)), CallOptions(), CallOptions(stop=(full[3:5],))]
    alone = [generate(p, prompt, BASE, o).text for o in options]
    got = together([functools.partial(generate, p, prompt, BASE, o) for o in options])
    assert [r.text for r in got] == alone
    assert stop not in alone[0] and alone[1] == full


@pytest.mark.parametrize("threshold", [2.0, -1.0])
def test_all_fallback_and_accept_all_hold_row_by_row(threshold: float) -> None:
    """Every step to the target: each row is the target's greedy generate(); every step accepted with one greedy
    candidate: each row is the draft's."""
    p = pair()
    params = BASE.model_copy(update={"acceptance_threshold": threshold, "n_candidates": 1 if threshold < 0 else 3})
    model = p.target if threshold > 1 else p.draft
    prompts = [ids(p, t) for t in TEXTS]
    got = together([functools.partial(generate, p, prompt, params) for prompt in prompts])
    for prompt, result in zip(prompts, got, strict=True):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, pad_token_id=0)
        eos = sorted(model.generation_config.eos_token_id or [])
        tokens = expected[0, len(prompt) :].tolist()
        assert result.token_ids == tokens[: next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))]


def test_options_that_cannot_share_a_pass_run_in_batches_of_their_own(pass_sizes: list[int]) -> None:
    """Different sampling filters, candidate counts or cache kinds run apart, in turn, with the same results."""
    p = pair()
    variants = [
        {},
        {"top_k": 5, "temperature": 0.9, "seed": 1},
        {"repetition_penalty": 1.3},
        {"n_candidates": 2},
        {"cache_implementation": "static"},
        {},
    ]
    jobs = [(ids(p, TEXTS[i]), BASE.model_copy(update=v)) for i, v in enumerate(variants)]
    alone = [signature(generate(p, prompt, params)) for prompt, params in jobs]
    got = together([functools.partial(generate, p, prompt, params) for prompt, params in jobs])
    assert [signature(r) for r in got] == alone


def test_calls_join_and_leave_between_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call that arrives while another runs joins its batch at the next step; one that finishes leaves it."""
    p = pair()
    long = BASE.model_copy(update={"max_tokens": 40})
    short = BASE.model_copy(update={"max_tokens": 6})
    first, late = ids(p, TEXTS[0]), [ids(p, t) for t in TEXTS[1:4]]
    alone_first = signature(generate(p, first, long))
    alone_late = [signature(generate(p, prompt, short)) for prompt in late]

    batches: list[int] = []
    joined = threading.Event()
    propose = decoding.propose

    def watching(runtime: Any, gens: Any) -> Any:
        batches.append(len(gens))
        if len(batches) == 2:  # the first call's second step waits for the late ones to arrive
            joined.wait(timeout=60)
        return propose(runtime, gens)

    monkeypatch.setattr(decoding, "propose", watching)
    results: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: results.update(first=generate(p, first, long)))
    runner.start()
    calls = [functools.partial(generate, p, prompt, short) for prompt in late]
    arriving = threading.Thread(target=lambda: results.update(late=together(calls)))
    scheduler = decoding.scheduler_of(p)
    _until(lambda: len(batches) >= 2)
    arriving.start()
    _until(lambda: len(scheduler.waiting) == len(late))  # submitted while the first call is mid-step
    joined.set()
    runner.join()
    arriving.join()
    assert signature(results["first"]) == alone_first
    assert [signature(r) for r in results["late"]] == alone_late
    assert batches[:2] == [1, 1] and max(batches) == 1 + len(late)  # joined between steps
    assert batches[-1] == 1  # and left when done, the first call going on alone


def _until(condition: Callable[[], bool], seconds: float = 60) -> None:
    for _ in range(int(seconds * 100)):
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError("timed out waiting")


def test_cancelling_one_stream_leaves_the_others_unchanged() -> None:
    p = pair()
    prompts = [ids(p, t) for t in TEXTS[:3]]
    params = [BASE, BASE.model_copy(update={"max_tokens": 300}), BASE]
    alone = [generate(p, prompt, par).token_ids for prompt, par in zip(prompts, params, strict=True)]
    runs: list[Iterator[Any]] = [generate_steps(p, prompt, par) for prompt, par in zip(prompts, params, strict=True)]
    got: list[list[int]] = [[], [], []]
    for i, run in enumerate(runs):  # all three submitted
        got[i] += next(run).token_ids
    runs[1].close()  # the second caller stops reading: its generation leaves at the next step boundary
    for i in (0, 2):
        got[i] += [t for s in runs[i] for t in s.token_ids]
    assert got[0] == alone[0] and got[2] == alone[2]
    assert got[1] == alone[1][: len(got[1])] and len(got[1]) < len(alone[1])
    scheduler = decoding.scheduler_of(p)
    _until(lambda: scheduler.worker is None)
    assert not scheduler.batches and not scheduler.tickets


def test_a_failing_step_check_fails_its_own_call_alone() -> None:
    """A tool-call check that raises ends that call with its error; the call beside it, writing the same scripted
    call in the same passes, finishes as it would alone."""
    target, draft = llama_pair()
    p = load_pair(target, draft, dtype="float64", device="cpu")
    call = f'{HERMES_MARKERS[0]}\n{{"name": "lookup", "arguments": {{"country": "France"}}}}\n{HERMES_MARKERS[1]}'
    force_script(p.draft, p.tokenizer, lambda prompt: call, header="<s>")
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {
        "country": {"type": "string"}}, "required": ["country"]}}}]  # fmt: skip
    params = BASE.model_copy(
        update={"tool_call_markers": HERMES_MARKERS, "acceptance_threshold": -1.0, "max_tokens": 90}
    )
    prompt = ids(p, "<s>")

    def broken(text: str) -> str | None:
        raise RuntimeError("the caller's check broke")

    good = CallOptions(validate_step=step_validator(tools))
    alone = generate(p, prompt, params, good).token_ids
    outcomes = together(
        [
            lambda: _raises(lambda: generate(p, prompt, params, CallOptions(validate_step=broken))),
            lambda: generate(p, prompt, params, good).token_ids,
        ]
    )
    assert outcomes[0] == "the caller's check broke"
    assert outcomes[1] == alone
    assert p.tokenizer.decode(alone).startswith(HERMES_MARKERS[0])


def _raises(call: Callable[[], Any]) -> str:
    try:
        call()
    except RuntimeError as error:
        return str(error)
    raise AssertionError("expected the call to fail")


def test_batch_of_a_chat_model_shares_passes_and_matches_invoke(pass_sizes: list[int]) -> None:
    """LangChain's batch() (a thread pool) batches by itself, with the results invoke gives one by one."""
    target, draft = llama_pair()
    llm = ChatSpecGuard(target_model=target, draft_model=draft, max_tokens=20, max_step_tokens=5, torch_dtype="float64")
    questions = [t.removeprefix("<s>") for t in TEXTS]
    one_by_one = [llm.invoke(q).content for q in questions]
    pass_sizes.clear()
    batched = llm.batch(questions, config={"max_concurrency": 6})
    assert [m.content for m in batched] == one_by_one
    assert max(pass_sizes) > 1


async def test_abatch_matches_ainvoke() -> None:
    target, draft = llama_pair()
    llm = ChatSpecGuard(target_model=target, draft_model=draft, max_tokens=16, max_step_tokens=4, torch_dtype="float64")
    questions = [t.removeprefix("<s>") for t in TEXTS[:4]]
    one_by_one = [(await llm.ainvoke(q)).content for q in questions]
    assert [m.content for m in await llm.abatch(questions)] == one_by_one


def test_max_batch_size_bounds_the_passes(pass_sizes: list[int]) -> None:
    p = pair()
    prompts = [ids(p, t) for t in TEXTS]
    alone = [generate(p, prompt, BASE).token_ids for prompt in prompts]
    options = CallOptions(max_batch_size=2)
    got = together([functools.partial(generate, p, prompt, BASE, options) for prompt in prompts])
    assert [r.token_ids for r in got] == alone
    assert max(pass_sizes) <= 2


def test_the_worker_ends_when_the_pair_is_idle() -> None:
    p = pair()
    generate(p, ids(p, TEXTS[0]), BASE)
    scheduler = decoding.scheduler_of(p)
    _until(lambda: scheduler.worker is None)
    assert not scheduler.batches
