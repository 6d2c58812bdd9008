"""Generation controls: top-k, min-p, repetition penalty, token log-probabilities, one tool call per answer.

The processed distribution is checked against transformers' own processors, in ``generate``'s own
order; the decoding loop with a repetition penalty against the models' own ``generate``; the reported
log-probabilities against a plain forward pass of the model that scored each token.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessageChunk, HumanMessage
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, RepetitionPenaltyLogitsProcessor

from langchain_specguard import ChatSpecGuard
from langchain_specguard.engine import SpecGuardParams, generate
from langchain_specguard.engine.sampling import Controls, penalise, processed_logprobs, sample, seen_rows
from langchain_specguard.engine.text import TokenBytes, token_bytes
from tests.tiny_models import BPE_CORPUS, bpe_pair, bpe_tokenizer, llama_pair, make_tokenizer
from tests.unit_tests.test_engine import PROMPTS, ids, pair
from tests.unit_tests.test_tool_calling import call_block, lookup, make_llm, scripted

# --------------------------------------------------------------------------------------------------
# the processed distribution equals transformers' processors


def _seen_mask(input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.zeros(input_ids.shape[0], vocab, dtype=torch.bool).scatter_(1, input_ids, True)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_penalty_equals_transformers_processor(penalty: float) -> None:
    torch.manual_seed(0)
    scores = torch.randn(5, 97, dtype=torch.float64) * 3
    input_ids = torch.randint(0, 97, (5, 40))
    expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, scores.clone())
    assert torch.equal(penalise(scores, _seen_mask(input_ids, 97), penalty), expected)


CONTROLS = [
    dict(top_k=5),
    dict(min_p=0.1),
    dict(top_p=0.8),
    dict(repetition_penalty=1.4),
    dict(top_k=12, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    dict(top_k=1),
]


@pytest.mark.parametrize("options", CONTROLS)
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_processed_logprobs_equal_generates_processors(options: dict[str, Any], temperature: float) -> None:
    """Same distribution as the processor list ``generate`` builds itself for these settings, in its order."""
    target = pair("llama").target
    config = GenerationConfig(do_sample=True, temperature=temperature, **{"top_k": 0, **options})
    processors = target._get_logits_processor(generation_config=config, input_ids_seq_length=40)
    assert len(processors) >= 1
    torch.manual_seed(1)
    scores = torch.randn(6, 97, dtype=torch.float64) * 4
    input_ids = torch.randint(0, 97, (6, 40))
    expected = torch.log_softmax(processors(input_ids, scores.clone()), dim=-1)
    controls = Controls(**options)
    temps = torch.full((6,), temperature, dtype=torch.float64)
    got = processed_logprobs(scores, temps, controls, _seen_mask(input_ids, 97))
    assert got.dtype == torch.float64
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert torch.allclose(got[finite], expected[finite], rtol=0, atol=1e-12)


def test_temperature_zero_rows_are_the_penalised_argmax_whatever_the_filters() -> None:
    torch.manual_seed(2)
    scores = torch.randn(4, 50, dtype=torch.float64)
    seen = _seen_mask(torch.randint(0, 50, (4, 10)), 50)
    controls = Controls(top_k=3, top_p=0.5, min_p=0.2, repetition_penalty=2.0)
    temps = torch.tensor([0.0, 0.9, 0.0, 1.3])
    logq = processed_logprobs(scores, temps, controls, seen)
    top = RepetitionPenaltyLogitsProcessor(2.0)(torch.nonzero(seen)[:, 1].reshape(4, -1), scores.clone()).argmax(-1)
    for row in (0, 2):
        assert logq[row].argmax() == top[row] and logq[row].max() == 0 and torch.isinf(logq[row]).sum() == 49
    greedy_tokens, _ = sample(scores, temps, controls, None, seen)
    assert torch.equal(greedy_tokens, top)


def test_seen_rows_match_each_rows_prefix() -> None:
    before = torch.zeros(30, dtype=torch.bool)
    before[[1, 2]] = True
    fed = torch.tensor([5, 7, 5, 9, 2])
    rows = seen_rows(before, fed)
    for j in range(5):
        expected = before.clone()
        expected[fed[: j + 1]] = True
        assert torch.equal(rows[j], expected)


def test_controls_validate() -> None:
    for bad in (dict(top_k=-1), dict(min_p=1.0), dict(min_p=-0.1), dict(repetition_penalty=0.0)):
        with pytest.raises(ValidationError):
            SpecGuardParams(**bad)
    with pytest.raises(ValidationError, match="repetition_penalty"):
        SpecGuardParams(repetition_penalty=float("inf"))
    with pytest.raises(ValidationError, match="top_logprobs"):
        SpecGuardParams(logprobs=True, top_logprobs=21)
    with pytest.raises(ValidationError, match="top_logprobs=3 needs logprobs=True"):
        SpecGuardParams(top_logprobs=3)
    params = SpecGuardParams(top_k=0, min_p=None, top_logprobs=0)
    assert Controls.of(params) == Controls() and not Controls.of(params).warpers


# --------------------------------------------------------------------------------------------------
# the decoding loop with the controls


def reference(model: torch.nn.Module, prompt: list[int], max_new: int, **options: Any) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=sorted(model.generation_config.eos_token_id or []) or None,
        pad_token_id=0,
        **options,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", ["llama", "bpe"])
@pytest.mark.parametrize("signal_source", ["target", "draft"])
def test_all_fallback_with_repetition_penalty_equals_target_greedy(kind: str, signal_source: str, cache: str) -> None:
    p = pair(kind)
    params = SpecGuardParams(
        acceptance_threshold=1.5,
        n_candidates=3,
        max_tokens=40,
        max_step_tokens=6,
        step_delimiters=["\n"],
        signal_source=signal_source,
        confidence_method="mean" if signal_source == "draft" else "ratio",  # ratio compares with the target
        repetition_penalty=1.8,
        top_k=3,  # no-ops at temperature 0
        min_p=0.3,
        cache_implementation=cache,
    )
    changed = False
    for text in PROMPTS:
        prompt = ids(p, text)
        expected = reference(p.target, prompt, 40, repetition_penalty=1.8)
        assert generate(p, prompt, params).token_ids == expected
        changed |= expected != reference(p.target, prompt, 40)
    assert changed  # the penalty is strong enough to change the output


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_all_accepted_with_repetition_penalty_equals_draft_greedy(cache: str) -> None:
    """The draft's decode loop keeps its seen-token mask on the device, step after step."""
    p = pair("qwen")
    params = SpecGuardParams(
        acceptance_threshold=-1.0,
        n_candidates=1,
        max_tokens=40,
        max_step_tokens=6,
        step_delimiters=["\n"],
        repetition_penalty=1.8,
        cache_implementation=cache,
    )
    for text in PROMPTS:
        prompt = ids(p, text)
        assert generate(p, prompt, params).token_ids == reference(p.draft, prompt, 40, repetition_penalty=1.8)


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_sampling_with_top_k_one_is_greedy(penalty: float) -> None:
    p = pair("llama")
    prompt = ids(p, PROMPTS[0])
    base = dict(max_tokens=30, max_step_tokens=5, top_k=1, temperature=0.9, repetition_penalty=penalty, seed=5)
    fallback = SpecGuardParams(acceptance_threshold=1.5, n_candidates=2, **base)
    assert generate(p, prompt, fallback).token_ids == reference(p.target, prompt, 30, repetition_penalty=penalty)
    accepted = SpecGuardParams(acceptance_threshold=-1.0, n_candidates=1, **base)
    assert generate(p, prompt, accepted).token_ids == reference(p.draft, prompt, 30, repetition_penalty=penalty)


