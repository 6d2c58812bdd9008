"""Collect SpecGuard's per-step verification over a few questions and plot it.

Runs the demo chain (few-shot prompt | ChatSpecGuard | parser) on the embedded Gemma 3 270M with a
``SpecGuardCallbackHandler``, prints the totals, and saves the per-step plot; this is how
``docs/tracing_steps.png`` was made. Offline; needs the ``embedded`` and ``plot`` extras.

    python cookbook/trace_steps.py [--out docs/tracing_steps.png] [--threshold 0.5]
"""

from __future__ import annotations

import argparse
import json
import time

from langchain_specguard import ChatSpecGuard
from langchain_specguard.apps.demo import build_chain
from langchain_specguard.callbacks import SpecGuardCallbackHandler

QUESTIONS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "A shelf holds 12 books. Mia takes away 4 books. How many books are on the shelf?",
    "Each bag has 6 marbles. How many marbles are in 3 bags?",
    "Lena had 20 stickers and gave 7 to her brother. How many stickers does she have left?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/tracing_steps.png")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--questions", type=int, default=len(QUESTIONS), help="how many of the questions to ask")
    parser.add_argument("--records", default=None, help="also save the step records here (JSON)")
    args = parser.parse_args()

    llm = ChatSpecGuard(acceptance_threshold=args.threshold, max_tokens=args.max_tokens, step_delimiters=["\n"])
    handler = SpecGuardCallbackHandler()
    chain = build_chain(llm)
    started = time.perf_counter()
    questions = QUESTIONS[: args.questions]
    for question in questions:
        answer = chain.invoke({"question": question}, config={"callbacks": [handler]})
        print(f"Q: {question}\nA: {answer!r}\n")
    print(f"{len(questions)} calls in {time.perf_counter() - started:.1f} s (model load included)")
    print(json.dumps(handler.summary(), indent=1))
    handler.plot(
        args.out,
        title=f"Gemma 3 270M, self-speculative draft (first 15 layers), threshold {args.threshold}: "
        f"{len(questions)} questions",
    )
    if args.records:
        with open(args.records, "w") as handle:
            json.dump({"summary": handler.summary(), "steps": handler.to_records()}, handle, indent=1)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
