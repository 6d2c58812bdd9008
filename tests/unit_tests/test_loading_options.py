"""Loading the way Hugging Face users write it (issue 20 item 3), and packaged pairs by name (issue 18 item 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer

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
