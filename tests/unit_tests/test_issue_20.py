"""What LangChain users reach for next (issue 20), each tried as a user would write it, on tiny pairs.

Where a specific answer is needed the text is scripted (:mod:`tests.scripted`); everything downstream of the
logits, LangChain's agent loop included, is the real code.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, HumanMessage
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from langchain_specguard import ChatSpecGuard
from tests.tiny_models import llama_pair
from tests.unit_tests.test_controls import _scripted as scripted  # a pair of its own, draft and target scripted
from tests.unit_tests.test_tool_calling import call_block, lookup


class Answer(BaseModel):
    """A number and a city."""

    number: int
    city: str


# 1. create_agent with response_format


def test_20_1_create_agent_with_response_format_runs_end_to_end() -> None:
    """Issue 20 item 1: ``create_agent(llm, tools, response_format=Schema)`` picks its strategy from the profile;
    the profile claimed native structured output, so the agent passed ``response_format`` to ``bind_tools``,
    which has none (TypeError). The profile now says structured output goes through tool calling, and the agent
    answers with the schema's own tool, validated into ``structured_response``."""
    from langchain.agents import create_agent

    llm = scripted(call_block("Answer", {"number": 51, "city": "Paris"}))
    assert llm.profile is not None and not llm.profile["structured_output"] and llm.profile["tool_calling"]
    agent = create_agent(llm, tools=[lookup], response_format=Answer)
    state = agent.invoke({"messages": [HumanMessage("A number and a city?")]})
    assert state["structured_response"] == Answer(number=51, city="Paris")
    assert isinstance(state["messages"][1], AIMessage) and state["messages"][1].tool_calls[0]["name"] == "Answer"
    with pytest.raises(TypeError, match=r"response_format.*ToolStrategy"):  # what a ProviderStrategy would pass
        llm.bind_tools([lookup], response_format={"type": "json_schema", "json_schema": {"name": "Answer"}})


# 8. json_mode without a schema returns a dict


@pytest.mark.parametrize("include_raw", [False, True])
def test_20_8_json_mode_without_a_schema_returns_a_dict(include_raw: bool) -> None:
    """Issue 20 item 8: ``with_structured_output(None, method="json_mode")`` was refused, while other chat
    models return the JSON object the model wrote, as a dict."""
    llm = scripted('{"city": "Oslo", "number": 7}')
    out: Any = llm.with_structured_output(None, method="json_mode", include_raw=include_raw).invoke("JSON please.")
    parsed = out["parsed"] if include_raw else out
    assert parsed == {"city": "Oslo", "number": 7}
    assert list(llm.with_structured_output(None, method="json_mode").stream("JSON please.")) == [parsed]
    prose = scripted("Oslo, 7.")
    with pytest.raises(OutputParserException, match="not a JSON object"):
        prose.with_structured_output(None, method="json_mode").invoke("JSON please.")
    with pytest.raises(ValueError, match="needs a schema"):
        prose.with_structured_output(None)  # function calling needs the schema's tool


# 4. familiar constructors


def test_20_4_from_model_id_and_from_a_transformers_pipeline() -> None:
    """Issue 20 item 4: ``ChatSpecGuard.from_model_id(target, draft)`` as ``HuggingFacePipeline.from_model_id``
    users write it, and a transformers ``Pipeline`` as the target (its model and tokenizer) or the draft."""
    target, draft = llama_pair()
    options: dict[str, Any] = {"max_tokens": 8, "torch_dtype": "float64", "seed": 0}
    by_id = ChatSpecGuard.from_model_id(target, draft, **options)
    assert (by_id.target_model, by_id.draft_model) == (target, draft)
    assert (
        by_id.invoke("Hello").content
        == ChatSpecGuard(model=target, draft_model=draft, **options).invoke("Hello").content
    )
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64)
    pipe = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(target))
    from_pipe = ChatSpecGuard(model=pipe, draft_layers=2, **options)
    assert from_pipe.target_model is model and from_pipe.tokenizer is pipe.tokenizer
    plain = ChatSpecGuard(model=model, tokenizer=pipe.tokenizer, draft_layers=2, **options)
    assert from_pipe.invoke("Hello").content == plain.invoke("Hello").content
    draft_pipe = pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float64),
                          tokenizer=AutoTokenizer.from_pretrained(draft))  # fmt: skip
    drafted = ChatSpecGuard.from_model_id(target, **options, draft_model=draft_pipe)  # of the dtype asked for
    assert isinstance(drafted.draft_model, torch.nn.Module) and drafted.invoke("Hello").content


