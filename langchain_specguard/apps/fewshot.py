"""The few-shot arithmetic prompt shared by the demo and the benchmark (no LangChain here).

Small base models such as the embedded Gemma 3 270M only follow a format they are shown: two
worked examples teach one reasoning step per line and a final ``Answer: N`` line.
"""

from __future__ import annotations

import re
from typing import Any

TERMINATOR = "Done."
"""The worked examples end with this line, so a base model that never ends its turn writes it too: a stop."""
SYSTEM = "Solve the math problem. Write one reasoning step per line. End with a line 'Answer: N'."
EXAMPLES = [
    (
        "Sara has 4 pencils. She gets 2 more pencils. How many pencils does she have now?",
        f"Sara starts with 4 pencils.\nShe gets 2 more pencils.\n4 + 2 = 6\nAnswer: 6\n{TERMINATOR}",
    ),
    (
        "A box has 10 cookies. Ben eats 3 cookies. How many cookies are left?",
        f"The box starts with 10 cookies.\nBen eats 3 cookies.\n10 - 3 = 7\nAnswer: 7\n{TERMINATOR}",
    ),
]
DEFAULT_QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"
_ANSWER = re.compile(r"Answer:\s*\$?(-?\d[\d,]*(?:\.\d+)?)")


def chat_messages(question: str) -> list[dict[str, str]]:
    """OpenAI-style messages: system, the worked examples, then ``question``."""
    messages = [{"role": "system", "content": SYSTEM}]
    for q, a in EXAMPLES:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    return messages


def raw_prompt_text(question: str) -> str:
    """The plain ``Q: ...\nA:\n`` format (no chat template) of the arithmetic testbed (research/arithmetic.py)."""
    return f"Q: {question}\nA:\n"


def raw_prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """Token ids of :func:`raw_prompt_text`: BOS (if the tokenizer has one), then the text."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids: list[int] = tokenizer(raw_prompt_text(question), add_special_tokens=False)["input_ids"]
    return bos + ids


def trim_to_answer(text: str) -> str:
    """The reasoning up to its 'Answer: N' line: a base model rarely ends its turn by itself."""
    match = _ANSWER.search(text)
    return text[: match.end()] if match else text.strip()


def extract_answer(text: str) -> float | None:
    """The number after the first 'Answer:', or None."""
    match = _ANSWER.search(text)
    if match is None:
        return None
    try:
        return float(match.group(1).replace(",", ""))
    except ValueError:
        return None
