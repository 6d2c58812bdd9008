"""Reasoning models (Qwen3, DeepSeek-R1 distills...): the think block kept out of the answer.

These models open their answer with a think block, ``<think>...</think>``; some chat templates open it
in the generation prompt themselves, so the output starts inside it. The engine steps and verifies the
block like any chain of thought (:func:`~langchain_specguard.engine.steps.leading_thought` says where
it lies); this module is the LangChain side: it decides whether a model thinks, splits an output into
reasoning and answer (also while streaming, holding back what a marker split across steps could still
change), and reads the reasoning of past messages. The reasoning goes where LangChain providers put it
(ChatOllama, ChatDeepSeek): ``additional_kwargs["reasoning_content"]``, which langchain-core shows as
a ``{"type": "reasoning"}`` content block (``content_blocks``, ``output_version="v1"``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage
from transformers import PreTrainedTokenizerBase

from .engine import held_back, leading_thought, may_open_thought

DEFAULT_MARKERS = ("<think>", "</think>")
"""The think markers of Qwen3, QwQ and the DeepSeek-R1 family (``reasoning_markers`` overrides them)."""

RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages"} | set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) - {"self", "kwargs"}
)
"""Names ``chat_template_kwargs`` cannot use: ``apply_chat_template``'s own arguments and the messages."""


@dataclass(frozen=True)
class ThoughtSpec:
    """How one call's output splits into reasoning and answer."""

    markers: tuple[str, str]
    opened: bool  # the prompt ends inside the think block: the output starts as reasoning

    def split(self, text: str, final: bool = True) -> tuple[str, str]:
        """``(reasoning, answer)`` of the output ``text``.

        With ``final=False`` (streaming) only what later text cannot change: nothing while the output may
        still open a think block, and the reasoning without an end that may grow into the closing marker.
        The reasoning is trimmed, and so is the answer's leading whitespace (the blank line models write
        after ``</think>``), so each part shown while streaming is a prefix of the final one. An output cut
        off inside the block is all reasoning. Without a think block the answer is ``text`` untouched.
        """
        opening, closing = self.markers
        if not final and may_open_thought(text, opening):
            return "", ""
        thought = leading_thought(text, self.markers, self.opened)
        if thought is None:
            return "", text
        if thought.answer is None:
            reasoning = text[thought.start :]
            if not final:
                reasoning = reasoning[: len(reasoning) - held_back(reasoning, [closing])]
            return reasoning.strip(), ""
        return text[thought.start : thought.end].strip(), text[thought.answer :].lstrip()


def model_thinks(tokenizer: Any, template: str | None, opening: str) -> bool:
    """Whether a model writes think blocks, as its tokenizer (a token of its own) or chat template says."""
    return opening in tokenizer.get_added_vocab() or opening in (template or "")


def opens_thought(prompt: str, without_generation_prompt: str, markers: tuple[str, str]) -> bool:
    """Whether the generation prompt leaves a think block open, so that the output starts inside it.

    The generation prompt is what ``prompt`` (the conversation rendered for the assistant's turn) adds to
    the same conversation rendered without it (e.g. ``<|im_start|>assistant\n<think>\n``).
    """
    same = next((i for i, (a, b) in enumerate(zip(prompt, without_generation_prompt, strict=False)) if a != b), None)
    generation_prompt = prompt[same if same is not None else len(without_generation_prompt) :]
    opening, closing = markers
    at = generation_prompt.rfind(opening)
    return at >= 0 and closing not in generation_prompt[at + len(opening) :]


def template_kwargs(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Extra chat-template variables, later layers winning, checked against ``apply_chat_template``'s arguments."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        if not isinstance(layer, Mapping):
            raise TypeError(f"chat_template_kwargs must be a dict, got {type(layer).__name__}")
        bad = sorted(str(k) for k in layer if not isinstance(k, str) or k in RESERVED_TEMPLATE_KWARGS)
        if bad:
            raise ValueError(
                f"chat_template_kwargs cannot set {bad}: those are apply_chat_template's own arguments or the "
                "messages; pass template variables such as {'enable_thinking': False}"
            )
        merged.update(layer)
    return merged


def reasoning_of(message: BaseMessage) -> str:
    """The reasoning of a past assistant message (``reasoning_content``, or v1 ``reasoning`` blocks)."""
    if not isinstance(message, AIMessage):
        return ""
    return "".join(
        str(block.get("reasoning") or "") for block in message.content_blocks if block.get("type") == "reasoning"
    )
