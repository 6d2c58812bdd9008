"""Schema-constrained decoding (engine/grammar.py): a JSON-schema grammar masks the draft's proposals and the
target's choices, and nothing else changes.

Origin: issue 29 item 2 (no native structured output: json_schema was a forced tool call). On tiny random-weight
pairs in float64: with the threshold above every score the output is the target's own greedy ``generate()`` under
the same grammar, applied as a transformers ``LogitsProcessor`` built here from llguidance itself; with every step
accepted and one greedy candidate it is the draft's; and whatever the models, the threshold or the sampling, the
output parses and validates when the schema bounds every value.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from typing import Any, Literal

import numpy as np
import pytest
import torch
from pydantic import BaseModel, Field
from transformers import LogitsProcessor, LogitsProcessorList

from langchain_specguard.engine import CallOptions, SpecGuardParams, generate, generate_steps, load_pair
from langchain_specguard.engine.grammar import JSON_FORMAT, Grammar, closed, grammar_tokenizer, library
from langchain_specguard.engine.loading import ModelPair
from tests.threads import together
from tests.tiny_models import _llama, _save, bpe_pair, gemma_pair, llama_pair, make_tokenizer, qwen_pair, tiny_dir

llguidance = pytest.importorskip("llguidance", reason="the structured extra (llguidance) is not installed")


class Person(BaseModel):
    """Every value bounded, so a random model's output ends inside the budget."""

    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user"]
    active: bool


SCHEMA = Person.model_json_schema()
PROMPTS = ["<s>Hello there, how are you?", "<s>The sum of 3 and 5 is"]
KINDS = ["llama", "qwen", "gemma", "bpe"]
"""Character-level tokenizers (llguidance reads them through the engine's token bytes) and a byte-level BPE one
(read by llguidance itself); the Gemma-3-style pair mixes sliding-window layers."""


@functools.cache
def pair(kind: str) -> ModelPair:
    target, draft = {"llama": llama_pair, "qwen": qwen_pair, "gemma": gemma_pair, "bpe": bpe_pair}[kind]()
    return load_pair(target, draft, dtype="float64", device="cpu")


@functools.cache
def rows_pair(more: str) -> ModelPair:
    """A Llama pair whose target or draft has 9 output and input rows past the tokenizer's."""
    tok = make_tokenizer()
    extra = {"target": (9, 0), "draft": (0, 9)}[more]
    target = _save(_llama(len(tok) + extra[0], 4, seed=0), tok, tiny_dir() / f"grammar-rows-{more}-target")
    draft = _save(_llama(len(tok) + extra[1], 2, seed=1), tok, tiny_dir() / f"grammar-rows-{more}-draft")
    return load_pair(target, draft, dtype="float64", device="cpu")


def ids(p: ModelPair, text: str) -> list[int]:
    return p.tokenizer(text, add_special_tokens=False)["input_ids"]


class SchemaProcessor(LogitsProcessor):
    """The schema as a transformers logits processor, written with llguidance's own API (not the engine's): a
    matcher advanced by each generated token, its bitmask unpacked with numpy, disallowed tokens at -inf."""

    def __init__(self, p: ModelPair, schema: dict[str, Any], prompt_length: int) -> None:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(closed(schema)), defaults=JSON_FORMAT)
        self.matcher = llguidance.LLMatcher(grammar_tokenizer(p.tokenizer, p.eos_token_ids), grammar)
        self.start = prompt_length
        self.consumed = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[0, self.start :].tolist()
        assert self.matcher.consume_tokens(generated[self.consumed :])
        self.consumed = len(generated)
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        width = min(len(bits), scores.shape[-1])
        allowed[:width] = torch.from_numpy(bits[:width].astype(bool)).to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))  # type: ignore[return-value]


def constrained_greedy(model: torch.nn.Module, p: ModelPair, prompt: list[int], max_new: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=sorted(p.eos_token_ids),
        pad_token_id=0,
        logits_processor=LogitsProcessorList([SchemaProcessor(p, SCHEMA, len(prompt))]),
    )
    return out[0, len(prompt) :].tolist()


