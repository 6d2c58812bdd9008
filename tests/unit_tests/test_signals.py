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
    # q0 is not measured (it cannot see the step); q1 per layer: .5/(.5+.5), .2/(.2+.8) -> (.5 + .2) / 2
    assert grounding_mean(SINK, CONTEXT, STEP) == pytest.approx(0.35)


def test_grounding_rollout_by_hand() -> None:
    # q1, top: context .5*.2 = .1; attention moves .5*.8 = .4 onto q1's own input; .5 stays (residual).
    # bottom: the moved .4 pays .5*.5 to the context (.1) and keeps .4*(.25 + .5) = .3 inside the step;
    # the residual .5 pays .5*.5*.5 = .125 to the context and moves .125 inside the step; the .25 that
    # only ever stayed is undetermined and left out. context .325, own .425 -> .325 / .75
    assert grounding_rollout(SINK, CONTEXT, STEP) == pytest.approx(0.325 / 0.75)


def test_rollout_on_one_layer_equals_the_mean() -> None:
    # one layer, q1 pays .6 to the context and .4 to itself: the residual half is undetermined, and
    # the attention half splits .3 / .2 -> .6, what the plain share says
    sink = torch.zeros(1, 2)
    context = torch.tensor([[1.0, 0.6]])
    step = torch.tensor([[[0.0, 0.0], [0.0, 0.4]]])
    assert grounding_rollout(sink, context, step) == pytest.approx(0.6)
    assert grounding_mean(sink, context, step) == pytest.approx(0.6)


def test_uniform_attention_scores_its_context_share_not_one_half() -> None:
    # every query spreads its attention evenly over 96 context tokens and the step tokens it can
    # see: the measure must follow that share (high), not sit near 0.5 because of the residual
    k, m, ctx_len = 8, 6, 96
    context = torch.zeros(m, k, dtype=torch.float64)
    step = torch.zeros(m, k, k, dtype=torch.float64)
    for q in range(k):
        seen = ctx_len + q
        context[:, q] = ctx_len / seen
        step[:, q, 1 : q + 1] = 1.0 / seen
    sink = torch.zeros(m, k, dtype=torch.float64)
    share = float((context[0, 1:] / (context[0, 1:] + step[0, 1:].sum(-1))).mean())
    assert grounding_mean(sink, context, step) == pytest.approx(share)
    assert share < grounding_rollout(sink, context, step) <= 1.0  # a step leaning on the context compounds


def test_sink_is_left_out_of_the_share() -> None:
    # q1 pays .9 to the sink and .1 to context: still fully grounded
    sink = torch.tensor([[0.0, 0.9]])
    context = torch.tensor([[1.0, 0.1]])
    step = torch.zeros(1, 2, 2)
    assert grounding_mean(sink, context, step) == pytest.approx(1.0)
    assert grounding_score(sink, context, step, "rollout") == pytest.approx(1.0)


def test_self_absorbed_step_scores_zero() -> None:
    k = 4
    context = torch.zeros(3, k)
    context[:, 0] = 1.0
    step = torch.zeros(3, k, k)
    for q in range(1, k):
        step[:, q, q] = 1.0  # every later query looks only at itself
    assert grounding_score(torch.zeros(3, k), context, step, "rollout") == pytest.approx(0.0)
    assert grounding_score(torch.zeros(3, k), context, step, "mean") == pytest.approx(0.0)


def test_one_token_steps_have_no_grounding_and_are_judged_on_confidence() -> None:
    # query 0 cannot attend to the step, so a one-token step has nothing to measure (no 1/k floor)
    assert math.isnan(grounding_score(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1, 1)))
    assert combine_scores(float("nan"), 0.3, "both") == pytest.approx(0.3)
    assert combine_scores(float("nan"), 0.3, "weighted") == pytest.approx(0.3)


