"""The main job: a real LCEL chain (prompt | ChatSpecGuard | parser) on a pair installed from PyPI.

Runs offline: by default the embedded Gemma 3 270M (the ``embedded`` extra) with its first layers as the
draft; ``--pair qwen2.5-coder`` runs the Qwen2.5-Coder 1.5B/0.5B instruct pair (the ``qwen-coder`` extra;
on two CPU cores loading takes minutes and decoding about a token a second). Prints the answer and a
per-step table of who wrote each step and how the draft's step scored.

    python -m langchain_specguard.apps.demo [--pair qwen2.5-coder] [--question "..."] [--threshold 0.5]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from ..callbacks import SpecGuardCallbackHandler
from ..chat_models import ChatSpecGuard
from ..engine import prepare
from .bench import target_alone
from .fewshot import DEFAULT_QUESTION, TERMINATOR, chat_messages, trim_to_answer


class StepTable(SpecGuardCallbackHandler):
    """Collects the ``specguard_step`` events of a run to print them as a table."""

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.to_records()

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


def build_chain(llm: ChatSpecGuard) -> Any:
    roles = {"system": "system", "user": "human", "assistant": "ai"}
    messages = [(roles[m["role"]], m["content"]) for m in chat_messages("{question}")]
    return ChatPromptTemplate.from_messages(messages) | llm | StrOutputParser() | RunnableLambda(trim_to_answer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--pair", default=None, choices=["qwen2.5-coder"], help="default: the embedded Gemma 3 270M")
    parser.add_argument("--threshold", type=float, default=None, help="acceptance_threshold (default: the engine's)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "--decision",
        default="confidence",
        choices=["confidence", "both", "weighted"],
        help="what a step's score is ('both' also measures attention grounding)",
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    options = {} if args.threshold is None else {"acceptance_threshold": args.threshold}
    llm = ChatSpecGuard(
        pair=args.pair, decision=args.decision, max_tokens=args.max_tokens, stop_sequences=[TERMINATOR], **options
    )
    pair = llm.load()
    prepare(pair, llm.engine_params())  # the draft's device views (int8 on a CPU): loading, not the call's time
    draft = f"its first {pair.draft_layers} layers" if pair.draft_layers else llm.draft_name
    print(f"loaded {llm.model_name} (draft: {draft}) in {time.perf_counter() - started:.1f} s")

    table = StepTable()
    started = time.perf_counter()
    answer = build_chain(llm).invoke({"question": args.question}, config={"callbacks": [table]})
    seconds = time.perf_counter() - started
    print(f"\nQ: {args.question}\nA: {answer}\n")
    print(table.render())
    accepted = sum(s["accepted"] for s in table.steps)
    tokens = sum(s["num_tokens"] for s in table.steps)
    print(
        f"\n{len(table.steps)} steps, {accepted} accepted from the draft, {tokens} tokens in {seconds:.1f} s "
        f"(threshold {llm.acceptance_threshold})"
    )
    print(f"the target alone, same prompt and token count: {target_alone_seconds(llm, args.question, tokens):.1f} s")
    return 0


def target_alone_seconds(llm: ChatSpecGuard, question: str, tokens: int) -> float:
    """Seconds the target takes to write ``tokens`` tokens by itself (transformers' greedy ``generate``)."""
    from langchain_core.messages import convert_to_messages

    prompt = llm.render_prompt(convert_to_messages([(m["role"], m["content"]) for m in chat_messages(question)]))
    return target_alone(llm.load(), prompt, tokens)[0]


if __name__ == "__main__":
    raise SystemExit(main())
