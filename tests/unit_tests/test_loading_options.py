"""Loading the way Hugging Face users write it (issue 20 item 3), and packaged pairs by name (issue 18 item 1)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from langchain_specguard import ChatSpecGuard
from tests.tiny_models import llama_pair, mismatched_draft


def test_dtype_objects_and_the_dtype_alias_are_accepted() -> None:
    target, draft = llama_pair()
    for options in ({"torch_dtype": torch.float64}, {"dtype": torch.float64}, {"dtype": "float64"}):
        llm = ChatSpecGuard(model=target, draft_model=draft, max_tokens=4, **options)  # type: ignore[arg-type]
        pair = llm.load()
        assert pair.target.dtype == torch.float64 and pair.draft.dtype == torch.float64
        assert llm.invoke("Hello").content is not None


def test_a_misspelt_dtype_fails_at_construction() -> None:
    target, draft = llama_pair()
    with pytest.raises(ValidationError, match="torch dtype name such as 'float32' or 'bfloat16', got 'float65'"):
        ChatSpecGuard(model=target, draft_model=draft, torch_dtype="float65")


def test_model_kwargs_reach_each_models_from_pretrained() -> None:
    target, draft = llama_pair()
    llm = ChatSpecGuard(
        model=target,
        draft_model=draft,
        model_kwargs={"attn_implementation": "eager"},
        draft_model_kwargs={"attn_implementation": "sdpa"},
        max_tokens=4,
    )
    pair = llm.load()
    assert pair.target.config._attn_implementation == "eager"
    assert pair.draft.config._attn_implementation == "sdpa"
    assert llm.invoke("Hello").content is not None  # the engine's own attention runs over either


def test_model_kwargs_that_clash_with_an_option_name_it() -> None:
    target, draft = llama_pair()
    llm = ChatSpecGuard(model=target, draft_model=draft, model_kwargs={"torch_dtype": torch.float16})
    with pytest.raises(ValueError, match=r"target model_kwargs cannot set \['torch_dtype'\]: use the dedicated"):
        llm.load()
    fine = ChatSpecGuard(model=target, draft_model=draft, max_tokens=4)
    assert fine.invoke("Hello").content is not None  # nothing was left half-loaded


def test_a_separate_draft_tokenizer_is_checked_against_the_targets() -> None:
    target, draft = llama_pair()
    same = ChatSpecGuard(model=target, draft_model=draft, draft_tokenizer=AutoTokenizer.from_pretrained(draft))
    assert same.load() is not None
    other = ChatSpecGuard(model=target, draft_model=draft, draft_tokenizer=mismatched_draft())
    with pytest.raises(ValueError, match="draft and target tokenizers do not match"):
        other.load()


def test_a_packaged_pair_names_both_models() -> None:
    target, draft = llama_pair()
    with pytest.raises(ValidationError, match=r"pair='qwen2.5-coder' names both models already: drop \['target_model'"):
        ChatSpecGuard(pair="qwen2.5-coder", model=target, draft_model=draft)
    with pytest.raises(ValidationError, match="pair"):
        ChatSpecGuard(pair="qwen9")  # type: ignore[arg-type]
    llm = ChatSpecGuard(pair="qwen2.5-coder")  # nothing loads before the first call
    assert llm.model_name == "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    assert llm.draft_name == "qwen2.5-coder-0.5b-instruct.gguf"
    assert llm.profile is not None and llm.profile.get("max_input_tokens") == 32768


# --------------------------------------------------------------------------------------------------
# a repository's own code: never run unless trust_remote_code=True, never asked about on stdin

REMOTE_CODE = """import os, pathlib
pathlib.Path(os.environ["SPECGUARD_MARKER"]).write_text("the repository's code ran")
from transformers import PretrainedConfig


class RemoteConfig(PretrainedConfig):
    model_type = "specguard-remote"
"""

CONSTRUCT_AND_LOAD = """
import sys, time
from langchain_specguard import ChatSpecGuard
from langchain_specguard.engine import load_packaged_pair

if sys.argv[1] == "chat":
    start = time.monotonic()
    llm = ChatSpecGuard(model=sys.argv[2], draft_layers=1)
    print("CONSTRUCTED", round(time.monotonic() - start, 2), llm.profile.get("max_input_tokens"), flush=True)
    load = llm.load
