"""The framework-free SpecGuard engine: load a pair, decode with step-level verification.

Nothing here imports LangChain; ``langchain_specguard.chat_models`` is a thin layer over it, and everything that
layer needs from the engine is named here.
"""

from .calibration import ThresholdCalibrator
from .decoding import generate, generate_steps, prepare, threshold_calibrator, warm_up
from .events import EVENT_VERSION, GenerationResult, StepEvent, step_totals, summarize
from .loading import (
    GEMMA_CHAT_TEMPLATE,
    UNKNOWN_WINDOW,
    ModelPair,
    check_causal_lm,
    check_object_dtype,
    check_tokenizer_spec,
    config_values,
    config_window,
    context_window,
    declared_window,
    hub_options,
    load_embedded_pair,
    load_pair,
    load_served_pair,
    resolve_dtype,
    self_speculative_draft,
)
from .options import CallOptions
from .packaged import PACKAGED_PAIRS, load_packaged_pair
from .params import PARAM_FIELDS, SpecGuardParams
from .scoring import GroundingScorer, score_layers
from .served_steps import check_served_params
from .signals import combine_scores, confidence_score, grounding_score, select_consistent
from .steps import json_region, leading_thought, marker_calls, may_open_thought
from .text import held_back, token_bytes

__all__ = [
    "EVENT_VERSION",
    "GEMMA_CHAT_TEMPLATE",
    "PACKAGED_PAIRS",
    "PARAM_FIELDS",
    "UNKNOWN_WINDOW",
    "CallOptions",
    "GenerationResult",
    "GroundingScorer",
    "ModelPair",
    "SpecGuardParams",
    "StepEvent",
    "ThresholdCalibrator",
    "check_causal_lm",
    "check_object_dtype",
    "check_served_params",
    "check_tokenizer_spec",
    "combine_scores",
    "confidence_score",
    "config_values",
    "config_window",
    "context_window",
    "declared_window",
    "generate",
    "generate_steps",
    "grounding_score",
    "held_back",
    "hub_options",
    "json_region",
    "leading_thought",
    "load_embedded_pair",
    "load_packaged_pair",
    "load_pair",
    "load_served_pair",
    "marker_calls",
    "may_open_thought",
    "prepare",
    "resolve_dtype",
    "score_layers",
    "select_consistent",
    "self_speculative_draft",
    "step_totals",
    "summarize",
    "threshold_calibrator",
    "token_bytes",
    "warm_up",
]
