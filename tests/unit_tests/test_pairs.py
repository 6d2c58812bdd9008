"""Where a pair comes from (``pairs.PairSource``) and how instances share it (``pairs.PairHandle``): the loading
options are checked before anything loads, the profile says what is known of the target without loading it, the
caller's objects are used as they are, and copies hold the shared pair as constructed instances do."""

from __future__ import annotations

import copy
import gc
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from langchain_core.messages import HumanMessage
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, pipeline

from langchain_specguard import ChatSpecGuard, pairs
from tests.tiny_models import CHATML, llama_pair

# --------------------------------------------------------------------------------------------------
# one option, one spelling


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"target_model": "A", "model": "B", "draft_layers": 1}, "'target_model' and 'model'"),
        ({"model": "A", "draft_layers": 1, "torch_dtype": "float32", "dtype": "float64"}, "'torch_dtype' and 'dtype'"),
        ({"stop": ["x"], "stop_sequences": ["y"]}, "'stop' and 'stop_sequences'"),
    ],
)
def test_two_spellings_of_one_option_are_refused(options: dict[str, Any], names: str) -> None:
    """Issue 25 item 8: ``ChatSpecGuard(target_model="A", model="B")`` kept B and ``dtype`` beside ``torch_dtype``
    kept one of them, silently. Both spellings at once are an error that names both."""
    with pytest.raises(ValidationError, match=f"{names} are two spellings of one option: give one"):
        ChatSpecGuard(**options)


def test_from_model_id_refuses_a_second_model() -> None:
    """Issue 25 item 8: ``from_model_id("A", "B", model="C")`` loaded C."""
    target, draft = llama_pair()
    for spelling in ("model", "target_model"):
        with pytest.raises(ValueError, match=rf"from_model_id names the target model already .*drop \['{spelling}'\]"):
            ChatSpecGuard.from_model_id(target, draft, **{spelling: draft})
    assert ChatSpecGuard.from_model_id(target, draft).model_name == target


# --------------------------------------------------------------------------------------------------
# options that cannot apply are refused


def test_a_dtype_that_a_model_object_does_not_have_is_refused() -> None:
    """Issue 25 item 13: ``torch_dtype`` beside a model object of another dtype was ignored (the object is used as
    it is, never converted behind the user's back)."""
    target, _ = llama_pair()
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(target)
    with pytest.raises(ValidationError, match=r"torch_dtype=float64 cannot apply to the target model object.*float32"):
        ChatSpecGuard(model=model, tokenizer=tok, draft_layers=2, torch_dtype="float64")
    same = ChatSpecGuard(model=model, tokenizer=tok, draft_layers=2, torch_dtype=torch.float32, max_tokens=3)
    assert same.invoke("Hi").content is not None  # the dtype it has is fine


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_memory": {"cpu": "1GiB"}}, "max_memory applies only with device_map"),
        ({"draft_gguf_file": "d.gguf"}, r"\['draft_gguf_file'\] apply to a draft_model"),
        ({"draft_model_kwargs": {"attn_implementation": "eager"}}, r"\['draft_model_kwargs'\] apply to a draft_model"),
        ({"draft_tokenizer": "x"}, r"\['draft_tokenizer'\] apply to a draft_model"),
    ],
)
def test_loading_options_that_cannot_apply_are_refused(options: dict[str, Any], message: str) -> None:
    """Issue 25 item 13: ``max_memory`` without ``device_map``, and the draft's own loading options with
    ``draft_layers`` (no draft model is loaded), were silently ignored."""
    target, _ = llama_pair()
    with pytest.raises(ValidationError, match=message):
        ChatSpecGuard(model=target, draft_layers=2, **options)


@pytest.mark.parametrize("option", ["draft_tokenizer", "gguf_file"])
def test_the_embedded_default_refuses_what_it_cannot_apply(option: str) -> None:
    """Issue 25 item 13: the embedded default names its own GGUF and drafts with its own layers."""
    with pytest.raises(ValidationError, match=f"'{option}'"):
        ChatSpecGuard(**{option: "x"})