def test_seeded_sampling_with_controls_is_reproducible_and_static_equals_dynamic() -> None:
    p = pair("llama")
    prompt = ids(p, PROMPTS[1])
    params = SpecGuardParams(
        temperature=1.1,
        top_k=20,
        min_p=0.05,
        top_p=0.95,
        repetition_penalty=1.3,
        n_candidates=3,
        max_tokens=30,
        max_step_tokens=5,
        acceptance_threshold=0.92,  # on grounding alone: the random models' sampled steps have low confidence
        decision="weighted",
        grounding_weight=1.0,
        seed=7,
    )
    first = generate(p, prompt, params)
    assert generate(p, prompt, params).token_ids == first.token_ids and len(first.token_ids) > 10
    static = generate(p, prompt, params.model_copy(update={"cache_implementation": "static"}))
    assert static.token_ids == first.token_ids
    assert {s.source for s in first.steps} == {"draft", "target"}  # both paths ran


# --------------------------------------------------------------------------------------------------
# token log-probabilities


def _model_logprobs(model: torch.nn.Module, prompt: list[int], out: list[int]) -> torch.Tensor:
    """Log-softmax rows ``[len(out), V]`` of one plain forward pass: row i is the distribution of ``out[i]``."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)[len(prompt) - 1 : len(prompt) - 1 + len(out)]


def _check_logprobs(model: torch.nn.Module, prompt: list[int], before: list[int], step: Any, top: int) -> None:
    rows = _model_logprobs(model, prompt + before, step.token_ids)
    assert step.logprobs is not None and [e.token for e in step.logprobs] == step.token_ids
    for row, entry, token in zip(rows, step.logprobs, step.token_ids, strict=True):
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-9)
        values, best = row.topk(top)
        assert [t for t, _ in entry.top] == best.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-9)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize(
    ("signal_source", "threshold", "temperature"),
    [("target", 1.5, 0.0), ("target", -1.0, 0.0), ("target", 0.917, 0.9), ("draft", -1.0, 0.0), ("draft", 0.917, 0.9)],
)
def test_logprobs_are_those_of_the_model_that_scored_each_token(
    signal_source: str, threshold: float, temperature: float, cache: str
) -> None:
    """The target's wherever a target pass scored the token; the draft's for steps it wrote and scored itself."""
    p = pair("llama")
    prompt = ids(p, PROMPTS[0])
    params = SpecGuardParams(
        acceptance_threshold=threshold,
        signal_source=signal_source,
        confidence_method="mean" if signal_source == "draft" else "ratio",  # ratio compares with the target
        temperature=temperature,
        repetition_penalty=1.2,  # reported values are the model's own, before any processing
        decision="weighted",  # on grounding alone (0.917 accepts some of these steps, not all)
        grounding_weight=1.0,
        n_candidates=2,
        max_tokens=30,
        max_step_tokens=5,
        seed=5,
        logprobs=True,
        top_logprobs=4,
        cache_implementation=cache,
    )
    result = generate(p, prompt, params)
    if 0 < threshold < 1:
        assert {s.source for s in result.steps} == {"draft", "target"}
    before: list[int] = []
    for step in result.steps:
        by_draft = signal_source == "draft" and step.accepted
        _check_logprobs(p.draft if by_draft else p.target, prompt, before, step, 4)
        assert "logprobs" not in step.to_dict()
        before += step.token_ids
    off = generate(p, prompt, params.model_copy(update={"logprobs": False, "top_logprobs": None}))
    assert off.token_ids == result.token_ids and all(s.logprobs is None for s in off.steps)


def test_token_bytes_are_exact_for_byte_level_bpe() -> None:
    tok = bpe_tokenizer()
    for text in (BPE_CORPUS, "😀", "日本", " é\n\n"):
        pieces = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(token_bytes(tok, t) for t in pieces) == text.encode("utf-8")
    emoji = tok("😀", add_special_tokens=False)["input_ids"]
    assert len(emoji) > 1 and all(tok.decode([t]) == "\ufffd" for t in emoji)  # partial characters, decoded alone
    assert token_bytes(tok, tok.convert_tokens_to_ids("<|im_end|>")) == b"<|im_end|>"


def test_token_bytes_for_byte_fallback_and_character_tokenizers() -> None:
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "▁": 257, "a": 258, "▁a": 259, "b": 260}
    inner = Tokenizer(models.BPE(vocab, [("▁", "a")], unk_token="<unk>", byte_fallback=True))
    inner.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    inner.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    sentencepiece = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>")
    pieces = sentencepiece("a é", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 3 and TokenBytes(sentencepiece).byte_fallback
    assert [token_bytes(sentencepiece, t) for t in pieces][-2:] == [b"\xc3", b"\xa9"]  # é by byte fallback
    assert b"".join(token_bytes(sentencepiece, t) for t in pieces) == b" a \xc3\xa9"  # SentencePiece's leading space
    chars = make_tokenizer()
    text = "Hi there.\n\nOk"
    assert b"".join(token_bytes(chars, t) for t in chars(text, add_special_tokens=False)["input_ids"]) == text.encode()


class Chunks(BaseCallbackHandler):
    def __init__(self) -> None:
        self.chunks: list[AIMessageChunk] = []

    def on_llm_new_token(self, token: str, *, chunk: Any = None, **kwargs: Any) -> None:
        self.chunks.append(chunk.message)


def _sum(chunks: list[Any]) -> Any:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


def test_chat_logprobs_in_openai_shape_streamed_and_invoked() -> None:
    target, draft = bpe_pair()
    llm = ChatSpecGuard(
        target_model=target,
        draft_model=draft,
        torch_dtype="float64",
        max_tokens=30,
        max_step_tokens=5,
        acceptance_threshold=0.4,
        logprobs=True,
        top_logprobs=3,
        return_step_details=True,
    )
    catcher = Chunks()
    message = llm.invoke("Café crème", config={"callbacks": [catcher]})
    content = message.response_metadata["logprobs"]["content"]
    steps = message.response_metadata["specguard"]["step_events"]
    token_ids = [t for s in steps for t in s["token_ids"]]
    assert len(content) == len(token_ids) == message.usage_metadata["output_tokens"]
    tokenizer = llm.load().tokenizer
    for entry, token in zip(content, token_ids, strict=True):
        assert set(entry) == {"token", "bytes", "logprob", "top_logprobs"}
        assert bytes(entry["bytes"]) == token_bytes(tokenizer, token)
        assert entry["token"] == bytes(entry["bytes"]).decode("utf-8", errors="replace")
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert tops == sorted(tops, reverse=True) and entry["logprob"] <= tops[0] + 1e-12
        assert all(set(t) == {"token", "bytes", "logprob"} for t in entry["top_logprobs"])
    joined = b"".join(bytes(e["bytes"]) for e in content)
    assert joined.decode("utf-8", errors="replace") == tokenizer.decode(token_ids, skip_special_tokens=False)

    streamed = _sum(list(llm.stream("Café crème")))
    assert streamed.content == message.content
    assert streamed.response_metadata["logprobs"] == message.response_metadata["logprobs"]
    assert _sum(catcher.chunks).response_metadata["logprobs"] == message.response_metadata["logprobs"]

    per_call = llm.invoke("Café crème", logprobs=False, top_logprobs=0)
    assert "logprobs" not in per_call.response_metadata and per_call.content == message.content
    plain = ChatSpecGuard(target_model=target, draft_model=draft, torch_dtype="float64", max_tokens=30)
    assert "logprobs" not in plain.invoke("Café crème").response_metadata
    asked = plain.invoke("Café crème", logprobs=True)
    assert all(e["top_logprobs"] == [] for e in asked.response_metadata["logprobs"]["content"])


def test_chat_controls_as_fields_per_call_and_bound() -> None:
    target, draft = llama_pair()
    base = dict(target_model=target, draft_model=draft, torch_dtype="float64", max_tokens=20, max_step_tokens=5)
    llm = ChatSpecGuard(**base, top_k=40, min_p=0.05, repetition_penalty=1.1)
    assert (llm.top_k, llm.min_p, llm.repetition_penalty) == (40, 0.05, 1.1)
    assert llm.invoke("Hello", top_k=20).content
    prompt = llm.render_prompt([HumanMessage("Hello")])
    expected = generate(llm.load(), prompt, llm.engine_params(min_p=0.1, repetition_penalty=1.8))
    assert llm.bind(min_p=0.1, repetition_penalty=1.8).invoke("Hello").content == expected.text
    assert expected.text != generate(llm.load(), prompt, llm.engine_params()).text  # the bound options took effect
    with pytest.raises(ValidationError, match="top_k"):
        llm.invoke("Hello", top_k=-2)
    with pytest.raises(ValidationError, match="min_p"):
        ChatSpecGuard(**base, min_p=1.5)
    with pytest.raises(ValidationError, match="repetition_penalty"):
        llm.bind(repetition_penalty=0).invoke("Hello")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['frequency_penalty'\]"):
        llm.invoke("Hello", frequency_penalty=0.5)


# --------------------------------------------------------------------------------------------------
# bind_tools(parallel_tool_calls=..., strict=...)

TWO_CALLS = call_block("lookup", {"country": "France"}) + "\n" + call_block("lookup", {"country": "Japan"})


def test_parallel_tool_calls_false_ends_the_answer_with_its_first_call() -> None:
    llm = scripted(TWO_CALLS)
    both = llm.bind_tools([lookup]).invoke("Capitals of France and Japan?")
    assert [c["args"] for c in both.tool_calls] == [{"country": "France"}, {"country": "Japan"}]
    one = llm.bind_tools([lookup], parallel_tool_calls=False, strict=True).invoke("Capitals of France and Japan?")
    assert [c["args"] for c in one.tool_calls] == [{"country": "France"}] and not one.invalid_tool_calls
    assert one.response_metadata["finish_reason"] == "tool_calls"
    assert one.usage_metadata["output_tokens"] < both.usage_metadata["output_tokens"]  # generation stopped there
    streamed = _sum(list(llm.bind_tools([lookup], parallel_tool_calls=False).stream("Capitals?")))
    assert [c["args"] for c in streamed.tool_calls] == [{"country": "France"}]
    # per call, as LangChain code passes it
    per_call = llm.invoke("Capitals?", tools=[lookup], parallel_tool_calls=False)
    assert len(per_call.tool_calls) == 1


def test_parallel_tool_calls_false_refuses_extra_calls_of_a_json_answer() -> None:
    answer = json.dumps([{"name": "lookup", "parameters": {"country": c}} for c in ("France", "Japan")])
    llm = scripted(answer, tool_call_format="json")
    both = llm.bind_tools([lookup]).invoke("Capitals?")
    assert len(both.tool_calls) == 2
    one = llm.bind_tools([lookup], parallel_tool_calls=False).invoke("Capitals?")
    assert [c["args"] for c in one.tool_calls] == [{"country": "France"}]
    assert [c["name"] for c in one.invalid_tool_calls] == ["lookup"]
    assert "parallel_tool_calls=False" in str(one.invalid_tool_calls[0]["error"])


def test_bind_tools_options_are_checked_when_bound() -> None:
    llm = make_llm()
    assert llm.bind_tools([lookup], strict=False, temperature=0.2, stop=["\n\n"]) is not None
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['strictness'\] for bind_tools"):
        llm.bind_tools([lookup], strictness=True)
    with pytest.raises(TypeError, match="parallel_tool_calls must be True, False or None"):
        llm.bind_tools([lookup], parallel_tool_calls="no")
    with pytest.raises(TypeError, match="strict must be True, False or None"):
        llm.invoke("hi", tools=[lookup], strict="yes")
    with pytest.raises(ValidationError, match="temperature"):
        llm.bind_tools([lookup], temperature=-1)


def test_token_bytes_of_a_head_row_past_the_vocabulary_is_empty() -> None:
    tok = bpe_tokenizer()
    assert token_bytes(tok, len(tok) + 3) == b""
