"""The served-target client (engine/served.py) against local stand-in peers: what it sends, how it fails.

The peers are real sockets on 127.0.0.1: a port nobody listens on, a listener that accepts and never
answers, an HTTP server that answers an error status. The real server (vLLM) is exercised in
tests/integration_tests/test_served.py; these cases need none and run in a second.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from langchain_specguard.engine.accept import accept
from langchain_specguard.engine.served import (
    API_KEY_ENV,
    ServedConnectionError,
    ServedHTTPError,
    ServedProtocolError,
    ServedTarget,
    ServedTimeoutError,
)
from langchain_specguard.engine.signals import confidence_score
from tests.served_server import JSONHandler, free_port, peer

SECRET = "sk-test-0123456789-do-not-show"


class Recorder(JSONHandler):
    """Answers every POST with the status and body the test set, recording what it was sent."""

    status = 500
    body: dict = {"error": {"message": "engine core died", "type": "InternalServerError"}}  # noqa: RUF012
    seen: list[tuple[str, dict, dict]] = []  # noqa: RUF012

    def do_POST(self) -> None:  # noqa: N802 (http.server names it)
        length = int(self.headers.get("content-length", 0))
        self.seen.append((self.path, dict(self.headers), json.loads(self.rfile.read(length) or b"{}")))
        self.reply(self.status, self.body)


@pytest.fixture
def http_stub() -> Iterator[Callable[[int, dict], tuple[str, list]]]:
    with contextlib.ExitStack() as stack:

        def start(status: int, body: dict) -> tuple[str, list]:
            handler = type("Handler", (Recorder,), {"status": status, "body": body, "seen": []})
            return stack.enter_context(peer(handler)), handler.seen

        yield start


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """Accepts connections and never answers (a server wedged mid-request)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def hold() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def test_connection_refused_is_retried_a_bounded_number_of_times_then_named() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    target = ServedTarget(url, model="m", retries=2, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(ServedConnectionError, match="cannot connect") as err:
        target.judge([1, 2], [3])
    assert time.monotonic() - start < 5
    assert url in str(err.value) and "after 3 tries" in str(err.value)


def test_a_server_that_never_answers_times_out_within_the_timeout_and_is_not_retried(silent_listener: str) -> None:
    target = ServedTarget(silent_listener, model="m", timeout=1.0, retries=3)
    start = time.monotonic()
    with pytest.raises(ServedTimeoutError, match=r"no answer to /v1/completions within 1s") as err:
        target.judge([1, 2], [3])
    assert time.monotonic() - start < 3.0  # once, not four times
    assert silent_listener in str(err.value)


def test_a_calls_own_deadline_bounds_a_request_below_the_configured_timeout(silent_listener: str) -> None:
    """The step loop passes each request what is left of its call's deadline (engine/served_steps.py)."""
    target = ServedTarget(silent_listener, model="m", timeout=60.0, retries=3)
    start = time.monotonic()
    with pytest.raises(ServedTimeoutError, match=r"no answer to /v1/completions within 0\.5s"):
        target.write([1, 2], 4, timeout=0.5)
    assert time.monotonic() - start < 2.0


def test_http_500_is_retried_when_idempotent_then_reported_with_the_servers_words(http_stub: Callable) -> None:
    url, seen = http_stub(500, {"error": {"message": "engine core died"}})
    target = ServedTarget(url, model="m", retries=2, backoff=0.01)
    with pytest.raises(ServedHTTPError) as err:
        target.judge([1, 2], [3])
    assert err.value.status == 500 and len(seen) == 3 and target.round_trips == 3
    assert str(err.value) == (
        f"served target {url}: /v1/completions answered HTTP 500: engine core died (after 3 tries)"
    )
    # an unseeded sampled completion is a new draw each time: once it reached the server it is not repeated
    seen.clear()
    with pytest.raises(ServedHTTPError):
        target.write([1, 2], 4, temperature=0.7)
    assert len(seen) == 1
    seen.clear()
    with pytest.raises(ServedHTTPError):
        target.write([1, 2], 4, temperature=0.7, seed=5)  # seeded: the same request gives the same answer
    assert len(seen) == 3


def test_a_client_error_is_not_retried(http_stub: Callable) -> None:
    url, seen = http_stub(400, {"error": {"message": "This model's maximum context length is 4096 tokens"}})
    with pytest.raises(ServedHTTPError, match="HTTP 400: This model's maximum context length") as err:
        ServedTarget(url, model="m", retries=3).judge([1, 2], [3])
    assert err.value.status == 400 and len(seen) == 1


def test_the_api_key_is_sent_but_never_shown(http_stub: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, SECRET)
    url, seen = http_stub(401, {"error": {"message": "invalid api key"}})
    target = ServedTarget(url, model="m")
    with pytest.raises(ServedHTTPError) as err:
        target.judge([1], [2])
    assert seen[0][1]["Authorization"] == f"Bearer {SECRET}"
    shown = [str(err.value), repr(err.value), repr(target), repr(target.config), str(target.config.model_dump())]
    assert all(SECRET not in text for text in shown)
    assert f"api key from ${API_KEY_ENV}" in repr(target)


def test_what_judge_sends_is_ids_echo_one_logprob_and_one_new_token(http_stub: Callable) -> None:
    url, seen = http_stub(500, {})
    with pytest.raises(ServedHTTPError):
        ServedTarget(url, model="served-name", retries=0).judge([5, 6, 7], [8, 9])
    path, _, body = seen[0]
    assert path == "/v1/completions"
    assert body == {
        "model": "served-name",
        "prompt": [5, 6, 7, 8, 9],
        "echo": True,
        "logprobs": 1,
        "max_tokens": 1,
        "temperature": 0.0,
        "return_tokens_as_token_ids": True,
    }


def _echo(tokens: list[int], logprobs: list[float | None], tops: list[dict[int, float] | None]) -> dict:
    named = [{f"token_id:{i}": v for i, v in top.items()} if top is not None else None for top in tops]
    lp = {"tokens": [f"token_id:{t}" for t in tokens], "token_logprobs": logprobs, "top_logprobs": named}
    return {"choices": [{"index": 0, "text": "", "logprobs": lp, "finish_reason": "length"}]}


def test_a_judgement_feeds_the_engines_accept_and_confidence_rules(http_stub: Callable) -> None:
    """An answer in vLLM's shape (as tests/integration_tests/test_served.py gets from the real server)."""
    # committed [5, 6], proposed [7, 8, 9]: 7 is the first choice, 8 is not (11 is), 9 is; then 12
    answer = _echo(
        [5, 6, 7, 8, 9, 12],
        [None, -1.0, -0.1, -2.5, -0.2, -0.05],
        [None, {6: -1.0}, {7: -0.1}, {8: -2.5, 11: -0.3}, {9: -0.2}, {12: -0.05}],
    )
    url, _ = http_stub(200, answer)
    judged = ServedTarget(url, model="m").judge([5, 6], [7, 8, 9])
    assert judged.choices.tolist() == [7, 11, 9, 12]
    assert judged.logp.tolist() == [-0.1, -2.5, -0.2] and judged.top_logp.tolist() == [-0.1, -0.3, -0.2]
    assert judged.accepted() == accept(torch.tensor([[7, 8, 9]]), [3], [4], choices=judged.choices[None])[0]
    assert judged.accepted() == (1, 11)  # 7 is the target's choice, 8 is not: the target writes 11 there
    assert judged.accepted() == (1, 11)  # kept 7, the target writes 11 where the draft had 8
    assert judged.accepted(passed=torch.tensor([True, True, True])) == (3, 12)  # all passed: the next token
    # a verification's step is followed by the next step, not by this token (as the local engine's pass)
    assert judged.accepted(passed=torch.tensor([True, True, True]), bonus=False) == (3, None)
    assert judged.accepted(bonus=False) == (1, 11)
    assert confidence_score(judged.ratio_scores(), "ratio") == pytest.approx(torch.tensor(-2.2).exp().item())


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ({"choices": [{"text": "x", "logprobs": None}]}, "returned no log-probabilities"),
        (_echo([5, 6, 7], [None, -1.0, -0.5], [None, {6: -1.0}, {7: -0.5}]), "returned 3 log-probabilities where 4"),
        (_echo([5, 9, 7, 8], [None, -1.0, -0.5, -0.1], [None, {}, {}, {}]), "echoed token 9 at position 1 where 6"),
        (_echo([5, 6, 7, 8], [None, -1.0, None, -0.1], [None, {}, {}, {}]), "no log-probability for the token at"),
        (  # token text instead of ids: ambiguous, refused
            {
                "choices": [
                    {"logprobs": {"tokens": list("abcd"), "token_logprobs": [None] * 4, "top_logprobs": [None] * 4}}
                ]
            },
            "named a token 'a', not 'token_id:N'",
        ),
        ({"choices": []}, "without exactly one choice"),
    ],
)
def test_an_answer_without_the_asked_for_log_probabilities_is_refused(
    http_stub: Callable, answer: dict, problem: str
) -> None:
    url, _ = http_stub(200, answer)
    with pytest.raises(ServedProtocolError, match=problem) as err:
        ServedTarget(url, model="m").judge([5, 6], [7])
    assert url in str(err.value)


