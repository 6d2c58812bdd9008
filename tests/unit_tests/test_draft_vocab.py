"""The draft's subset LM head (``engine/draft_vocab.py``, FR-Spec): which tokens it covers, when it is on, and
that it never changes what the target writes.

Added with the CPU work of issue 30: on a CPU a large vocabulary's head is most of a small draft's cost, so the
draft proposes among the most frequent tokens while the target checks every token with its whole vocabulary.
Float64 keeps near-ties in random logits from flipping greedy choices between batch shapes.
"""

from __future__ import annotations

import functools

import pytest
import torch

from langchain_specguard.engine import SpecGuardParams, generate, load_pair
from langchain_specguard.engine.draft_vocab import draft_head_size, frequent_ids
from langchain_specguard.engine.loading import ModelPair
from langchain_specguard.engine.runner import Columns
from langchain_specguard.engine.runtimes import RuntimePool
from langchain_specguard.engine.view import int8_available
from tests.tiny_models import bpe_pair, bpe_tokenizer

PROMPTS = ["<s>The sum of 3 and 5 is", "<s>Café crème, naïve façade, über"]


@functools.cache
def pair() -> ModelPair:
    target, draft = bpe_pair()
    return load_pair(target, draft, dtype="float64", device="cpu")


def ids(p: ModelPair, text: str) -> list[int]:
    return p.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_subset_is_the_lowest_merged_tokens_the_first_characters_and_the_specials() -> None:
    tok = bpe_tokenizer()
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    chosen = frequent_ids(tok, 40, len(tok), always=[2]).tolist()
    assert chosen == sorted(set(chosen))
    multi = [i for i in chosen if len(pieces[i]) > 1]
    merged = [i for i, p in enumerate(pieces) if len(p) > 1]
    assert set(merged[:40]) <= set(chosen)  # the first 40 multi-character tokens by id...
    assert set(tok.all_special_ids) <= set(chosen)  # ...the special tokens (some multi-character)...
    assert len(multi) == len(set(merged[:40]) | {i for i in tok.all_special_ids if len(pieces[i]) > 1})
    assert {i for i, p in enumerate(pieces) if len(p) == 1} <= set(chosen)  # ...and every byte (256 or fewer)
    assert max(frequent_ids(tok, 40, 100).tolist()) < 100  # never a column the draft may not propose


def test_the_whole_head_unless_a_subset_is_asked_for() -> None:
    """The default chosen in issue 30: the subset head is opt-in on every device (pinned here). It was the CPU
    default for a while and broke what reads a draft's logits by token id (scripted test models)."""
    params = SpecGuardParams()
    assert params.draft_vocab is None
    assert draft_head_size(params, 262144) == 0  # (no device argument: the same choice on every device)
    assert draft_head_size(params.model_copy(update={"draft_vocab": 1000}), 262144) == 1000  # asked for
    assert draft_head_size(params.model_copy(update={"draft_vocab": 32768}), 151665) == 32768
    assert draft_head_size(params.model_copy(update={"draft_vocab": 10**6}), 262144) == 0  # all of it
    scored_by_draft = SpecGuardParams(signal_source="draft", confidence_method="mean")
    assert draft_head_size(scored_by_draft, 262144) == 0  # its own whole distribution scores its steps


def test_draft_vocab_needs_target_scores() -> None:
    with pytest.raises(ValueError, match="draft_vocab=64 needs signal_source='target'"):
        SpecGuardParams(draft_vocab=64, signal_source="draft", confidence_method="mean")


def test_subset_draft_with_every_step_rejected_equals_target_greedy() -> None:
    p = pair()
    params = SpecGuardParams(acceptance_threshold=1.5, n_candidates=3, max_tokens=40, max_step_tokens=6,
                             draft_vocab=24, seed=0)  # fmt: skip
    for text in PROMPTS:
        prompt = ids(p, text)
        result = generate(p, prompt, params)
        out = p.target.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=0)
        assert result.token_ids == out[0, len(prompt) :].tolist()
        assert all(not s.accepted for s in result.steps)


