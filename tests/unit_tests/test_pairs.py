"""Where a pair comes from (``pairs.PairSource``): the loading options are checked before anything loads, and the
profile says what is known of the target without loading it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, pipeline

from langchain_specguard import ChatSpecGuard
from tests.tiny_models import llama_pair

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
