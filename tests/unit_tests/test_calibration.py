"""``acceptance_threshold="auto"``: the threshold learned from the steps the target would write itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

from langchain_specguard import ChatSpecGuard
from langchain_specguard.engine import CallOptions, SpecGuardParams, generate, generate_steps, load_pair
from langchain_specguard.engine.calibration import PRIOR_THRESHOLD, PRIOR_WEIGHT, ThresholdCalibrator
from langchain_specguard.engine.scoring import score_layers
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


def test_auto_needs_target_signals_and_a_scale_bound_method() -> None:
    SpecGuardParams(acceptance_threshold="auto", confidence_method="mean")
    with pytest.raises(ValidationError, match="signal_source='target'"):
        SpecGuardParams(acceptance_threshold="auto", confidence_method="mean", signal_source="draft")
    # the default ratio rule is scale-free: "auto" has nothing to learn there, and the error says what to give
    with pytest.raises(ValidationError, match=r"already scale-free: give a number"):
        SpecGuardParams(acceptance_threshold="auto")
    # the ratio needs the target's own choices, which draft signals never compute
    with pytest.raises(ValidationError, match=r"confidence_method='ratio' \(the default\).*signal_source='draft'"):
        SpecGuardParams(signal_source="draft")
    assert SpecGuardParams(signal_source="draft", confidence_method="mean").acceptance_threshold == 0.5
    with pytest.raises(ValidationError):
        SpecGuardParams(acceptance_threshold="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        SpecGuardParams(acceptance_threshold="auto", confidence_method="mean", calibration_quantile=1.0)


AUTO = SpecGuardParams(
    acceptance_threshold="auto",
    confidence_method="mean",
    n_candidates=2,
    max_tokens=40,
    max_step_tokens=5,
    step_delimiters=["\n"],
    seed=0,
    cache_implementation="dynamic",
)


def test_auto_learns_within_the_call_and_events_report_the_threshold_in_force() -> None:
    target, _ = llama_pair()
    pair = load_pair(target, target, dtype="float64", device="cpu")  # a draft that is the target: it agrees
    prompt = pair.tokenizer("<s>The sum of 3 and 5 is", add_special_tokens=False)["input_ids"]
    first = generate(pair, prompt, AUTO)
    assert first.steps[0].threshold == PRIOR_THRESHOLD  # nothing learned yet
    assert len({s.threshold for s in first.steps}) > 1  # some steps were the target's own: it moved
    for step in first.steps:  # every verdict was taken against the threshold in force at its step
        assert step.accepted == (step.score >= step.threshold)
    second = generate(pair, prompt, AUTO)  # a call learns nothing from the calls before it
    assert second.steps[0].threshold == PRIOR_THRESHOLD
    assert second.token_ids == first.token_ids
    assert [s.threshold for s in second.steps] == [s.threshold for s in first.steps]


def test_a_calibrator_learned_up_front_then_fixed_is_what_a_fixed_threshold_gives() -> None:
    """ "auto" only chooses the threshold: with a calibrator's value fixed, the output is the same."""
    target, draft = llama_pair()
    pair = load_pair(target, draft, dtype="float64", device="cpu")
    agreeing = load_pair(target, target, dtype="float64", device="cpu")  # learns fast: its steps are the target's
    prompt = pair.tokenizer("<s>Hello there", add_special_tokens=False)["input_ids"]
    calibrator = ThresholdCalibrator(AUTO.calibration_quantile)
    list(generate_steps(agreeing, prompt, AUTO, CallOptions(calibrator=calibrator)))
    for _ in range(3):
        list(generate_steps(pair, prompt, AUTO, CallOptions(calibrator=calibrator)))
    assert len(calibrator) > 0
    frozen = calibrator.threshold()
    calibrator.observe = lambda score: None  # type: ignore[method-assign]  # hold it still for the comparison
    learned = list(generate_steps(pair, prompt, AUTO, CallOptions(calibrator=calibrator)))
    fixed = generate(pair, prompt, AUTO.model_copy(update={"acceptance_threshold": frozen}))
    assert [t for s in learned for t in s.token_ids] == fixed.token_ids
    assert [s.accepted for s in learned] == [s.accepted for s in fixed.steps]


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


def test_chat_model_calibrate_returns_a_threshold_and_changes_no_later_call() -> None:
    target, _ = llama_pair()
    llm = ChatSpecGuard(
        model=target,
        draft_model=target,
        max_tokens=16,
        max_step_tokens=4,
        seed=0,
        return_step_details=True,
        acceptance_threshold=0.5,
        confidence_method="mean",
    )
    with pytest.raises(ValueError, match="non-empty list"):
        llm.calibrate("just one string")
    before = llm.invoke("Hello there", acceptance_threshold="auto")
    value = llm.calibrate(["Hello there", "The sum of 3 and 5 is"])
    assert 0.0 <= value <= 1.0 and value != PRIOR_THRESHOLD
    assert llm.acceptance_threshold == 0.5  # the instance's own setting is left as it was
    after = llm.invoke("Hello there", acceptance_threshold="auto")  # calibrating stored nothing
    assert after.response_metadata["specguard"]["step_events"][0]["threshold"] == PRIOR_THRESHOLD
    assert after.content == before.content
    fixed = llm.invoke("Hello there", acceptance_threshold=value)  # the value is for fixing
    assert fixed.response_metadata["specguard"]["step_events"][0]["threshold"] == pytest.approx(value)


# one caller's traffic never changes another's output (origin: issue 19 item 4, the "auto" threshold was one
# calibrator per loaded pair, fed by every call at any temperature)

GREEDY_CALL = textwrap.dedent(
    """
    from langchain_specguard import ChatSpecGuard
    from tests.tiny_models import llama_pair
    target, draft = llama_pair()
    llm = ChatSpecGuard(model=target, draft_model=draft, max_tokens=40, max_step_tokens=4, {options})
    print(repr(llm.invoke("The sum of 3 and 5 is").content))
    """
)


@pytest.mark.parametrize(
    "options", ["", "acceptance_threshold='auto', confidence_method='mean'"], ids=["default", "auto"]
)
def test_a_greedy_call_gives_the_same_text_whatever_other_callers_did(options: str) -> None:
    target, draft = llama_pair()
    config = eval(f"dict({options})")  # the same options as the fresh process below
    llm = ChatSpecGuard(model=target, draft_model=draft, max_tokens=40, max_step_tokens=4, **config)
    before = llm.invoke("The sum of 3 and 5 is").content
    other = ChatSpecGuard(model=target, draft_model=draft, max_tokens=40, max_step_tokens=4, **config)
    assert other.load() is llm.load()  # one loaded pair: where shared state would live
    for seed in range(10):  # another caller's sampled traffic on the same pair
        other.invoke("Hello there, how are you?", temperature=0.9, seed=seed)
    assert llm.invoke("The sum of 3 and 5 is").content == before
    fresh = subprocess.run(
        [sys.executable, "-c", GREEDY_CALL.format(options=options)], capture_output=True, text=True, check=True
    )
    assert fresh.stdout.strip().splitlines()[-1] == repr(before)
