"""SpecGuard step-level speculative decoding for local Hugging Face models, in LangChain.

The engine (``langchain_specguard.engine``) needs only torch and transformers; the LangChain chat
model is imported on first use, so the engine also works where LangChain is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .engine import GenerationResult, ModelPair, SpecGuardParams, StepEvent, generate, generate_steps, load_pair

if TYPE_CHECKING:
    from .callbacks import STEP_EVENT, SUMMARY_EVENT, SpecGuardCallbackHandler
    from .chat_models import ChatSpecGuard

_LANGCHAIN_NAMES = ("ChatSpecGuard", "STEP_EVENT", "SUMMARY_EVENT", "SpecGuardCallbackHandler")


def __getattr__(name: str) -> Any:
    if name in _LANGCHAIN_NAMES:
        from . import callbacks, chat_models

        return getattr(chat_models if hasattr(chat_models, name) else callbacks, name)
    raise AttributeError(f"module 'langchain_specguard' has no attribute {name!r}")


__all__ = [
    "STEP_EVENT",
    "SUMMARY_EVENT",
    "ChatSpecGuard",
    "GenerationResult",
    "ModelPair",
    "SpecGuardCallbackHandler",
    "SpecGuardParams",
    "StepEvent",
    "generate",
    "generate_steps",
    "load_pair",
]
__version__ = "0.1.0"
