"""The process's shared pairs: instances with the same loading options share one loaded pair.

The copies that ``bind``, ``with_config`` and ``configurable_fields`` make, and separate instances with
the same models and loading options, load the models once; the pair is freed with the last instance
that holds its key. Also what is known about a pair before it loads (context window, profile).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models.model_profile import ModelProfile
from transformers import PreTrainedModel

from .engine import ModelPair, config_values, config_window, declared_window


@dataclass
class _SharedPair:
    """A loaded pair and how many live instances have its loading options (loaded or not yet)."""

    instances: int = 0
    pair: ModelPair | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_PAIRS: dict[tuple[Any, ...], _SharedPair] = {}


_PAIRS_LOCK = threading.Lock()


class Holding:
    """``instance`` counted as a holder of ``key``'s pair until it is garbage-collected or :meth:`release` runs."""

    def __init__(self, key: tuple[Any, ...], instance: Any) -> None:
        self.key = key
        with _PAIRS_LOCK:
            _PAIRS.setdefault(key, _SharedPair()).instances += 1
        self._finalizer = weakref.finalize(instance, _release, key)

    def of(self, instance: Any) -> bool:
        """Whether this is ``instance``'s own holding (a copy of an instance starts with its source's)."""
        alive = self._finalizer.peek()
        return alive is not None and alive[0] is instance

    def release(self) -> None:
        self._finalizer()  # runs _release once; later calls and the garbage collector do nothing


def _release(key: tuple[Any, ...]) -> None:
    with _PAIRS_LOCK:
        entry = _PAIRS.get(key)
        if entry is not None:
            entry.instances -= 1
            if entry.instances <= 0:
                del _PAIRS[key]  # the last instance is gone: the pair (weights, caches, graphs) can be freed


def shared_pair(key: tuple[Any, ...], load: Callable[[], ModelPair]) -> ModelPair:
    """The process's pair for ``key``, loaded once while any instance with these loading options lives."""
    with _PAIRS_LOCK:
        entry = _PAIRS.setdefault(key, _SharedPair())
    with entry.lock:  # one load per key at a time; other keys load in parallel
        if entry.pair is None:
            entry.pair = load()
        return entry.pair


EMBEDDED_CONTEXT_WINDOW = 32768
"""Gemma 3 270M's context window (the embedded default); checked against the loaded model in the tests."""


def identity(value: Any) -> Any:
    """A model, tokenizer or path as it enters the cache key: the path, or the object's class, origin and id."""
    if value is None or isinstance(value, (str, int)):
        return value
    return f"{type(value).__name__}:{getattr(value, 'name_or_path', '')}:{id(value)}"


def context_window_of(spec: Any) -> int | None:
    """The target's context window when it is known without loading weights (object, embedded, its config).

    A path or Hub id is read from its ``config.json`` as data (:func:`~.engine.loading.config_values`): no
    repository code runs and nothing asks on stdin, whatever ``trust_remote_code`` says.
    """
    if spec is None:
        return EMBEDDED_CONTEXT_WINDOW
    if isinstance(spec, PreTrainedModel):
        return config_window(spec.config)
    try:
        return declared_window(config_values(str(spec)))
    except (OSError, ValueError):
        return None  # neither local nor reachable, or unreadable: filled in when the model loads


def model_profile(max_input_tokens: int | None) -> ModelProfile:
    """What profile-driven LangChain code (e.g. SummarizationMiddleware) needs to know about this model."""
    return ModelProfile(
        max_input_tokens=max_input_tokens,  # type: ignore[typeddict-item]
        open_weights=True,
        text_inputs=True,
        image_inputs=False,
        audio_inputs=False,
        video_inputs=False,
        pdf_inputs=False,
        text_outputs=True,
        tool_calling=True,
        tool_choice=True,
        tool_call_streaming=True,
        structured_output=False,  # no native structured output: with_structured_output and agents use a tool call
    )
