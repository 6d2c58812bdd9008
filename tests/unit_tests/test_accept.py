"""The accept rule (engine/accept.py) on tensors alone: no model, no pair."""

from __future__ import annotations

import pytest
import torch

from langchain_specguard.engine.accept import accept, shared_rows
from langchain_specguard.engine.sampling import processed_logprobs


def logits_with_top(tops: list[int], vocab: int = 6) -> torch.Tensor:
    """Rows whose argmax is ``tops[i]`` (the runner-up a little lower)."""
    rows = torch.zeros(len(tops), vocab, dtype=torch.float64)
    for i, t in enumerate(tops):
        rows[i, t] = 3.0
        rows[i, (t + 1) % vocab] = 2.5
    return rows


def test_greedy_keeps_the_targets_own_choices_and_writes_its_choice_at_the_first_miss() -> None:
    scores = logits_with_top([1, 2, 3, 4])
    assert accept(scores, torch.tensor([1, 2, 3, 4]), greedy=True) == (4, None)  # all kept, no row after
    assert accept(scores, torch.tensor([1, 2, 0, 4]), greedy=True) == (2, 3)
    assert accept(scores, torch.tensor([5, 2, 3, 4]), greedy=True) == (0, 1)
    # a row more than there are proposals (the round fed the last one too): the target's next token
    assert accept(logits_with_top([1, 2, 5]), torch.tensor([1, 2]), greedy=True) == (2, 5)


def test_tokens_the_verification_rule_passed_are_kept_like_the_targets_own() -> None:
    scores = logits_with_top([1, 2, 3, 4])
    proposed = torch.tensor([1, 0, 3, 0])
    assert accept(scores, proposed, greedy=True) == (1, 2)
    passed = torch.tensor([False, True, False, False])
    assert accept(scores, proposed, greedy=True, passed=passed) == (3, 4)
    assert accept(scores, proposed, greedy=True, passed=torch.ones(4, dtype=torch.bool)) == (4, None)


def test_sampling_is_exact_speculative_sampling_when_nothing_is_passed() -> None:
    """The first token out of one round follows the target's distribution, whatever the draft's."""
    gen = torch.Generator().manual_seed(0)
    target = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    draft = torch.tensor([-1.0, 0.0, 2.0, 1.0], dtype=torch.float64)  # one row fewer: the target has 5
    one = torch.ones((), dtype=torch.float64)
    logp = processed_logprobs(target, one)
    logq = processed_logprobs(draft, one)
    counts = torch.zeros(5)
    trials = 20_000
    for _ in range(trials):
        token = int(torch.searchsorted(logq.exp().cumsum(0), torch.rand((), generator=gen, dtype=torch.float64)))
        result = accept(
            logp,
            torch.tensor([token]),
            greedy=False,
            logq=logq[token : token + 1],
            uniforms=torch.rand(2, generator=gen, dtype=torch.float64),
            draft_logq_at=lambda i: logq,
        )
        counts[token if result.kept == 1 else result.token] += 1
    expected = logp[0].exp()
    assert torch.allclose(counts / trials, expected.float(), atol=0.015)
    assert counts[4] > 0  # the row only the target has is reachable through the residual


def test_draft_log_probabilities_meet_the_targets_rows() -> None:
    logp = torch.zeros(3, 5)
    assert shared_rows(torch.zeros(3, 7), logp).shape == (3, 5)  # a draft with more rows: cut
    padded = shared_rows(torch.zeros(3, 4), logp)
    assert padded.shape == (3, 5) and torch.isinf(padded[:, 4]).all()  # fewer: q = 0 on the target's extra rows


def test_sampling_needs_its_draws() -> None:
    with pytest.raises(AssertionError, match="sampling needs logq and uniforms"):
        accept(torch.zeros(2, 4), torch.tensor([0, 1]), greedy=False)