def test_a_packaged_pair_refuses_a_draft_tokenizer_and_takes_the_rest() -> None:
    """Issue 25 item 13: with ``pair=``, ``model_kwargs``, ``device_map``, ``max_memory``, ``draft_tokenizer``,
    ``draft_model_kwargs`` and ``trust_remote_code`` never reached the loader. The pair shares one tokenizer, so a
    draft tokenizer is refused; the others now reach the loader (see ``PairSource._load_pair``)."""
    with pytest.raises(ValidationError, match=r"pair='qwen2.5-coder' shares one tokenizer.*tokenizer="):
        ChatSpecGuard(pair="qwen2.5-coder", draft_tokenizer="x")
    llm = ChatSpecGuard(
        pair="qwen2.5-coder",
        model_kwargs={"attn_implementation": "eager"},
        draft_model_kwargs={"attn_implementation": "sdpa"},
        device_map={"": "cpu"},
        max_memory={"cpu": "8GiB"},
        trust_remote_code=False,
    )
    captured: dict[str, Any] = {}

    def load_packaged_pair(name: str, **kwargs: Any) -> Any:
        captured.update(kwargs, name=name)
        raise RuntimeError("captured")

    import langchain_specguard.pairs as pairs

    original = pairs.load_packaged_pair
    pairs.load_packaged_pair = load_packaged_pair  # type: ignore[assignment]
    try:
        with pytest.raises(RuntimeError, match="captured"):
            llm.load()
    finally:
        pairs.load_packaged_pair = original
    assert captured["model_kwargs"] == {"attn_implementation": "eager"}
    assert captured["draft_model_kwargs"] == {"attn_implementation": "sdpa"}
    assert captured["device_map"] == {"": "cpu"} and captured["max_memory"] == {"cpu": "8GiB"}
    assert captured["trust_remote_code"] is False


def test_the_embedded_default_takes_device_map_and_model_kwargs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29 item 9 (an outside probe saw them dropped): with the embedded default, ``device_map``, ``max_memory``
    and ``model_kwargs`` reach its loader, which gives them to ``from_pretrained`` for the target (the draft is the
    target's first layers). What is passed is a copy: the instance's options stay as given."""
    options = {
        "device_map": {"": "cpu"},
        "max_memory": {"cpu": "8GiB"},
        "model_kwargs": {"attn_implementation": "eager"},
    }
    llm = ChatSpecGuard(**options, trust_remote_code=False)
    captured: dict[str, Any] = {}

    def load_embedded_pair(**kwargs: Any) -> Any:
        captured.update(kwargs)
        kwargs["max_memory"]["cpu"] = 8 * 2**30  # as accelerate converts it in place
        raise RuntimeError("captured")

    monkeypatch.setattr(pairs, "load_embedded_pair", load_embedded_pair)
    with pytest.raises(RuntimeError, match="captured"):
        llm.load()
    assert {k: captured[k] for k in options} == {**options, "max_memory": {"cpu": 8 * 2**30}}
    assert captured["draft_layers"] == pairs.EMBEDDED_DRAFT_LAYERS and captured["trust_remote_code"] is False
    assert llm.max_memory == {"cpu": "8GiB"}


def test_loading_changes_no_option_and_loads_once() -> None:
    """Origin: issue 29 item 9. accelerate converts ``max_memory``'s sizes in place (``"1GiB"`` becomes
    1073741824): given the instance's own dict, loading changed the option, hence the loading key, and the next call
    loaded the whole pair again (seen with the embedded default: its GGUF converted twice). The loaders get copies."""
    target, _ = llama_pair()
    llm = ChatSpecGuard(model=target, draft_layers=2, device_map="auto", max_memory={"cpu": "1GiB"}, max_tokens=3)
    first = llm.load()
    assert llm.max_memory == {"cpu": "1GiB"} and llm.device_map == "auto"
    assert llm.invoke("Hi").content is not None
    assert llm.load() is first  # the same pair: nothing loaded twice


@pytest.fixture
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pairs, "RETRY_DELAYS", (0.0, 0.0), raising=False)  # a name of the fix


def failing(times: int, error: Exception, then: Any) -> tuple[Any, list[int]]:
    """A loader that raises ``error`` ``times`` times, then does what ``then`` does; and its count of calls."""
    calls: list[int] = []

    def load(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) <= times:
            raise error
        return then(*args, **kwargs)

    return load, calls


@pytest.mark.usefixtures("no_waiting")
def test_max_retries_tries_a_load_that_failed_on_the_network_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Origin: issue 29 item 9: ``max_retries`` was accepted and unused. LangChain users set it for failures that may
    pass (ChatOpenAI retries a request that could not connect); here that is loading: the Hub or a served target
    unreachable, a download cut. Such a failure is tried again up to ``max_retries`` times, the models and the
    tokenizer alone alike; the last failure is raised as it was."""
    target, draft = llama_pair()
    cut = ConnectionResetError("the download was cut")
    load, calls = failing(2, cut, pairs.load_pair)
    monkeypatch.setattr(pairs, "load_pair", load)
    llm = ChatSpecGuard(model=target, draft_model=draft, tokenizer=AutoTokenizer.from_pretrained(target), max_retries=2)
    assert llm.invoke("Hi", max_tokens=3).content is not None and len(calls) == 3
    assert "loading the models failed (ConnectionResetError: the download was cut); trying again" in caplog.text

    load, calls = failing(2, cut, pairs.load_pair)
    monkeypatch.setattr(pairs, "load_pair", load)
    fewer = ChatSpecGuard(
        model=target, draft_model=draft, tokenizer=AutoTokenizer.from_pretrained(target), max_retries=1
    )
    with pytest.raises(ConnectionResetError, match="the download was cut"):
        fewer.load()
    assert len(calls) == 2
    assert fewer.load() is not None and len(calls) == 3  # a later call tries again, and it works

    tokenizer_load, calls = failing(1, TimeoutError("the Hub did not answer"), pairs.load_tokenizer)
    monkeypatch.setattr(pairs, "load_tokenizer", tokenizer_load)
    AutoTokenizer.from_pretrained(target).save_pretrained(tmp_path)  # a tokenizer no other instance loads
    counting = ChatSpecGuard(model=target, draft_model=draft, tokenizer=str(tmp_path), max_retries=1)
    assert counting.get_num_tokens("Hello") == 5 and len(calls) == 2