def params(**options: Any) -> SpecGuardParams:
    base: dict[str, Any] = {"n_candidates": 3, "max_tokens": 120, "max_step_tokens": 6, "step_delimiters": ["\n"]}
    return SpecGuardParams(**{**base, **options})


GRAMMAR = Grammar.json_schema(SCHEMA)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", KINDS)
def test_all_fallback_equals_the_targets_constrained_greedy(kind: str, cache: str) -> None:
    p = pair(kind)
    for text in PROMPTS:
        prompt = ids(p, text)
        result = generate(p, prompt, params(acceptance_threshold=1.5, seed=0, cache_implementation=cache),
                          CallOptions(grammar=GRAMMAR))  # fmt: skip
        assert result.token_ids == constrained_greedy(p.target, p, prompt, 120)
        assert all(not s.accepted for s in result.steps)
        Person.model_validate_json(result.text)
        assert result.finish_reason == "stop"


@pytest.mark.parametrize("signal_source", ["target", "draft"])
@pytest.mark.parametrize("kind", KINDS)
def test_all_accepted_with_one_greedy_candidate_equals_the_drafts_constrained_greedy(
    kind: str, signal_source: str
) -> None:
    p = pair(kind)
    for text in PROMPTS:
        prompt = ids(p, text)
        options = {"acceptance_threshold": -1.0, "n_candidates": 1, "signal_source": signal_source}
        if signal_source == "draft":  # (the draft's own confidence: "ratio" compares with the target's choice)
            options["confidence_method"] = "mean"
        result = generate(p, prompt, params(**options), CallOptions(grammar=GRAMMAR))
        assert result.token_ids == constrained_greedy(p.draft, p, prompt, 120)
        assert all(s.accepted for s in result.steps)
        Person.model_validate_json(result.text)


@pytest.mark.parametrize("more", ["target", "draft"])
def test_pairs_whose_rows_differ_stay_exact(more: str) -> None:
    """Output rows past the tokenizer (on either model) are never allowed: the mask covers the tokenizer's tokens."""
    p = rows_pair(more)
    prompt = ids(p, PROMPTS[0])
    fallback = generate(p, prompt, params(acceptance_threshold=1.5), CallOptions(grammar=GRAMMAR))
    assert fallback.token_ids == constrained_greedy(p.target, p, prompt, 120)
    accepted = generate(p, prompt, params(acceptance_threshold=-1.0, n_candidates=1), CallOptions(grammar=GRAMMAR))
    assert accepted.token_ids == constrained_greedy(p.draft, p, prompt, 120)


@pytest.mark.parametrize("kind", ["llama", "bpe"])
@pytest.mark.parametrize("threshold", [1.5, 0.5, -1.0])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_output_validates_whatever_the_steps_and_sampling(
    kind: str, threshold: float, temperature: float
) -> None:
    """Accepted draft steps, the target's fallback tokens and speculation rounds, greedy or sampled (with top-k and
    a repetition penalty too): every output is a complete ``Person``."""
    p = pair(kind)
    seeds = range(4) if temperature else range(1)
    for text in PROMPTS:
        for seed in seeds:
            options = {"acceptance_threshold": threshold, "temperature": temperature, "seed": seed}
            if temperature:
                options |= {"top_k": 20, "repetition_penalty": 1.1}
            result = generate(p, ids(p, text), params(**options), CallOptions(grammar=GRAMMAR))
            Person.model_validate_json(result.text)
            assert result.finish_reason == "stop"


def test_any_json_object() -> None:
    p = pair("bpe")
    for seed in range(3):
        result = generate(p, ids(p, PROMPTS[0]), params(temperature=1.0, seed=seed, max_tokens=200),
                          CallOptions(grammar=Grammar.json_object()))  # fmt: skip
        if result.finish_reason == "stop":
            assert isinstance(json.loads(result.text), dict)
        else:  # an open object's keys and strings are unbounded: a random model may run out of budget in one
            assert result.text.startswith("{")