def test_empty_step_is_nan() -> None:
    assert math.isnan(grounding_score(torch.zeros(1, 0), torch.zeros(1, 0), torch.zeros(1, 0, 0)))
    assert math.isnan(confidence_score(torch.tensor([])))
    assert math.isnan(combine_scores(0.5, float("nan")))


def test_confidence_is_geometric_mean_probability() -> None:
    assert confidence_score(torch.log(torch.tensor([0.5, 0.5]))) == pytest.approx(0.5)
    assert confidence_score(torch.log(torch.tensor([0.25, 1.0]))) == pytest.approx(0.5)
    assert confidence_score(torch.zeros(3)) == pytest.approx(1.0)


def test_min_confidence_is_the_least_likely_tokens_probability() -> None:
    # one unlikely token in a long, otherwise certain step: the mean forgives it, the minimum does not
    step = torch.log(torch.tensor([1.0] * 9 + [0.01], dtype=torch.float64))
    assert confidence_score(step) == pytest.approx(0.01**0.1)
    assert confidence_score(step, "min") == pytest.approx(0.01)
    assert math.isnan(confidence_score(torch.tensor([]), "min"))


def test_combine_scores() -> None:
    assert combine_scores(0.9, 0.3, "both") == pytest.approx(0.3)
    assert combine_scores(0.9, 0.3, "weighted", 0.5) == pytest.approx(0.6)
    assert combine_scores(0.9, 0.3, "weighted", 1.0) == pytest.approx(0.9)
    assert combine_scores(0.9, 0.3, "weighted", 0.0) == pytest.approx(0.3)


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


# the grounding scorer seam (issue 21 item 5): a study adds signals by subclassing, never by patching the engine


@pytest.mark.parametrize("source", ["target", "draft"])
def test_a_grounding_scorer_of_your_own_sees_the_recorded_attention_and_decides(source: str) -> None:
    from langchain_specguard.engine import CallOptions, GroundingScorer, SpecGuardParams, generate, load_pair
    from tests.tiny_models import llama_pair

    target, draft = llama_pair()
    pair = load_pair(target, draft, dtype="float64", device="cpu")
    options = {
        "decision": "both", "signal_source": source, "confidence_method": "mean", "acceptance_threshold": 0.3,
        "step_delimiters": ["\n"], "max_step_tokens": 4, "max_tokens": 16, "seed": 0,
    }  # fmt: skip
    params = SpecGuardParams(**options)
    prompt = pair.tokenizer("Hello there")["input_ids"]
    plain = generate(pair, prompt, params)
    described = GroundingScorer.of(pair, params)
    assert described is not None and described.source == source

    seen: list[tuple[int, tuple[int, ...]]] = []

    class Study(GroundingScorer):
        def score(self, record, row, k):  # type: ignore[no-untyped-def]
            seen.append((k, tuple(record.layers)))
            return super().score(record, row, k)

    studied = generate(pair, prompt, params, CallOptions(grounding=Study(source, described.layers, described.method)))
    # the same attention, the same scores, the same text: the study only looked
    assert studied.text == plain.text
    assert [s.grounding for s in studied.steps] == pytest.approx([s.grounding for s in plain.steps], nan_ok=True)
    assert len(seen) == len(studied.steps) and all(layers == described.layers for _, layers in seen)
    assert all(1 <= k <= 4 for k, _ in seen)  # each call scores one kept candidate of at most max_step_tokens

    # a scorer that always says "grounded" decides differently, without touching the engine
    class Grounded(GroundingScorer):
        def score(self, record, row, k):  # type: ignore[no-untyped-def]
            return 1.0

    grounded = generate(
        pair, prompt, params, CallOptions(grounding=Grounded(source, described.layers, described.method))
    )
    assert all(s.grounding == 1.0 for s in grounded.steps)
    # the decision with confidence alone records nothing: no scorer is made
    assert GroundingScorer.of(pair, SpecGuardParams(**{**options, "decision": "confidence"})) is None
