"""The step loop with a served target (engine/served_steps.py, loading.load_served_pair), exactly.

The server is a stand-in that answers vLLM's completions dialect from a tiny local model
(tests/served_server.py ``ModelServer``), so what the target would write is known: its own ``generate()``.
Every step rejected gives the served model's greedy output token for token, every step accepted the local
draft's, and anything in between the local engine's own steps with that model as a local target. The real
vLLM server runs the same loop in tests/integration_tests/test_served.py. Float64, as in test_engine.py,
keeps near-ties in random logits from flipping a choice between the two sides' arithmetic.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from langchain_specguard.engine import CallOptions, SpecGuardParams, generate, load_pair, load_served_pair
from langchain_specguard.engine.loading import ModelPair
from langchain_specguard.engine.served import ServedHTTPError, ServedProtocolError, ServedTokenizerError
from tests.served_server import ModelServer, peer
from tests.threads import together
from tests.tiny_models import llama_pair, mismatched_draft

NAME = "tiny-target"
PROMPTS = ["<s>Hello there, how are you?", "<s>The sum of 3 and 5 is"]
TOKENS = 16


def params(**overrides: Any) -> SpecGuardParams:
    values: dict[str, Any] = {
        "n_candidates": 1,  # (the tiny draft's extra candidates cost seconds a step on a loaded 2-core machine)
        "max_tokens": TOKENS,
        "max_step_tokens": 6,
        "step_delimiters": ["\n"],
        "seed": 0,
        **overrides,
    }
    return SpecGuardParams(**values)


def reference(model: PreTrainedModel, prompt: list[int], n: int) -> list[int]:
    out = model.generate(  # type: ignore[operator]
        torch.tensor([prompt]),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=sorted(model.generation_config.eos_token_id or []) or None,
        pad_token_id=0,
    )
    return list(out[0, len(prompt) :].tolist())


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[ModelServer, str]]:
    target, _ = llama_pair()
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64).eval()
    stand_in = ModelServer(model, AutoTokenizer.from_pretrained(target), NAME)
    with peer(stand_in.handler()) as url:
        yield stand_in, url


@pytest.fixture
def stand_in(server: tuple[ModelServer, str]) -> Iterator[ModelServer]:
    """The module's server, its record cleared, and after the test its faults off and no request of it still running
    (a request the client gave up on finishes in the server's thread)."""
    stand_in = server[0]
    stand_in.requests.clear()
    yield stand_in
    stand_in.delay, stand_in.fail, stand_in.most_at_once = 0.0, None, 0
    deadline = time.monotonic() + 30
    while stand_in.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pair(server: tuple[ModelServer, str]) -> ModelPair:
    _, draft = llama_pair()
    return load_served_pair(server[1], draft, model=NAME, dtype="float64", device="cpu")


def ids(pair: ModelPair, text: str) -> list[int]:
    return list(pair.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(
    ("text", "signal_source", "method"), [(PROMPTS[0], "target", "ratio"), (PROMPTS[1], "draft", "mean")]
)
def test_every_step_rejected_is_the_served_models_greedy_output(
    pair: ModelPair, stand_in: ModelServer, text: str, signal_source: str, method: str
) -> None:
    prompt = ids(pair, text)
    stand_in.requests.clear()
    run = params(acceptance_threshold=1.5, signal_source=signal_source, confidence_method=method)
    result = generate(pair, prompt, run)
    assert result.token_ids == reference(stand_in.model, prompt, TOKENS)
    assert all(s.source == "target" and not s.accepted for s in result.steps)
    sent = stand_in.completion_requests()
    assert len(sent) == sum(s.target_forwards for s in result.steps)  # each request counted on its step
    judged = [body for body in sent if body.get("echo")]
    assert len(judged) == len(result.steps)  # one judgement per step, and the rest writes
    assert all(body["logprobs"] == 1 and body["max_tokens"] == 1 for body in judged)
    writes = [body for body in sent if not body.get("echo")]
    eos = sorted(pair.eos_token_ids)
    assert writes and all(b["stop"] == ["\n"] and b["stop_token_ids"] == eos for b in writes)
    assert all(b["max_tokens"] <= run.max_step_tokens for b in writes)


def test_every_step_accepted_is_the_local_drafts_greedy_output(pair: ModelPair, stand_in: ModelServer) -> None:
    for text in PROMPTS:
        prompt = ids(pair, text)
        stand_in.requests.clear()
        result = generate(pair, prompt, params(acceptance_threshold=-1.0, n_candidates=1))
        assert result.token_ids == reference(pair.draft, prompt, TOKENS)
        assert all(s.source == "draft" and s.accepted and s.target_forwards == 1 for s in result.steps)
        # one round trip a step: the committed ids and the step, as ids
        sent = stand_in.completion_requests()
        assert len(sent) == len(result.steps)
        committed = list(prompt)
        for body, step in zip(sent, result.steps, strict=True):
            assert body["prompt"] == committed + step.token_ids and body["echo"]
            committed += step.token_ids


@pytest.mark.parametrize(
    ("text", "overrides"),
    [
        (PROMPTS[1], {"acceptance_threshold": 0.5}),  # ratio, per token: a rejected step keeps what passed
        (PROMPTS[0], {"acceptance_threshold": 0.0145, "signal_source": "draft", "confidence_method": "min"}),
    ],
)
def test_a_mixed_run_takes_the_local_engines_steps(pair: ModelPair, text: str, overrides: dict[str, Any]) -> None:
    """The same answers decide alike: the local engine with the served model as its local target takes the very
    same steps, accepts the same ones and keeps the same prefixes of the rejected ones. (The thresholds sit among
    the random pair's scores, so that both kinds of step happen.)"""
    target, draft = llama_pair()
    local = load_pair(target, draft, dtype="float64", device="cpu")
    run, prompt = params(**overrides), ids(pair, text)
    served, alone = generate(pair, prompt, run), generate(local, prompt, run)
    assert served.token_ids == alone.token_ids
    assert [(s.accepted, s.source, s.kept_tokens, s.draft_text) for s in served.steps] == [
        (s.accepted, s.source, s.kept_tokens, s.draft_text) for s in alone.steps
    ]
    assert [s.confidence for s in served.steps] == pytest.approx([s.confidence for s in alone.steps], abs=1e-9)
    assert {s.accepted for s in served.steps} == {True, False}


def test_concurrent_calls_send_their_requests_together_and_decode_as_alone(
    pair: ModelPair, stand_in: ModelServer
) -> None:
    run = params(acceptance_threshold=0.5, max_tokens=12)
    prompts = [ids(pair, text) for text in [*PROMPTS, "<s>Why is the sky blue?"]]
    alone = [generate(pair, prompt, run).token_ids for prompt in prompts]
    stand_in.delay = 0.2  # every request takes a while: calls in one batch overlap theirs
    at_once = together([functools.partial(generate, pair, prompt, run) for prompt in prompts])
    assert [result.token_ids for result in at_once] == alone
    assert stand_in.most_at_once >= 2


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"temperature": 0.7}, r"temperature=0\.7 is not supported with a served target \(http://127"),
        ({"repetition_penalty": 1.2}, "repetition_penalty=1.2 is not supported"),
        ({"logprobs": True}, "logprobs=True is not supported"),
        ({"decision": "both"}, "reads the target's attention grounding, which is not available"),
    ],
)
def test_what_a_served_target_cannot_do_exactly_is_refused_before_any_request(
    pair: ModelPair, stand_in: ModelServer, overrides: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        generate(pair, ids(pair, PROMPTS[0]), params(**overrides))
    assert stand_in.completion_requests() == []


def test_grounding_on_the_local_drafts_attention_works_with_a_served_target(pair: ModelPair) -> None:
    run = params(acceptance_threshold=0.2, signal_source="draft", confidence_method="mean", decision="both")
    result = generate(pair, ids(pair, PROMPTS[0]), run)
    assert any(s.grounding == s.grounding and s.num_tokens > 1 for s in result.steps)  # measured (not NaN)


def test_a_failing_server_ends_the_call_with_its_error_and_the_pair_works_after(
    pair: ModelPair, stand_in: ModelServer
) -> None:
    prompt, run = ids(pair, PROMPTS[0]), params(acceptance_threshold=0.5)
    expected = generate(pair, prompt, run).token_ids
    stand_in.fail = 503
    with pytest.raises(ServedHTTPError, match=r"served target http://127\.0\.0\.1:\d+/v1: /v1/completions answered"):
        generate(pair, prompt, run)
    stand_in.fail = None
    assert generate(pair, prompt, run).token_ids == expected


def test_the_calls_timeout_bounds_a_slow_server(pair: ModelPair, stand_in: ModelServer) -> None:
    stand_in.delay = 3.0
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"timeout of 1\.0 s"):
        generate(pair, ids(pair, PROMPTS[0]), params(), CallOptions(timeout=1.0))
    assert time.monotonic() - started < 3.5  # the request is cut at the call's deadline, not the target's 60 s


def test_loading_checks_the_tokenizer_and_takes_the_servers_window(server: tuple[ModelServer, str]) -> None:
    stand_in, url = server
    _, draft = llama_pair()
    with pytest.raises(ServedTokenizerError, match=r"tokenizes the probe .* otherwise than the local tokenizer"):
        load_served_pair(url, mismatched_draft(), model=NAME, device="cpu")  # its own tokenizer numbers otherwise
    with pytest.raises(ServedProtocolError, match=r"serves \['tiny-target'\], not 'other': name one of them"):
        load_served_pair(url, draft, model="other", device="cpu")
    narrow = ModelServer(stand_in.model, stand_in.tokenizer, NAME, max_model_len=100)
    with peer(narrow.handler()) as narrow_url:
        pair = load_served_pair(narrow_url, draft, dtype="float64", device="cpu")  # its only model, asked
        assert (pair.context_window, pair.name, pair.target) == (100, NAME, None)
        with pytest.raises(ValueError, match="context window is 100 tokens"):
            generate(pair, [5] * 100, params())
        with pytest.raises(ValueError, match="this needs a local target model"):
            pair.local_target  # noqa: B018 (the property raises)
