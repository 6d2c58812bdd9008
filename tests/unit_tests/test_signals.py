"""Signals and consistency selection on hand-built tensors with answers worked out by hand."""

import math

import pytest
import torch

from langchain_specguard.engine.signals import (
    combine_scores,
    confidence_score,
    consistency_matrix,
    grounding_mean,
    grounding_rollout,
    grounding_score,
    select_consistent,
)

# Two scored layers (bottom, top), a step of k=2 generating queries.
# bottom: q0 -> sink .5, context .5        q1 -> context .5, itself .5
# top:    q0 -> context 1                  q1 -> context .2, itself .8
SINK = torch.tensor([[0.5, 0.0], [0.0, 0.0]])
CONTEXT = torch.tensor([[0.5, 0.5], [1.0, 0.2]])
STEP = torch.tensor(
    [
        [[0.0, 0.0], [0.0, 0.5]],
        [[0.0, 0.0], [0.0, 0.8]],
    ]
)


def test_grounding_mean_by_hand() -> None:
    # per (layer, query): 1, .5/(.5+.5), 1, .2/(.2+.8) -> mean (1 + .5 + 1 + .2) / 4
    assert grounding_mean(SINK, CONTEXT, STEP) == pytest.approx(0.675)


def test_grounding_rollout_by_hand() -> None:
    # q0 is grounded at once (its residual is the last verified token).
    # q1, top: context .5*.2 = .1, own .5*.8 + .5 = .9; the .9 flows through q1's bottom row
    # (context .25, own .75): context .1 + .9*.25 = .325, own .9*.75 = .675 -> share .325.
    assert grounding_rollout(SINK, CONTEXT, STEP) == pytest.approx((1.0 + 0.325) / 2)


def test_rollout_single_layer_keeps_the_residual() -> None:
    # one layer, q1 pays .6 to the context and .4 to itself: rollout halves the attention and adds
    # the residual on q1 itself: context .3, own .2 + .5 -> .3
    sink = torch.zeros(1, 2)
    context = torch.tensor([[1.0, 0.6]])
    step = torch.tensor([[[0.0, 0.0], [0.0, 0.4]]])
    assert grounding_rollout(sink, context, step) == pytest.approx((1.0 + 0.3) / 2)
    assert grounding_mean(sink, context, step) == pytest.approx((1.0 + 0.6) / 2)


def test_sink_is_left_out_of_the_share() -> None:
    # q0 pays .9 to the sink and .1 to context: still fully grounded
    sink = torch.tensor([[0.9]])
    context = torch.tensor([[0.1]])
    step = torch.zeros(1, 1, 1)
    assert grounding_mean(sink, context, step) == pytest.approx(1.0)
    assert grounding_score(sink, context, step, "rollout") == pytest.approx(1.0)


def test_self_absorbed_step_scores_low() -> None:
    k = 4
    context = torch.zeros(3, k)
    context[:, 0] = 1.0
    step = torch.zeros(3, k, k)
    for q in range(1, k):
        step[:, q, q] = 1.0  # every later query looks only at itself
    score = grounding_score(torch.zeros(3, k), context, step, "rollout")
    assert score == pytest.approx(0.25)  # only query 0 is grounded


def test_empty_step_is_nan() -> None:
    assert math.isnan(grounding_score(torch.zeros(1, 0), torch.zeros(1, 0), torch.zeros(1, 0, 0)))
    assert math.isnan(confidence_score(torch.tensor([])))


def test_confidence_is_geometric_mean_probability() -> None:
    assert confidence_score(torch.log(torch.tensor([0.5, 0.5]))) == pytest.approx(0.5)
    assert confidence_score(torch.log(torch.tensor([0.25, 1.0]))) == pytest.approx(0.5)
    assert confidence_score(torch.zeros(3)) == pytest.approx(1.0)


def test_combine_scores() -> None:
    assert combine_scores(0.9, 0.3, "both") == pytest.approx(0.3)
    assert combine_scores(0.9, 0.3, "weighted", 0.5) == pytest.approx(0.6)
    assert combine_scores(0.9, 0.3, "weighted", 1.0) == pytest.approx(0.9)
    assert combine_scores(0.9, 0.3, "weighted", 0.0) == pytest.approx(0.3)
    assert math.isnan(combine_scores(float("nan"), 0.3))


def test_consistency_selection_picks_the_medoid() -> None:
    candidates = [[9, 9, 9], [1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4]]
    assert select_consistent(candidates) in (1, 3)
    assert select_consistent(candidates) == 1  # ties go to the lowest index
    assert select_consistent([[5, 6]]) == 0
    sim = consistency_matrix([[1, 2, 3], [1, 2, 3]])
    assert torch.allclose(sim, torch.ones(2, 2))


def test_consistency_ties_prefer_the_greedy_candidate() -> None:
    assert select_consistent([[1, 2], [3, 4], [5, 6]]) == 0


def test_select_needs_a_candidate() -> None:
    with pytest.raises(ValueError, match="at least one candidate"):
        select_consistent([])
