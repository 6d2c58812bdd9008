"""Deterministic token forcing for tiny random-weight models.

Random-weight models cannot call tools, so tests that need a *specific* answer (a valid or a broken
tool call, a final answer after a tool result) script the text: :func:`force_script` patches one
model instance so that, after its real forward pass (real attention, recorded by the engine's real
kernel), a large bias is added to the logit of the scripted next token. Everything downstream of the
logits - sampling, step boundaries, scoring, acceptance, fallback to the target, caches, parsing and
the LangChain message round trip - is the real code.

The engine passes explicit ``position_ids``, so the patch knows each query's absolute position: it
remembers the tokens fed at each position (a generation starts again at position 0), finds where the
answer starts (after the last assistant header, ``<|im_start|>assistant\\n`` by default), and scripts
every position after it, so batched draft candidates, verification and speculation passes are forced
consistently. A script may also give one text per batch row, so the draft's candidates differ: row
``r`` is forced along text ``r`` position by position (rows past the list take the last text).
:func:`scripted_llm` builds a chat model on a pair of its own with both models scripted.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from langchain_specguard import ChatSpecGuard
from langchain_specguard.tools import HERMES_MARKERS, RESPONSE_MARKERS

ASSISTANT = "<|im_start|>assistant\n"
BIAS = 1e4


def force_script(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    script: Callable[[str], str | Sequence[str]],
    header: str = ASSISTANT,
    end_token: str = "<|im_end|>",
) -> PreTrainedModel:
    """Make ``model`` write ``script(prompt_text)`` after ``header``, then ``end_token``.

    ``script`` returns one text for every batch row, or a list of texts, one per row of a pass. Each cache row
    (a generation's row in a batch) is followed on its own, so generations that joined a batch at different times
    each get their own script at their own positions.
    """
    end = tokenizer.convert_tokens_to_ids(end_token)
    marker = tokenizer(header, add_special_tokens=False)["input_ids"]
    rows_state: dict[int, dict[str, Any]] = {}

    def tokens_of(text: str) -> list[int]:
        ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def forward(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        input_ids: torch.Tensor = kwargs["input_ids"]
        all_positions: list[list[int]] = kwargs["position_ids"].tolist()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        rows = getattr(cache, "rows", None) or slice(0, input_ids.shape[0])
        out = type(self).forward(self, *args, **kwargs)  # the real forward of whichever object runs
        logits = out.logits
        keep = logits.shape[1]
        bias = torch.zeros_like(logits)
        scripted = False
        for r, (positions, tokens) in enumerate(zip(all_positions, input_ids.tolist(), strict=True)):
            cache_row = (rows.start or 0) + r * (rows.step or 1)
            if positions[0] == 0 or cache_row not in rows_state:  # a new generation in this row
                rows_state[cache_row] = {"seen": {}, "start": None, "answers": [[]]}
            state = rows_state[cache_row]
            seen: dict[int, int] = state["seen"]
            if any(p not in seen for p in range(positions[0])):  # its cache was copied from its slot's leader
                donor = _donor(rows_state, cache_row, positions[0])
                if donor is not None:
                    seen.update({p: t for p, t in donor["seen"].items() if p < positions[0]})
                    state.update(start=donor["start"], answers=donor["answers"])
            for position, token in zip(positions, tokens, strict=True):
                seen[position] = token  # the latest write wins: padded passes write placeholders past the end
            row: list[int] = []
            while len(row) in seen:
                row.append(seen[len(row)])
            starts = [i + len(marker) for i in range(len(row) - len(marker) + 1) if row[i : i + len(marker)] == marker]
            if starts and starts[-1] != state["start"]:  # the prompt may arrive in chunks: the last header wins
                state["start"] = starts[-1]
                texts = script(tokenizer.decode(row[: starts[-1]]))
                state["answers"] = [tokens_of(texts)] if isinstance(texts, str) else [tokens_of(t) for t in texts]
            if state["start"] is None:
                continue
            answers: list[list[int]] = state["answers"]
            answer = answers[min(r, len(answers) - 1)]
            for j, position in enumerate(positions[len(positions) - keep :]):
                offset = position + 1 - state["start"]
                if offset >= 0:
                    bias[r, j, answer[offset] if offset < len(answer) else end] = BIAS
                    scripted = True
        if scripted:
            out.logits = logits + bias
        return out

    model.forward = types.MethodType(forward, model)  # type: ignore[method-assign]
    return model


def _donor(rows_state: dict[int, dict[str, Any]], row: int, length: int) -> dict[str, Any] | None:
    """The nearest earlier row holding the first ``length`` positions: the slot leader whose cache the engine copied
    into ``row`` (a draft slot's candidate rows share the leader's prefilled prompt)."""
    for other in sorted((r for r in rows_state if r < row), reverse=True):
        if all(p in rows_state[other]["seen"] for p in range(length)):
            return rows_state[other]
    return None


def scripted_llm(pair_dirs: tuple[str, str], script: str, **options: Any) -> ChatSpecGuard:
    """A chat model on ``pair_dirs`` whose draft and target both write ``script``, so whichever model writes a
    step, the text is the same; ``options`` override the small defaults below.

    A tokenizer object of its own gives the instance a pair of its own (instances with the same loading
    options share one loaded pair): scripting its models reaches no other test's instance.
    """
    target, draft = pair_dirs
    config: dict[str, Any] = {"max_tokens": 60, "n_candidates": 2, "seed": 0, "step_delimiters": ["\n"]}
    llm = ChatSpecGuard(
        target_model=target, draft_model=draft, tokenizer=AutoTokenizer.from_pretrained(target), **{**config, **options}
    )
    pair = llm.load()
    force_script(pair.draft, pair.tokenizer, lambda prompt: script)
    force_script(pair.target, pair.tokenizer, lambda prompt: script)
    return llm


PLAIN_ANSWER = "Hello! How can I help you today?"
FINAL_ANSWER = "Thanks, the tool answered: that is the result."
TURN = re.compile(r"<\|im_start\|>(\w+)\n?(.*?)<\|im_end\|>", re.DOTALL)


def perfect_caller(prompt: str) -> str:
    """What a model that follows the fallback tool prompt perfectly answers to ``prompt`` (ChatML text, up to the
    answer's header): the standard suite's tests each ask for one thing, and this answers it as a capable model
    would, so that what they check is the package's handling, not a random model's luck.

    With tools listed and a user turn last, it calls the tool the question names (else the first listed), with
    arguments filled from the question by the tool's JSON schema (integers in the order they appear, strings from
    quoted text, else the parameter's name; optional parameters left out). After a tool result it answers in plain
    text; with no tools, a JSON object when the question asks for JSON (its quoted words as keys), else plain text.
    """
    turns = TURN.findall(prompt)
    if not turns:
        return PLAIN_ANSWER
    tools = _listed_tools(turns[0][1]) if turns[0][0] == "system" else []
    last = turns[-1][1]
    if last.startswith(RESPONSE_MARKERS[0]):
        return FINAL_ANSWER
    if not tools and re.search(r"\bJSON\b", last):  # asked for a JSON object with the keys it names
        return json.dumps({key: key for key in re.findall(r"'(\w+)'", last)})
    if not tools:
        return PLAIN_ANSWER
    tool = next((t for t in tools if re.search(rf"\b{re.escape(t['name'])}\b", last)), tools[0])
    call = {"name": tool["name"], "arguments": _arguments(tool.get("parameters", {}), last)}
    return f"{HERMES_MARKERS[0]}\n{json.dumps(call, ensure_ascii=False)}\n{HERMES_MARKERS[1]}"


def _listed_tools(system: str) -> list[dict[str, Any]]:
    """The tools a system turn lists as JSON objects, wherever they are: the fallback prompt's (``{"name",
    "parameters"...}`` a line) or a template's (``{"type": "function", "function": {...}}``, in ``<tools>`` tags)."""
    decoder = json.JSONDecoder()
    tools: list[dict[str, Any]] = []
    position = system.find("{")
    while position >= 0:
        try:
            listed, end = decoder.raw_decode(system, position)
        except ValueError:
            position = system.find("{", position + 1)
            continue
        listed = listed.get("function", listed) if isinstance(listed, dict) else None
        if isinstance(listed, dict) and isinstance(listed.get("name"), str) and "parameters" in listed:
            tools.append(listed)
        position = system.find("{", end)
    return tools


def _arguments(schema: dict[str, Any], question: str) -> dict[str, Any]:
    numbers = iter(int(n) for n in re.findall(r"-?\d+", question))
    quoted = iter(re.findall(r"'([^']+)'", question))
    arguments: dict[str, Any] = {}
    for name in schema.get("required", []):
        kind = schema.get("properties", {}).get(name, {}).get("type")
        if kind in ("integer", "number"):
            arguments[name] = next(numbers, 1)
        elif kind == "boolean":
            arguments[name] = True
        else:
            arguments[name] = next(quoted, name.replace("_", " "))
    return arguments
