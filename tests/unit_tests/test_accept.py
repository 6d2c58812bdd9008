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


def greedy(tops: list[int], proposed: list[int], passed: list[bool] | None = None) -> tuple[int, int | None]:
    """The rule on one row: the target's choices ``tops`` after each fed position (one more: the last was fed too)."""
    marks = torch.tensor([passed]) if passed is not None else None
    choices = logits_with_top(tops).argmax(-1)[None]
    (result,) = accept(torch.tensor([proposed]), [len(proposed)], [len(tops)], choices=choices, passed=marks)
    return result


def test_greedy_keeps_the_targets_own_choices_and_writes_its_choice_at_the_first_miss() -> None:
    assert greedy([1, 2, 3, 4], [1, 2, 3, 4]) == (4, None)  # all kept, no row after
    assert greedy([1, 2, 3, 4], [1, 2, 0, 4]) == (2, 3)
    assert greedy([1, 2, 3, 4], [5, 2, 3, 4]) == (0, 1)
    # a row more than there are proposals (the round fed the last one too): the target's next token
    assert greedy([1, 2, 5], [1, 2]) == (2, 5)
    assert greedy([5], []) == (0, 5)  # nothing proposed: the target's own token (plain decoding)


def test_tokens_the_verification_rule_passed_are_kept_like_the_targets_own() -> None:
    proposed = [1, 0, 3, 0]
    assert greedy([1, 2, 3, 4], proposed) == (1, 2)
    assert greedy([1, 2, 3, 4], proposed, [False, True, False, False]) == (3, 4)
    assert greedy([1, 2, 3, 4], proposed, [True] * 4) == (4, None)


def test_rows_of_a_batch_are_judged_each_on_its_own_length() -> None:
    """Ragged rows: each stops at its own first miss or its own length, and padding is never kept."""
    choices = torch.tensor([[1, 2, 3, 4, 5], [7, 8, 9, 9, 9], [4, 4, 4, 4, 4]])
    proposed = torch.tensor([[1, 2, 0, 4], [7, 8, 0, 0], [4, 4, 4, 4]])
    results = accept(proposed, [4, 2, 1], [5, 3, 1], choices=choices)
    assert results == [(2, 3), (2, 9), (1, None)]
    alone = [accept(proposed[i : i + 1, :n], [n], [r], choices=choices[i : i + 1]) for i, (n, r) in
             enumerate(zip([4, 2, 1], [5, 3, 1], strict=True))]  # fmt: skip
    assert [a[0] for a in alone] == results


def test_sampling_is_exact_speculative_sampling_when_nothing_is_passed() -> None:
    """The first token out of one round follows the target's distribution, whatever the draft's."""
    gen = torch.Generator().manual_seed(0)
    target = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    draft = torch.tensor([-1.0, 0.0, 2.0, 1.0], dtype=torch.float64)  # one row fewer: the target has 5
    one = torch.ones((), dtype=torch.float64)
    logp = processed_logprobs(target, one)[None]
    logq = processed_logprobs(draft, one)
    trials = 20_000  # one batch of rows, each a round of its own
    tokens = torch.searchsorted(logq.exp().cumsum(0), torch.rand(trials, generator=gen, dtype=torch.float64))
    results = accept(
        tokens[:, None],
        [1] * trials,
        [2] * trials,
        choices=logp.argmax(-1).expand(trials, -1),
        sampled=[True] * trials,
        logp=logp.expand(trials, -1, -1),
        logq=logq[tokens][:, None],
        uniforms=torch.rand(trials, 2, generator=gen, dtype=torch.float64),
        draft_logq_at=lambda rows, firsts: logq[None].expand(len(rows), -1),
    )
    counts = torch.zeros(5)
    for token, result in zip(tokens.tolist(), results, strict=True):
        counts[token if result.kept == 1 else result.token] += 1
    expected = logp[0, 0].exp()
    assert torch.allclose(counts / trials, expected.float(), atol=0.015)
    assert counts[4] > 0  # the row only the target has is reachable through the residual


def test_draft_log_probabilities_meet_the_targets_rows() -> None:
    logp = torch.zeros(3, 5)
    assert shared_rows(torch.zeros(3, 7), logp).shape == (3, 5)  # a draft with more rows: cut
    padded = shared_rows(torch.zeros(3, 4), logp)
    assert padded.shape == (3, 5) and torch.isinf(padded[:, 4]).all()  # fewer: q = 0 on the target's extra rows


def test_sampling_needs_its_draws() -> None:
    with pytest.raises(AssertionError, match="sampling needs logp, logq and uniforms"):
        accept(torch.tensor([[0, 1]]), [2], [2], choices=torch.tensor([[0, 1]]), sampled=[True])