@pytest.mark.usefixtures("no_waiting")
@pytest.mark.parametrize(
    "error",
    [FileNotFoundError("target_model path '/x' does not exist"), PermissionError("denied"), ValueError("damaged")],
)
def test_max_retries_leaves_failures_that_would_come_again(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Issue 29 item 9: a missing or forbidden path, damaged weights or a bad option fail the same way every time:
    raised at once, whatever ``max_retries`` says."""
    target, draft = llama_pair()
    load, calls = failing(1, error, pairs.load_pair)
    monkeypatch.setattr(pairs, "load_pair", load)
    llm = ChatSpecGuard(model=target, draft_model=draft, tokenizer=AutoTokenizer.from_pretrained(target), max_retries=3)
    with pytest.raises(type(error)):
        llm.load()
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------------
# wrong types name the option


@pytest.mark.parametrize("option", ["tokenizer", "draft_tokenizer"])
def test_a_wrong_typed_tokenizer_names_the_option(option: str) -> None:
    """Issue 25 item 14: ``tokenizer=3`` or a pipeline as the tokenizer gave a raw ``TypeError`` deep in loading."""
    target, draft = llama_pair()
    pipe = pipeline("text-generation", model=target)
    for bad, kind in ((3, "int"), (pipe, "TextGenerationPipeline")):
        expected = f"{option} must be a tokenizer id, a local path or a tokenizer.*{kind}"
        with pytest.raises(ValidationError, match=expected):
            ChatSpecGuard(model=target, draft_model=draft, **{option: bad})


# --------------------------------------------------------------------------------------------------
# the profile


def config_only_model(root: Path, positions: int) -> Path:
    """A model folder with nothing but a Llama config stating ``max_position_embeddings=positions``."""
    folder = root / f"positions-{positions}"
    folder.mkdir()
    config = LlamaConfig(vocab_size=94, hidden_size=64, num_hidden_layers=2, num_attention_heads=4).to_dict()
    config["max_position_embeddings"] = positions
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("positions", [-5, 0])
def test_a_non_positive_window_is_unknown_to_the_profile(tmp_path: Path, positions: int) -> None:
    """Issue 25 item 12: ``max_position_embeddings`` of -5 or 0 reached ``profile["max_input_tokens"]``; the loader
    reads such values as unknown, and so does the profile now (of a path and of a model object)."""
    llm = ChatSpecGuard(model=str(config_only_model(tmp_path, positions)), draft_layers=1)
    assert llm.profile is not None and llm.profile.get("max_input_tokens") is None
    target, _ = llama_pair()
    model = AutoModelForCausalLM.from_pretrained(target)
    model.config.max_position_embeddings = positions
    on_object = ChatSpecGuard(model=model, tokenizer=AutoTokenizer.from_pretrained(target), draft_layers=2)
    assert on_object.profile is not None and on_object.profile.get("max_input_tokens") is None
    on_object.load()
    assert on_object.profile.get("max_input_tokens") is None  # loading learns nothing more about it


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
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run(
        [sys.executable, "-c", _PROFILE_CHILD, *names],
        env={**base, **env}, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_profile_of_an_uncached_hub_id_comes_from_its_config(tmp_path: Path) -> None:
    """Origin: issue 20, item 5: ``SummarizationMiddleware(trigger=("fraction", 0.8))`` needs ``max_input_tokens``
    at construction: for a Hub id not in the cache yet, the id's ``config.json`` is fetched (into the cache
    ``from_pretrained`` reads later)."""
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


def test_the_profile_of_a_home_relative_path_and_a_missing_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Origin: issue 20, item 5: ``~`` paths are read as the loader reads them; a path that does not exist gives no
    window (and asks no Hub)."""
    target, _ = llama_pair()
    monkeypatch.setenv("HOME", str(Path(target).parent))
    home_relative = ChatSpecGuard(model=f"~/{Path(target).name}", draft_layers=1)
    assert home_relative.profile is not None and home_relative.profile["max_input_tokens"] == 512
    missing = ChatSpecGuard(model="/no/such/model", draft_layers=1)
    assert missing.profile is not None and missing.profile["max_input_tokens"] is None


