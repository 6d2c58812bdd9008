"""Deterministic token forcing for tiny random-weight models.

Random-weight models cannot call tools, so tests that need a *specific* answer (a valid or a broken
tool call, a final answer after a tool result) script the text: :func:`force_script` patches one
model instance so that, after its real forward pass (real attention, recorded by the engine's real
kernel), a large bias is added to the logit of the scripted next token. Everything downstream of the
logits - sampling, step boundaries, scoring, acceptance, fallback to the target, caches, parsing and
the LangChain message round trip - is the real code.

The engine passes explicit ``position_ids``, so the patch knows each query's absolute position: it
remembers the tokens fed at each position (a generation starts again at position 0), finds where the
answer starts (after the last ``<|im_start|>assistant\\n``), and scripts every position after it, so
batched draft candidates, verification and speculation passes are forced consistently.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

ASSISTANT = "<|im_start|>assistant\n"
BIAS = 1e4


def force_script(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, script: Callable[[str], str]
) -> PreTrainedModel:
    """Make ``model`` write ``script(prompt_text)`` after the assistant header, then ``<|im_end|>``."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    marker = tokenizer(ASSISTANT, add_special_tokens=False)["input_ids"]
    state: dict[str, Any] = {"seen": {}, "start": None, "answer": []}

    def forward(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        input_ids: torch.Tensor = kwargs["input_ids"]
        positions: list[int] = kwargs["position_ids"][0].tolist()
        out = type(self).forward(self, *args, **kwargs)  # the real forward of whichever object runs
        if positions[0] == 0:  # a new generation
            state.update(seen={}, start=None, answer=[])
        seen: dict[int, int] = state["seen"]
        for position, token in zip(positions, input_ids[0].tolist(), strict=True):
            seen[position] = token  # the latest write wins: padded passes write placeholders past the end
        row = [seen[i] for i in range(len(seen))]
        starts = [i + len(marker) for i in range(len(row) - len(marker) + 1) if row[i : i + len(marker)] == marker]
        if starts and starts[-1] != state["start"]:  # the prompt may arrive in chunks: the last header wins
            state["start"] = starts[-1]
            state["answer"] = tokenizer(script(tokenizer.decode(row[: starts[-1]])), add_special_tokens=False)[
                "input_ids"
            ]
        if state["start"] is None:
            return out
        logits = out.logits
        keep = logits.shape[1]
        bias = torch.zeros_like(logits)
        for j, position in enumerate(positions[len(positions) - keep :]):
            offset = position + 1 - state["start"]
            if offset < 0:
                continue
            token = state["answer"][offset] if offset < len(state["answer"]) else end
            bias[:, j, token] = BIAS
        out.logits = logits + bias
        return out

    model.forward = types.MethodType(forward, model)  # type: ignore[method-assign]
    return model