# 5. the profile of a Hub id that is not cached yet


class _HubMirror:
    """A local stand-in for the Hub that serves one repository's ``config.json`` (the resolve endpoint, as
    huggingface_hub asks it: HEAD for the commit and ETag, then GET) and counts what was asked."""

    def __init__(self, repo: str, config: bytes) -> None:
        import http.server
        import threading

        mirror = self
        self.requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: bool) -> None:
                mirror.requests.append(f"{self.command} {self.path}")
                if self.path.split("?")[0] != f"/{repo}/resolve/main/config.json":
                    self.send_response(404 if self.path != "/" else 200)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("ETag", '"config-etag"')
                self.send_header("Content-Length", str(len(config)))
                self.end_headers()
                if body:
                    self.wfile.write(config)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


_PROFILE_CHILD = """
import json, sys
from langchain.agents.middleware import SummarizationMiddleware
from langchain_specguard import ChatSpecGuard

windows = [ChatSpecGuard(model=name, draft_layers=1).profile["max_input_tokens"] for name in sys.argv[1:]]
SummarizationMiddleware(model=ChatSpecGuard(model=sys.argv[1], draft_layers=1), trigger=("fraction", 0.8))
print(json.dumps(windows))
"""


def _profile_windows(env: dict[str, str], *names: str) -> list[int | None]:
    """The profile's ``max_input_tokens`` for each name, in a fresh process (the Hub libraries read the endpoint,
    the cache and offline mode from the environment when imported, as a user sets them)."""
    import json
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run(
        [sys.executable, "-c", _PROFILE_CHILD, *names],
        env={**base, **env}, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_20_5_profile_of_an_uncached_hub_id_comes_from_its_config(tmp_path: Any) -> None:
    """``SummarizationMiddleware(trigger=("fraction", 0.8))`` needs ``max_input_tokens`` at construction: for a Hub
    id not in the cache yet, the id's ``config.json`` is fetched (into the cache ``from_pretrained`` reads later)."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=1234)
    mirror = _HubMirror("someone/uncached-model", config.to_json_string().encode())
    env = {"HF_ENDPOINT": mirror.url, "HF_HUB_CACHE": str(tmp_path), "HF_HOME": str(tmp_path / "home")}
    try:
        # a repository the Hub does not have: no window, and construction still works
        assert _profile_windows(env, "someone/uncached-model", "someone/no-such-model") == [1234, None]
        assert any(r.startswith("GET /someone/uncached-model/resolve/main/config.json") for r in mirror.requests)
        # now cached: offline, a new process still knows the window, and asks the Hub nothing
        asked = len(mirror.requests)
        assert _profile_windows({**env, "HF_HUB_OFFLINE": "1"}, "someone/uncached-model") == [1234]
        assert len(mirror.requests) == asked
    finally:
        mirror.server.shutdown()


def test_20_5_profile_of_a_home_relative_path_and_a_missing_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``~`` paths are read as the loader reads them; a path that does not exist gives no window (and asks no Hub)."""
    from pathlib import Path

    target, _ = llama_pair()
    monkeypatch.setenv("HOME", str(Path(target).parent))
    home_relative = ChatSpecGuard(model=f"~/{Path(target).name}", draft_layers=1)
    assert home_relative.profile is not None and home_relative.profile["max_input_tokens"] == 512
    missing = ChatSpecGuard(model="/no/such/model", draft_layers=1)
    assert missing.profile is not None and missing.profile["max_input_tokens"] is None