else:
    def load():
        return load_packaged_pair("qwen2.5-coder", tokenizer=sys.argv[2])
try:
    load()
except Exception as exc:
    print("REFUSED", type(exc).__name__, str(exc).replace(chr(10), " ")[:1000], flush=True)
"""


def remote_code_repo(root: Path) -> Path:
    """A local model folder whose config and tokenizer name custom code (``auto_map``) that leaves a marker file
    when imported."""
    folder = root / "remote-code-model"
    folder.mkdir()
    auto_map = {"AutoConfig": "configuration_remote.RemoteConfig", "AutoTokenizer": ["tokenization_remote.Tok", None]}
    config = {"model_type": "specguard-remote", "auto_map": auto_map, "max_position_embeddings": 128}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto_map, "tokenizer_class": "Tok"}))
    (folder / "configuration_remote.py").write_text(REMOTE_CODE)
    (folder / "tokenization_remote.py").write_text(REMOTE_CODE)
    return folder


def run_isolated(args: list[str], tmp_path: Path, stdin: str | None) -> tuple[str, float]:
    """Run ``CONSTRUCT_AND_LOAD`` in a fresh process; ``stdin`` is written and closed, or (None) left open and silent
    (a terminal nobody answers). Returns the output and the seconds it ran."""
    env = {**os.environ, "SPECGUARD_MARKER": str(tmp_path / "marker"), "SPECGUARD_CACHE": str(tmp_path / "cache")}
    env["HF_HOME"] = str(tmp_path / "hf")
    out = tmp_path / "out.txt"
    start = time.monotonic()
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-c", CONSTRUCT_AND_LOAD, *args],
            stdin=subprocess.PIPE,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            cwd=Path(__file__).parents[2],
        )
        assert proc.stdin is not None
        if stdin is not None:
            proc.stdin.write(stdin)
            proc.stdin.close()
        try:
            proc.wait(timeout=240)
        finally:
            proc.kill()
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
    return out.read_text(), time.monotonic() - start


@pytest.mark.parametrize("stdin", ["y\n", None], ids=["yes-on-stdin", "silent-open-stdin"])
def test_construction_never_runs_or_asks_about_a_repositorys_code(tmp_path: Path, stdin: str | None) -> None:
    """Issue 25 item 1: the profile lookup at construction went through ``AutoConfig.from_pretrained`` without
    ``trust_remote_code``, so transformers asked on stdin: with "y" the repository's configuration code ran at
    construction, and with an open stdin nobody answered construction blocked (15 s here, forever on a terminal).
    Now the config is read as data: no prompt, no code, and the window it states is still in the profile."""
    folder = remote_code_repo(tmp_path)
    output, _ = run_isolated(["chat", str(folder)], tmp_path, stdin)
    assert not (tmp_path / "marker").exists(), output
    assert "Do you wish to run the custom code" not in output
    constructed = next(line for line in output.splitlines() if line.startswith("CONSTRUCTED"))
    seconds, window = constructed.split()[1:]
    assert float(seconds) < 10 and window == "128", output  # the construction itself, not the interpreter's start
    # and the load refuses the code, naming the option (trust_remote_code=False is the default)
    assert "REFUSED ValueError" in output and "trust_remote_code=True" in output, output


def test_a_packaged_pairs_tokenizer_path_is_loaded_without_running_its_code(tmp_path: Path) -> None:
    """Issue 25 item 1, everything that reads a model's files: ``pair=..., tokenizer=<path>`` loaded that path with
    ``AutoTokenizer.from_pretrained`` and no ``trust_remote_code`` (and only after assembling both GGUFs)."""
    folder = remote_code_repo(tmp_path)
    output, _ = run_isolated(["packaged", str(folder)], tmp_path, "y\n")
    assert not (tmp_path / "marker").exists(), output
    assert "Do you wish to run the custom code" not in output
    assert "REFUSED ValueError" in output and "trust_remote_code" in output, output
    assert not list((tmp_path / "cache").rglob("*.gguf"))  # refused before anything was assembled


# --------------------------------------------------------------------------------------------------
# Hub options: a model cached in a cache_dir of its own, offline


def hub_cache(root: Path) -> Path:
    """A Hugging Face cache holding the tiny pair as ``specguard/tiny-target`` and ``specguard/tiny-draft`` (the
    layout ``hf_hub_download`` writes), and nothing else: only a load that reads this ``cache_dir`` finds them."""
    cache = root / "hub-cache"
    target, draft = llama_pair()
    for repo, source in (("specguard/tiny-target", target), ("specguard/tiny-draft", draft)):
        folder = cache / ("models--" + repo.replace("/", "--"))
        shutil.copytree(source, folder / "snapshots" / ("0" * 40))
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
    return cache


def test_local_files_only_in_model_kwargs_loads_a_hub_id(tmp_path: Path) -> None:
    """Issue 25 item 2: ``model_kwargs={"local_files_only": True}`` (a ``HuggingFacePipeline.from_model_id`` habit)
    crashed every Hub-id load with "got multiple values for keyword argument 'local_files_only'"."""
    cache = str(hub_cache(tmp_path))
    options = {"cache_dir": cache, "local_files_only": True}
    llm = ChatSpecGuard(
        model="specguard/tiny-target",
        draft_model="specguard/tiny-draft",
        model_kwargs=options,
        draft_model_kwargs=options,
        max_tokens=4,
    )
    assert llm.invoke("Hello").content is not None


def test_hub_options_reach_the_tokenizer_and_the_profile(tmp_path: Path) -> None:
    """Issue 25 item 3: ``model_kwargs`` reached only the model's ``from_pretrained``: a model cached only in a
    ``cache_dir`` of its own failed offline at the tokenizer, and its profile was empty. ``cache_dir``,
    ``revision``, ``subfolder``, ``token`` and ``local_files_only`` now reach the tokenizer's load and the profile's
    config lookup too (the draft's from ``draft_model_kwargs``)."""
    cache = str(hub_cache(tmp_path))
    llm = ChatSpecGuard(
        model="specguard/tiny-target",
        draft_model="specguard/tiny-draft",
        model_kwargs={"cache_dir": cache},
        draft_model_kwargs={"cache_dir": cache},
        max_tokens=4,
    )
    assert llm.profile is not None and llm.profile.get("max_input_tokens") == 512  # known before loading
    assert llm.invoke("Hello").content is not None


# --------------------------------------------------------------------------------------------------
# only causal LMs, drafts checked against the target's vocabulary


def test_models_that_are_not_causal_lms_are_refused() -> None:
    """Issue 25 item 4: a masked LM or a sequence-classification model as the target (an object, or through a
    text-classification pipeline) crashed deep inside; a 3-label token-classification model as the draft *ran*,
    its 3 logits read as token ids, and the answer was empty. The head, the task and the output width are checked."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        LlamaForSequenceClassification,
        LlamaForTokenClassification,
    )

    target, _ = llama_pair()
    tok = AutoTokenizer.from_pretrained(target)
    llama = AutoModelForCausalLM.from_pretrained(target).config
    masked = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64))  # fmt: skip
    classifier = LlamaForSequenceClassification(llama)
    with pytest.raises(ValidationError, match=r"target_model must be a causal language model.*BertForMaskedLM"):
        ChatSpecGuard(model=masked, tokenizer=tok, draft_layers=1)
    with pytest.raises(ValidationError, match=r"target_model must be a causal language model.*SequenceClassification"):
        ChatSpecGuard(model=classifier, tokenizer=tok, draft_layers=1)
    classify = pipeline("text-classification", model=classifier, tokenizer=tok)
    with pytest.raises(ValidationError, match=r"a 'text-classification' pipeline.*needs a 'text-generation' pipeline"):
        ChatSpecGuard(model=classify, draft_layers=1)
    llama.num_labels = 3
    tagger = LlamaForTokenClassification(llama)
    with pytest.raises(ValidationError, match=r"draft_model must be a causal language model.*TokenClassification"):
        ChatSpecGuard(model=target, draft_model=tagger)


def test_a_narrow_lm_head_is_refused() -> None:
    """Issue 25 item 4, the output width: a causal LM whose head scores fewer tokens than the vocabulary (its
    logits would be read as ids of the first few tokens)."""
    target, _ = llama_pair()
    config = AutoModelForCausalLM.from_pretrained(target).config
    config.vocab_size = 3
    narrow = AutoModelForCausalLM.from_config(config)
    llm = ChatSpecGuard(model=narrow, tokenizer=AutoTokenizer.from_pretrained(target), draft_layers=1)
    with pytest.raises(ValueError, match=r"the target's head scores 3 tokens, but the tokenizer has 94"):
        llm.load()


def test_a_draft_object_is_checked_against_the_targets_vocabulary() -> None:
    """Issue 25 item 9: a draft given as a path was refused when its tokenizer differed, but given as a
    text-generation pipeline (whose own tokenizer was dropped) or as a model object (whose folder holds another
    tokenizer) it was accepted, and its ids then meant other tokens."""
    target, _ = llama_pair()
    other = mismatched_draft()
    as_object = AutoModelForCausalLM.from_pretrained(other)
    with pytest.raises(ValueError, match="draft and target tokenizers do not match"):
        ChatSpecGuard(model=target, draft_model=as_object).load()
    as_pipeline = pipeline("text-generation", model=other)
    with pytest.raises(ValueError, match="draft and target tokenizers do not match"):
        ChatSpecGuard(model=target, draft_model=as_pipeline).load()
    _, draft = llama_pair()
    fine = ChatSpecGuard(model=target, draft_model=pipeline("text-generation", model=draft), max_tokens=3)
    assert fine.invoke("Hi").content is not None


# --------------------------------------------------------------------------------------------------
# a Hub endpoint that answers badly never holds up construction


class BadHub(http.server.BaseHTTPRequestHandler):
    """An endpoint whose root answers (so a reachability probe passes) but whose files never answer, or fail."""

    mode = "hang"
    release = threading.Event()

    def do_HEAD(self) -> None:
        self.answer(200)

    def do_GET(self) -> None:
        if self.path in ("", "/"):
            self.answer(200)
        elif self.mode == "500":
            self.answer(500)
        else:
            self.release.wait(600)  # a file request that is never answered (until the test ends)

    def answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("mode", ["hang", "500"])
def test_construction_does_not_wait_on_a_hub_that_answers_badly(tmp_path: Path, mode: str) -> None:
    """Issue 25 item 7: with an endpoint whose root answers but whose file requests never do, construction blocked
    for more than 15 minutes; with one that answers HTTP 500 it took 23 s (huggingface_hub's retries). The profile's
    config fetch is one request with a bounded timeout and no retries: construction gives up within seconds, with
    the window unknown until the model loads."""
    handler = type("Handler", (BadHub,), {"mode": mode, "release": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = (
        "import time\nfrom langchain_specguard import ChatSpecGuard\nstart = time.monotonic()\n"
        "llm = ChatSpecGuard(model='specguard/not-cached', draft_layers=1)\n"
        "print('CONSTRUCTED', round(time.monotonic() - start, 2), llm.profile.get('max_input_tokens'))\n"
    )
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HOME": str(tmp_path)}
    env.pop("HF_HUB_OFFLINE", None)
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
            cwd=Path(__file__).parents[2],
        )  # fmt: skip
    finally:
        handler.release.set()
        server.shutdown()
    line = next((x for x in done.stdout.splitlines() if x.startswith("CONSTRUCTED")), None)
    assert line is not None, done.stdout + done.stderr
    seconds, window = line.split()[1:]
    assert float(seconds) < 12 and window == "None", line


# --------------------------------------------------------------------------------------------------
# long loading steps say what they are doing


def test_a_long_loading_step_says_what_it_does(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 29 item 7: assembling and converting the embedded model printed nothing for a minute and more. A step
    that runs past a few seconds says so on stderr, and how long it took; a quick one says nothing."""
    from langchain_specguard.engine import loading

    monkeypatch.setattr(loading, "PROGRESS_AFTER", 0.05)
    with loading.progress("a quick step"):
        pass
    with loading.progress("a long step"):
        time.sleep(0.5)
    err = capsys.readouterr().err
    assert "quick" not in err
    assert "langchain-specguard: a long step..." in err and "langchain-specguard: a long step: done in" in err
    assert err.index("a long step...") < err.index("a long step: done in")

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # what quiet programs do: the steps say nothing either
    try:
        with loading.progress("a quiet step"):
            time.sleep(0.2)
    finally:
        hf_logging.enable_progress_bar()  # as it was: the first half of this test needs it on
    assert "quiet" not in capsys.readouterr().err