def test_constrained_and_free_calls_share_a_batch_and_each_is_what_it_is_alone() -> None:
    p = pair("llama")
    runs = [
        (ids(p, PROMPTS[0]), params(acceptance_threshold=0.5, seed=0), CallOptions(grammar=GRAMMAR)),
        (ids(p, PROMPTS[1]), params(acceptance_threshold=0.5, seed=0), CallOptions()),
        (ids(p, PROMPTS[1]), params(acceptance_threshold=0.5, temperature=0.8, seed=3), CallOptions(grammar=GRAMMAR)),
    ]
    alone = [generate(p, *run).token_ids for run in runs]

    def streamed(run: tuple[list[int], SpecGuardParams, CallOptions]) -> list[int]:
        return [t for step in generate_steps(p, *run) for t in step.token_ids]

    results = together([functools.partial(streamed, run) for run in runs])
    assert results == alone
    Person.model_validate_json(p.tokenizer.decode(results[0], skip_special_tokens=True))


def test_a_schema_the_library_cannot_compile_is_refused_naming_the_problem() -> None:
    for schema, problem in [
        ({"type": "objekt"}, "Invalid type: objekt"),
        ({"type": "string", "pattern": "(unclosed"}, "unclosed group"),
        ({"$ref": "#/$defs/Missing"}, "/$defs/Missing"),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ]:
        with pytest.raises(ValueError, match="cannot be used for constrained decoding") as error:
            Grammar.json_schema(schema)
        assert problem in str(error.value)
    with pytest.raises(TypeError, match="a JSON schema is a dict"):
        Grammar.json_schema("not a schema")  # type: ignore[arg-type]


def test_objects_are_closed_unless_the_schema_says_otherwise() -> None:
    schema = {
        "type": "object",
        "properties": {"inner": {"type": "object", "properties": {"x": {"type": "integer"}}}, "properties": {}},
        "$defs": {"D": {"type": "object", "properties": {}}},
        "anyOf": [{"properties": {"y": {}}}],
        "allOf": [{"properties": {"z": {}}}],
    }
    out = closed(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["inner"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["properties"]  # a property named "properties": no schema
    assert out["$defs"]["D"]["additionalProperties"] is False
    assert out["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in out["allOf"][0]
    assert closed({"type": "object", "additionalProperties": True}) == {"type": "object", "additionalProperties": True}
    assert "additionalProperties" not in schema  # the caller's schema is not changed


def test_a_served_target_or_an_open_think_block_is_refused_before_anything_runs() -> None:
    import dataclasses

    from langchain_specguard.engine.decoding import constrained
    from langchain_specguard.engine.served import ServedTarget

    p = pair("llama")
    with ServedTarget("http://127.0.0.1:9/v1", model="m") as served:  # (never contacted)
        remote = dataclasses.replace(p, target=None, served=served)
        with pytest.raises(ValueError, match=r"needs a local target: the target served at http://127\.0\.0\.1:9/v1"):
            constrained(remote, params(), CallOptions(grammar=GRAMMAR))
    thinking = params(reasoning_markers=("<think>", "</think>"))
    with pytest.raises(ValueError, match="opened a think block"):
        constrained(p, thinking, CallOptions(grammar=GRAMMAR, thinking=True))
    assert constrained(p, thinking, CallOptions(grammar=GRAMMAR)) is not None


def test_the_package_imports_without_llguidance_and_names_the_extra_when_a_grammar_needs_it() -> None:
    code = (
        "import sys; sys.modules['llguidance'] = None\n"
        "import langchain_specguard\n"
        "from langchain_specguard.engine.grammar import Grammar\n"
        "try:\n    Grammar.json_schema({'type': 'object'})\n"
        "except ImportError as error:\n    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'langchain-specguard[structured]'" in out
    assert library() is llguidance