def test_bad_input_is_refused_before_any_request() -> None:
    with pytest.raises(ValueError, match="no user, password, query"):
        ServedTarget("http://user:key@127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="must be http"):
        ServedTarget("127.0.0.1:8000")
    target = ServedTarget(f"http://127.0.0.1:{free_port()}/v1", model="m", retries=0)
    with pytest.raises(ValueError, match="at least one committed token"):
        target.judge([], [1])
    with pytest.raises(ValueError, match="negative"):
        target.judge([1], [-3])
    with pytest.raises(ValueError, match="max_tokens"):
        target.write([1], 0)


def test_the_sglang_dialect_reads_its_native_answer(http_stub: Callable) -> None:
    """SGLang's /generate (api="sglang"), answered in the shape SGLang 0.5.23's source builds
    (scheduler_components/logprob_result_processor.py: the entry at logprob_start_len has no log-probability,
    then one (logprob, id, text) triple a token). Not run against an SGLang server here (docs/served.md)."""
    meta = {
        "input_token_logprobs": [[None, 6, None], [-0.1, 7, None], [-2.5, 8, None]],
        "input_top_logprobs": [None, [[-0.1, 7, None]], [[-0.3, 11, None]]],
        "output_token_logprobs": [[-0.05, 12, None]],
        "output_top_logprobs": [[[-0.05, 12, None]]],
        "finish_reason": {"type": "length", "length": 1},
    }
    url, seen = http_stub(200, {"text": "", "meta_info": meta})
    target = ServedTarget(url, api="sglang")
    judged = target.judge([5, 6], [7, 8])
    path, _, body = seen[0]
    assert path == "/generate" and body["input_ids"] == [5, 6, 7, 8] and body["logprob_start_len"] == 1
    assert judged.choices.tolist() == [7, 11, 12] and judged.accepted() == (1, 11)
    assert judged.logp.tolist() == [-0.1, -2.5] and judged.top_logp.tolist() == [-0.1, -0.3]
    written = target.write([5, 6], 1)
    assert (written.tokens, written.logprobs, written.finish_reason) == ([12], [-0.05], "length")
    # scored from the wrong position: refused, not misread
    shifted = {**meta, "input_token_logprobs": [[None, 5, None], [-0.1, 6, None], [-2.5, 7, None]]}
    url, _ = http_stub(200, {"meta_info": shifted})
    with pytest.raises(ServedProtocolError, match=r"scored tokens \[5, 6, 7\] where \[6, 7, 8\] were sent"):
        ServedTarget(url, api="sglang").judge([5, 6], [7, 8])