# --------------------------------------------------------------------------------------------------
# familiar constructors: from_model_id, transformers pipelines


def test_from_model_id_and_from_a_transformers_pipeline() -> None:
    """Origin: issue 20, item 4: ``ChatSpecGuard.from_model_id(target, draft)`` as ``HuggingFacePipeline.from_model_id``
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


# --------------------------------------------------------------------------------------------------
# the caller's objects are used as they are


def test_the_callers_tokenizer_and_model_are_left_alone() -> None:
    """Origin: the outside audit (issue 11), item 11: ``chat_template=`` was written into the caller's tokenizer
    (two instances sharing one tokenizer changed each other's output), and the scored layers of a caller's model
    stayed switched to the capture function."""
    target, _ = llama_pair()
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64)
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(target)
    original_template = tokenizer.chat_template
    config_before = model.config.to_dict()
    upper = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | upper }}")
    a = ChatSpecGuard(target_model=model, draft_layers=2, tokenizer=tokenizer, max_tokens=4)
    b = ChatSpecGuard(target_model=model, draft_layers=2, tokenizer=tokenizer, max_tokens=4, chat_template=upper)
    assert tokenizer.decode(b.render_prompt([HumanMessage("hi")])).count("HI") == 1
    assert tokenizer.decode(a.render_prompt([HumanMessage("hi")])).count("HI") == 0
    a.invoke("hi")
    b.invoke("hi")
    assert tokenizer.chat_template == original_template
    assert model.config.to_dict() == config_before
    assert all(m.training for m in model.modules())
    attention = model.model.layers[-1].self_attn
    assert attention.config is model.config and model.config._attn_implementation != "specguard"


# --------------------------------------------------------------------------------------------------
# copies hold the shared pair


def test_copies_hold_the_shared_pair_like_constructed_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    """Origin: the second outside audit (issue 19), item 9: ``model_copy``, ``copy.copy`` and ``copy.deepcopy`` skip
    validation, which is where an instance registers as a holder of its pair. A copy that loads after its original
    is gone must not leave the pair in the registry at count 0, a copy that loaded earlier must keep it for the next
    instance (no second load), a deep copy shares the loaded models instead of copying them, and a copy with other
    loading options gets a pair of its own."""
    loads = {"n": 0}
    real = ChatSpecGuard._load_pair

    def counting(self: ChatSpecGuard) -> Any:
        loads["n"] += 1
        return real(self)

    monkeypatch.setattr(ChatSpecGuard, "_load_pair", counting)
    target, _ = llama_pair()
    options: dict[str, Any] = {"model": target, "draft_layers": 3, "tokenizer": target}  # a key no other test uses
    original = ChatSpecGuard(**options, max_tokens=2)
    key = original._loading_key()
    late = original.model_copy()  # copied before anything loaded
    del original
    gc.collect()
    late.load()
    assert pairs._PAIRS[key].instances == 1
    del late
    gc.collect()
    assert key not in pairs._PAIRS  # freed with the copy, not left at count 0

    original = ChatSpecGuard(**options, max_tokens=2)
    early = original.model_copy(update={"max_tokens": 3})
    early.load()
    del original
    gc.collect()
    assert ChatSpecGuard(**options).load() is early.load()  # the copy kept the pair in the registry
    assert loads["n"] == 2  # once for `late`, once for `early` and the instance after it

    shallow, deep = copy.copy(early), copy.deepcopy(early)
    assert shallow.load() is deep.load() is early.load() and loads["n"] == 2  # shared, not copied
    assert deep.invoke("hi").content == early.invoke("hi").content
    assert pairs._PAIRS[key].instances == 3
    other = early.model_copy(update={"torch_dtype": "float64"})  # other loading options: a pair of its own
    assert other.load() is not early.load() and other.load().target.dtype == torch.float64
    assert pairs._PAIRS[key].instances == 3
    del early, shallow, deep, other
    gc.collect()
    assert key not in pairs._PAIRS
