"""Deterministic token forcing for tiny random-weight models.

Random-weight models cannot call tools, so tests that need a *specific* answer (a valid or a broken
tool call, a final answer after a tool result) script the text: :func:`force_script` patches one
model instance so that, after its real forward pass (real attention, captured by the engine's real
hooks), a large bias is added to the logit of the scripted next token. Everything downstream of the
logits - sampling, step boundaries, scoring, acceptance, fallback to the target, caches, parsing and
the LangChain message round trip - is the real code.

The script is chosen per generation from the prompt: each generation starts with fresh caches, so
the model's first forward pass sees the whole prompt, and the answer begins right after the last
``<|im_start|>assistant\\n`` in it. Positions after that are scripted by their absolute index (read
from the cache length), so batched draft candidates and the target's parallel verification pass are
forced consistently.
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
    state: dict[str, Any] = {"start": None, "answer": []}
    real_forward = model.forward

    def forward(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        input_ids: torch.Tensor = kwargs["input_ids"]
        cache = kwargs.get("past_key_values")
        before = cache.get_seq_length() if cache is not None else 0
        out = real_forward(*args, **kwargs)
        if before == 0:  # a new generation: find where the answer starts and what it must say
            row = input_ids[0].tolist()
            starts = [i + len(marker) for i in range(len(row) - len(marker) + 1) if row[i : i + len(marker)] == marker]
            assert starts, "scripted models need a ChatML prompt ending with the assistant header"
            start = starts[-1]
            prompt_text = tokenizer.decode(row[:start])
            state["start"] = start
            state["answer"] = tokenizer(script(prompt_text), add_special_tokens=False)["input_ids"]
        logits = out.logits
        n_in, keep = input_ids.shape[1], logits.shape[1]
        bias = torch.zeros_like(logits)
        for j in range(keep):
            offset = before + n_in - keep + j + 1 - state["start"]
            if offset < 0:
                continue
            token = state["answer"][offset] if offset < len(state["answer"]) else end
            bias[:, j, token] = BIAS
        out.logits = logits + bias
        return out

    model.forward = types.MethodType(forward, model)  # type: ignore[method-assign]
    return model
