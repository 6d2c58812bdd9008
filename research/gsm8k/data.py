"""GSM8K problems, the project's few-shot chat prompt, answers and step labels (no models here)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from langchain_specguard.apps.fewshot import TERMINATOR, chat_messages, extract_answer

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_RESULT = re.compile(r"=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


def load(path: str | Path, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
    """Problems ``start:stop`` of a GSM8K JSONL file, each with its index, question, reference and numbers."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    problems = []
    for index, row in list(enumerate(rows))[start:stop]:
        solution = row["answer"]
        reference = _number(solution.rsplit("####", 1)[1])
        problems.append(
            {
                "index": index,
                "question": row["question"],
                "reference": reference,
                # every number the reference solution or the question holds: what a right step can compute
                "numbers": sorted({_number(n) for n in _NUMBER.findall(solution + " " + row["question"])}),
            }
        )
    return problems


def _number(text: str) -> float:
    return float(text.strip().replace(",", "").rstrip("."))


def messages(problem: dict[str, Any]) -> list[dict[str, str]]:
    return chat_messages(problem["question"])


def correct(text: str, problem: dict[str, Any]) -> tuple[bool, float | None]:
    answer = extract_answer(text.split(TERMINATOR)[0])
    return answer is not None and abs(answer - problem["reference"]) < 1e-6, answer


def step_label(text: str, problem: dict[str, Any]) -> bool | None:
    """Whether a step's results are right: every number after an ``=`` is one of the reference solution's.

    None for steps that compute nothing (no ``= N``), which this label cannot judge. GSM8K's solutions
    write each intermediate result (``<<16-3-4=9>>9``), so a step computing a number the solution never
    reaches took a wrong turn; one reaching a right number by a wrong route is (rarely) counted right.
    """
    results = [_number(m) for m in _RESULT.findall(text)]
    if not results:
        return None
    known = problem["numbers"]
    return all(any(abs(r - n) < 1e-6 for n in known) for r in results)
