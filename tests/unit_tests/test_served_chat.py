"""``ChatSpecGuard(target_url=..., model=..., draft_model=...)``: a served target behind the chat model.

The server is the stand-in of tests/served_server.py (vLLM's completions dialect answered by a tiny local
model), so what the target writes is known. Steps, step events, streaming, tool calls and structured output
take the same path as with a local target; where a test needs a particular answer, the served model's text is
scripted (tests/scripted.py) and the random draft is rejected, so the server writes it. The options a served
target cannot use are refused when the model is built. The real vLLM server runs one call end to end in
tests/integration_tests/test_served.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from langchain_specguard import ChatSpecGuard, SpecGuardCallbackHandler
from langchain_specguard.engine.served import API_KEY_ENV
from langchain_specguard.tools import HERMES_MARKERS
from tests.scripted import force_script
from tests.served_server import ModelServer, peer
from tests.tiny_models import long_llama_pair

NAME = "tiny-chat"


@tool
def lookup(country: str) -> str:
    """Look up the capital of a country."""
    return {"japan": "Tokyo"}.get(country.lower(), "unknown")


class Answer(BaseModel):
    number: int
    city: str


def call_block(name: str, args: dict[str, Any]) -> str:
    return f"{HERMES_MARKERS[0]}\n{json.dumps({'name': name, 'arguments': args})}\n{HERMES_MARKERS[1]}"


def served_model(script: str | None = None) -> ModelServer:
    target, _ = long_llama_pair()
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(target)
    if script is not None:
        force_script(model, tokenizer, lambda prompt: script)
    return ModelServer(model, tokenizer, NAME, max_model_len=4096)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[ModelServer, str]]:
    stand_in = served_model()
    with peer(stand_in.handler()) as url:
        yield stand_in, url


def chat(url: str, **overrides: Any) -> ChatSpecGuard:
    _, draft = long_llama_pair()
    options: dict[str, Any] = {
        "target_url": url,
        "model": NAME,
        "draft_model": draft,
        "torch_dtype": "float64",
        "device": "cpu",
        "n_candidates": 1,
        "max_tokens": 12,
        "max_step_tokens": 6,
        "seed": 0,
        **overrides,
    }
    return ChatSpecGuard(**options)


def test_invoke_stream_and_step_events_come_from_the_served_target(server: tuple[ModelServer, str]) -> None:
    stand_in, url = server
    llm = chat(url, acceptance_threshold=2.0)  # every step rejected: the served model's own greedy text
    pair = llm.load()
    assert (pair.target, pair.served is not None, llm.model_name, pair.context_window) == (None, True, NAME, 4096)
    prompt = llm.render_prompt([HumanMessage("Hello")])
    expected = stand_in.model.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=[2, 4], pad_token_id=0
    )[0, len(prompt) :].tolist()
    handler = SpecGuardCallbackHandler()
    message = llm.invoke("Hello", config={"callbacks": [handler]})
    assert message.content == pair.tokenizer.decode(expected, skip_special_tokens=True)
    assert handler.to_records() and all(s["source"] == "target" and not s["accepted"] for s in handler.to_records())
    assert sum(s["num_tokens"] for s in handler.to_records()) == message.usage_metadata["output_tokens"]  # type: ignore[index]
    assert message.response_metadata["specguard"]["target_forwards"] == sum(
        s["target_forwards"] for s in handler.to_records()
    )
    chunks = list(llm.stream("Hello"))
    assert "".join(str(c.content) for c in chunks) == message.content


def test_a_tool_call_the_served_target_writes_arrives_whole() -> None:
    """The call spans lines: the server stops at each "\\n" (a step delimiter), the step rule sees the call is not
    over, and the server is asked for more, so the call is one step and exact."""
    answer = "Checking.\n\n" + call_block("lookup", {"country": "Japan"})
    stand_in = served_model(answer)
    with peer(stand_in.handler()) as url:
        llm = chat(url, max_tokens=120, max_tool_call_tokens=100, acceptance_threshold=0.3)
        handler = SpecGuardCallbackHandler()
        message = llm.bind_tools([lookup]).invoke("Capital of Japan?", config={"callbacks": [handler]})
    assert message.content == "Checking.\n\n"
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("lookup", {"country": "Japan"})]
    assert message.response_metadata["finish_reason"] == "tool_calls"
    calls = [s for s in handler.to_records() if s["kind"] == "tool_call"]
    assert len(calls) == 1 and calls[0]["source"] == "target" and calls[0]["target_forwards"] > 2
    writes = [body for body in stand_in.completion_requests() if not body.get("echo")]
    assert any("</tool_call>" in body["stop"] for body in writes)


def test_structured_output_through_the_served_target() -> None:
    stand_in = served_model(call_block("Answer", {"number": 7, "city": "Oslo"}))
    with peer(stand_in.handler()) as url:
        llm = chat(url, max_tokens=80, max_tool_call_tokens=80)
        out = llm.with_structured_output(Answer, include_raw=True).invoke("A number and a city?")
    assert out["parsed"] == Answer(number=7, city="Oslo") and out["parsing_error"] is None


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"temperature": 0.7}, r"temperature=0\.7 is not supported with a served target"),
        ({"decision": "both"}, "reads the target's attention grounding"),
        ({"draft_model": None}, "needs a local draft_model"),
        ({"draft_layers": 2, "draft_model": None}, r"\['draft_layers'\] apply to a local target"),
        ({"pair": "qwen2.5-coder", "draft_model": None, "model": None}, r"\['pair'\] apply to a local target"),
        ({"model_kwargs": {"revision": "x"}}, r"\['model_kwargs'\] apply to a local target"),
        ({"target_url": "127.0.0.1:8000"}, "must be http"),
        ({"target_url": "http://user:key@host/v1"}, "no user, password"),
        ({"target_server_options": {"retries": -1}}, r"target_server_options\['retries'\]: Input should be greater"),
        ({"target_server_options": {"retrys": 1}}, r"target_server_options\['retrys'\]: Extra inputs are not"),
        ({"target_server_options": {"url": "http://x/v1"}}, r"cannot set \['url'\]"),
        ({"target_url": None, "target_server_options": {"retries": 1}}, "set target_url as well"),
        ({"api_key": "sk-123"}, f"read from an environment variable \\({API_KEY_ENV}"),
    ],
)
def test_what_a_served_target_cannot_use_is_refused_when_the_model_is_built(
    options: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        chat("http://127.0.0.1:9/v1", **options)


def test_a_server_that_is_not_there_is_named_at_the_first_call() -> None:
    from langchain_specguard.engine.served import ServedConnectionError
    from tests.served_server import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    llm = chat(url, target_server_options={"retries": 0})  # built without asking the server
    with pytest.raises(ServedConnectionError, match=f"served target {url}: cannot connect"):
        llm.invoke("Hello")


def test_max_retries_waits_for_a_served_target_that_is_still_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Origin: issue 29 item 9 (``max_retries`` was accepted and unused). A served target that is not up yet when the
    first call loads (a server started beside the app, still loading its weights) refuses the connection; with
    ``max_retries`` the load is tried again, and the call goes through once the server answers. The server here
    starts right after the first refusal."""
    import threading
    from http.server import ThreadingHTTPServer

    from langchain_specguard import pairs
    from langchain_specguard.engine.served import ServedConnectionError
    from tests.served_server import free_port

    monkeypatch.setattr(pairs, "RETRY_DELAYS", (0.0, 0.0), raising=False)
    port = free_port()
    stand_in = served_model()
    servers: list[ThreadingHTTPServer] = []
    real = pairs.load_served_pair

    def load_served_pair(*args: Any, **kwargs: Any) -> Any:
        try:
            return real(*args, **kwargs)
        except ServedConnectionError:
            if not servers:  # the server comes up after the first refusal
                servers.append(ThreadingHTTPServer(("127.0.0.1", port), stand_in.handler()))
                threading.Thread(target=servers[0].serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            raise

    monkeypatch.setattr(pairs, "load_served_pair", load_served_pair)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        with pytest.raises(ServedConnectionError, match="cannot connect"):
            chat(url, target_server_options={"retries": 0}).invoke("Hello")  # max_retries=0: the refusal is raised
        assert servers  # and the server is up now, for a fresh model that asks again
        servers[0].shutdown()
        servers[0].server_close()
        servers.clear()
        llm = chat(url, target_server_options={"retries": 0}, max_retries=2)
        assert llm.invoke("Hello").content is not None
        assert len(servers) == 1 and stand_in.completion_requests
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
