"""``acceptance_threshold="auto"``: the threshold learned from the steps the target would write itself."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from langchain_specguard import ChatSpecGuard
from langchain_specguard.engine import SpecGuardParams, generate, load_pair
from langchain_specguard.engine.calibration import PRIOR_THRESHOLD, PRIOR_WEIGHT, ThresholdCalibrator
from langchain_specguard.engine.decoding import score_layers
from tests.tiny_models import gemma_pair, llama_pair


def test_calibrator_starts_at_the_prior_and_moves_to_the_quantile() -> None:
    cal = ThresholdCalibrator(quantile=0.1)
    assert cal.threshold() == PRIOR_THRESHOLD
    cal.observe(float("nan"))  # nothing measurable: ignored
    assert len(cal) == 0
    scores = [i / 100 for i in range(1, 101)]  # 0.01 .. 1.00
    for s in scores:
        cal.observe(s)
    quantile = 0.01 + 0.1 * 99 / 100  # linear interpolation between order statistics
    expected = (PRIOR_WEIGHT * PRIOR_THRESHOLD + 100 * quantile) / (PRIOR_WEIGHT + 100)
    assert cal.threshold() == pytest.approx(expected)
    for _ in range(600):  # only recent scores are kept, so it follows a change of use
        cal.observe(0.9)
    assert cal.threshold() == pytest.approx((PRIOR_WEIGHT * PRIOR_THRESHOLD + 512 * 0.9) / (PRIOR_WEIGHT + 512))


def test_auto_needs_target_signals() -> None:
    SpecGuardParams(acceptance_threshold="auto")
    with pytest.raises(ValidationError, match="signal_source='target'"):
        SpecGuardParams(acceptance_threshold="auto", signal_source="draft")
    # "auto" is the default, so draft signals alone need a number, and the error says so
    with pytest.raises(ValidationError, match=r"\(the default\).*a fixed acceptance_threshold, e.g. 0.5"):
        SpecGuardParams(signal_source="draft")
    assert SpecGuardParams(signal_source="draft", acceptance_threshold=0.5).acceptance_threshold == 0.5
    with pytest.raises(ValidationError):
        SpecGuardParams(acceptance_threshold="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        SpecGuardParams(acceptance_threshold="auto", calibration_quantile=1.0)


def test_auto_learns_from_the_target_and_events_report_the_threshold_in_force() -> None:
    target, _ = llama_pair()
    pair = load_pair(target, target, dtype="float64", device="cpu")  # a draft that is the target: it agrees
    params = SpecGuardParams(
        acceptance_threshold="auto",
        n_candidates=2,
        max_tokens=40,
        max_step_tokens=5,
        step_delimiters=["\n"],
        seed=0,
        cache_implementation="dynamic",
    )
    prompt = pair.tokenizer("<s>The sum of 3 and 5 is", add_special_tokens=False)["input_ids"]
    first = generate(pair, prompt, params)
    assert first.steps[0].threshold == PRIOR_THRESHOLD  # nothing learned yet
    (calibrator,) = pair.extra["threshold_calibrators"].values()
    learned = len(calibrator)
    assert learned > 0  # some steps were the target's own choices
    for step in first.steps:  # every verdict was taken against the threshold in force at its step
        assert step.accepted == (step.score >= step.threshold)
    before = calibrator.threshold()
    second = generate(pair, prompt, params)
    assert second.steps[0].threshold == pytest.approx(before) != PRIOR_THRESHOLD
    # another way of scoring learns separately
    generate(pair, prompt, params.model_copy(update={"decision": "weighted"}))
    assert len(pair.extra["threshold_calibrators"]) == 2
    generate(pair, prompt, params.model_copy(update={"confidence_method": "min"}))
    assert len(pair.extra["threshold_calibrators"]) == 3
    # the same score under another name shares the calibrator: no grounding weight is confidence alone
    generate(pair, prompt, params.model_copy(update={"decision": "weighted", "grounding_weight": 0.0}))
    generate(pair, prompt, params.model_copy(update={"grounding_method": "mean"}))
    assert len(pair.extra["threshold_calibrators"]) == 3


def test_auto_with_the_threshold_it_learned_is_what_a_fixed_threshold_gives() -> None:
    """ "auto" only chooses the threshold: with the calibrator's value fixed, the output is the same."""
    target, _ = llama_pair()
    pair = load_pair(target, draft_layers=2, dtype="float64", device="cpu")
    base = SpecGuardParams(n_candidates=2, max_tokens=24, max_step_tokens=5, step_delimiters=["\n"], seed=0)
    prompt = pair.tokenizer("<s>Hello there", add_special_tokens=False)["input_ids"]
    auto = base.model_copy(update={"acceptance_threshold": "auto"})
    for _ in range(3):
        generate(pair, prompt, auto)
    (calibrator,) = pair.extra["threshold_calibrators"].values()
    frozen = calibrator.threshold()
    calibrator.observe = lambda score: None  # type: ignore[method-assign]  # hold it still for the comparison
    learned = generate(pair, prompt, auto)
    fixed = generate(pair, prompt, base.model_copy(update={"acceptance_threshold": frozen}))
    assert learned.token_ids == fixed.token_ids
    assert [s.accepted for s in learned.steps] == [s.accepted for s in fixed.steps]


def test_hybrid_models_score_their_full_attention_layers_by_default() -> None:
    target, _ = gemma_pair()
    pair = load_pair(target, draft_layers=2, dtype="float64", device="cpu")
    types = pair.target.config.layer_types
    chosen = score_layers(pair.target, None)
    n = len(types)
    assert chosen and all(types[i] == "full_attention" and i >= n // 2 for i in chosen)
    assert score_layers(pair.target, [0]) == (0,)  # what the user asks for is kept
    llama, _ = llama_pair()
    plain = load_pair(llama, draft_layers=2, dtype="float64", device="cpu")
    n = plain.target.config.num_hidden_layers
    assert score_layers(plain.target, None) == tuple(range(n - max(1, n // 3), n))


def test_chat_model_calibrate_returns_the_threshold_later_auto_calls_use() -> None:
    target, _ = llama_pair()
    llm = ChatSpecGuard(
        model=target,
        draft_model=target,
        max_tokens=16,
        max_step_tokens=4,
        seed=0,
        return_step_details=True,
        acceptance_threshold=0.5,
    )
    with pytest.raises(ValueError, match="non-empty list"):
        llm.calibrate("just one string")
    value = llm.calibrate(["Hello there", "The sum of 3 and 5 is"])
    assert 0.0 <= value <= 1.0 and value != PRIOR_THRESHOLD
    assert llm.acceptance_threshold == 0.5  # the instance's own setting is left as it was
    message = llm.invoke("Hello there", acceptance_threshold="auto")
    assert message.response_metadata["specguard"]["steps"][0]["threshold"] == pytest.approx(value)
