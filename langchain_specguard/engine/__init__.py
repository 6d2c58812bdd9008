"""The framework-free SpecGuard engine: load a pair, decode with step-level verification.

Nothing here imports LangChain; ``langchain_specguard.chat_models`` is a thin layer over it.
"""

from .decoding import generate, generate_steps
from .events import EVENT_VERSION, GenerationResult, StepEvent, summarize
from .loading import GEMMA_CHAT_TEMPLATE, ModelPair, load_embedded_pair, load_pair, self_speculative_draft
from .params import SpecGuardParams
from .scoring import GroundingScorer
from .signals import combine_scores, confidence_score, grounding_score, select_consistent

__all__ = [
    "EVENT_VERSION",
    "GEMMA_CHAT_TEMPLATE",
    "GenerationResult",
    "GroundingScorer",
    "ModelPair",
    "SpecGuardParams",
    "StepEvent",
    "combine_scores",
    "confidence_score",
    "generate",
    "generate_steps",
    "grounding_score",
    "load_embedded_pair",
    "load_pair",
    "select_consistent",
    "self_speculative_draft",
    "summarize",
]
