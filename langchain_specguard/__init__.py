"""SpecGuard step-level speculative decoding for local Hugging Face models, in LangChain."""

from .chat_models import STEP_EVENT, SUMMARY_EVENT, ChatSpecGuard
from .engine import GenerationResult, ModelPair, SpecGuardParams, StepEvent, generate, generate_steps, load_pair

__all__ = [
    "STEP_EVENT",
    "SUMMARY_EVENT",
    "ChatSpecGuard",
    "GenerationResult",
    "ModelPair",
    "SpecGuardParams",
    "StepEvent",
    "generate",
    "generate_steps",
    "load_pair",
]
__version__ = "0.1.0"