def _expected_steps(p: ModelPair, prompt: list[int], base: torch.Tensor, steps: list[list[int]]) -> list[list[int]]:
    """Each step as the draft's greedy decoding over its subset head writes it: the base tokens and the tokens of
    the sequence when the step starts (prompt and steps before), from full forward passes of the draft model."""
    seq, out = list(prompt), []
    with torch.inference_mode():
        for step in steps:
            allowed = torch.tensor(sorted(set(base.tolist()) | set(seq)))
            written = []
            for _ in step:
                logits = p.draft(torch.tensor([seq + written])).logits[0, -1]
                written.append(int(allowed[logits[allowed].argmax()]))
            out.append(written)
            seq += step
    return out


def test_subset_draft_with_every_step_accepted_is_the_drafts_greedy_over_its_subset_and_sequence() -> None:
    p = pair()
    params = SpecGuardParams(acceptance_threshold=-1.0, n_candidates=1, max_tokens=40, max_step_tokens=6,
                             draft_vocab=24)  # fmt: skip
    pool = RuntimePool.for_pair(p)
    base = frequent_ids(p.tokenizer, 24, pool.draft_columns, p.eos_token_ids)
    assert len(base) < pool.draft_columns  # a real subset
    for text in PROMPTS:
        prompt = ids(p, text)
        assert set(prompt) - set(base.tolist())  # the prompt brings tokens of its own
        result = generate(p, prompt, params)
        steps = [s.token_ids for s in result.steps]
        assert steps == _expected_steps(p, prompt, base, steps)
        runner = pool.idle[-1].draft  # the subset head was in use, with the prompt's own tokens as extra columns
        assert runner.subset is not None and runner.subset.ids.tolist() == base.tolist()
        assert runner._columns is not None and runner._columns.ids.shape[1] > len(base)


@pytest.mark.parametrize("threshold", [0.5, 1.5])
def test_subset_draft_sampling_is_reproducible_and_proposes_only_its_tokens(threshold: float) -> None:
    """Sampling goes through speculative rejection sampling, whose residual needs the draft's distribution at
    the rejected position: the subset's and the sequence's tokens, with every other token at probability 0."""
    p = pair()
    params = SpecGuardParams(temperature=1.0, acceptance_threshold=threshold, n_candidates=2, max_tokens=40,
                             max_step_tokens=6, draft_vocab=24, seed=11)  # fmt: skip
    pool = RuntimePool.for_pair(p)
    base = set(frequent_ids(p.tokenizer, 24, pool.draft_columns, p.eos_token_ids).tolist())
    for text in PROMPTS:
        prompt = ids(p, text)
        first, again = generate(p, prompt, params), generate(p, prompt, params)
        assert first.token_ids == again.token_ids
        seq = list(prompt)
        for step in first.steps:
            if step.accepted:
                assert set(step.token_ids) <= base | set(seq)
            seq += step.token_ids


def test_columns_spread_a_padded_subset_over_the_vocabulary() -> None:
    """Row 1 has one extra token fewer than row 0: its padding repeats a real id and must not mask it."""
    columns = Columns(torch.tensor([[1, 3, 5, 7], [1, 3, 6, 6]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool())
    logits = torch.tensor([[[0.5, 1.0, 2.0, 3.0]], [[0.25, 1.5, 4.0, 9.0]]])
    full = columns.spread(logits, 8)
    inf = float("-inf")
    assert full.tolist() == [[[inf, 0.5, inf, 1.0, inf, 2.0, inf, 3.0]], [[inf, 0.25, inf, 1.5, inf, inf, 4.0, inf]]]


def test_cpu_draft_in_int8_with_a_subset_head_leaves_the_targets_text_unchanged() -> None:
    """The CPU defaults together (float32 weights: an int8 draft; here a small subset head asked for): with every
    step rejected the output is the target's own greedy decoding, token for token."""
    target, draft = bpe_pair()
    p = load_pair(target, draft, dtype="float32", device="cpu")
    params = SpecGuardParams(acceptance_threshold=1.5, max_tokens=40, max_step_tokens=6, draft_vocab=24)
    pool = RuntimePool.for_pair(p)
    for text in PROMPTS:
        prompt = ids(p, text)
        result = generate(p, prompt, params)
        out = p.target.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=0)
        assert result.token_ids == out[0, len(prompt) :].tolist()
        assert all(not s.accepted for s in result.steps)
    shape = pool.shape(params.on_device(p.device), 60, 6, p.device)
    assert shape.head == 24 and shape.int8 == int8_available()
