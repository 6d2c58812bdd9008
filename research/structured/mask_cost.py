"""What schema-constrained decoding costs per token: the same prompt with and without the grammar, side by side.

Runs the embedded Gemma 3 270M pair (the ``embedded`` and ``structured`` extras) on the CPU, greedy, alternating
constrained and free calls so both see the same machine load, under two step rules: the default (threshold 0.5:
steps accepted and written) and every step written by the target (threshold 2.0: the target's own decoding, sped
up by the draft). It also times the grammar's own host work (masks computed, masks applied, the matcher advanced)
by wrapping the functions that do it, so the cost of the mask is read directly, not only as a difference of two
noisy totals.

    python -m research.structured.mask_cost [--repeats 3] [--max-tokens 64] [--out research/structured/results/...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from langchain_core.messages import HumanMessage
from pydantic import BaseModel, Field

from langchain_specguard import ChatSpecGuard
from langchain_specguard.binding import compiled_schema
from langchain_specguard.engine import CallOptions, generate, grammar, judge, runner
from langchain_specguard.engine.grammar import Cursor, GrammarState, grammar_tokenizer


class Person(BaseModel):
    name: str = Field(description="the person's name")
    age: int = Field(description="age in years")
    city: str = Field(description="where the person lives")


PROMPT = (
    "Describe this person as a JSON object with the keys name, age and city: Ada Lovelace, 36 years old, "
    "lives in London."
)


class Timer:
    """Seconds spent in wrapped functions (the grammar's host work), by name; a wrapped call inside another counts
    toward the outer one only, so the parts add up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.inside = False

    def wrap(self, owner: Any, name: str, label: str) -> Callable[[], None]:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.inside:
                return original(*args, **kwargs)
            self.inside = True
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.inside = False
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


@contextlib.contextmanager
def timed_grammar(timer: Timer) -> Iterator[None]:
    """Time the grammar's work: the draft rows' masks and their cursors' advance, applying the masks to the draft's
    logits (inside its decode iteration: eager on the CPU, so the wrapper sees it), the target rows' masks (cursors
    included), applying them to the target's logits, committing."""
    undo = [
        timer.wrap(runner, "constrain", "apply to draft logits"),
        timer.wrap(grammar, "masks", "draft masks"),
        timer.wrap(Cursor, "push", "cursors advanced"),
        timer.wrap(GrammarState, "cursor", "cursors made"),
        timer.wrap(GrammarState, "bitmask_along", "target masks"),
        timer.wrap(judge, "constrain", "apply to target logits"),
        timer.wrap(GrammarState, "commit", "advance on commit"),
    ]
    try:
        yield
    finally:
        for restore in undo:
            restore()


def run(llm: ChatSpecGuard, prompt: list[int], threshold: float, constrained: bool, max_tokens: int) -> dict[str, Any]:
    pair = llm.load()
    params = llm.engine_params(acceptance_threshold=threshold, max_tokens=max_tokens)
    options = CallOptions(grammar=compiled_schema(json.dumps(Person.model_json_schema()), "Person"))
    timer = Timer()
    with timed_grammar(timer) if constrained else contextlib.nullcontext():
        result = generate(pair, prompt, params, options if constrained else CallOptions())
    tokens = len(result.token_ids)
    return {
        "constrained": constrained,
        "threshold": threshold,
        "tokens": tokens,
        "steps": len(result.steps),
        "seconds": result.seconds,
        "ms_per_token": 1000 * result.seconds / max(tokens, 1),
        "phase_ms_per_token": {
            phase: 1000 * sum(getattr(step, f"{phase}_seconds") for step in result.steps) / max(tokens, 1)
            for phase in ("draft", "verify", "target")
        },
        "accepted_share": result.summary["accepted_share"],
        # the draft's decode loop per position it computed (rows x iterations): the same work with or without the
        # grammar, whatever the two calls' texts, step counts and lengths
        "draft_ms_per_drafted_position": 1000
        * sum(step.draft_seconds for step in result.steps)
        / max(sum(step.drafted_tokens for step in result.steps), 1),
        "target_ms_per_forward": 1000
        * sum(step.verify_seconds + step.target_seconds for step in result.steps)
        / max(sum(step.target_forwards for step in result.steps), 1),
        "grammar_ms_per_token": {k: 1000 * v / max(tokens, 1) for k, v in timer.seconds.items()},
        "text": result.text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("research/structured/results/mask_cost_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    llm = ChatSpecGuard(step_delimiters=["\n"])
    started = time.perf_counter()
    pair = llm.load()
    print(f"loaded the embedded pair in {time.perf_counter() - started:.1f} s")
    prompt = llm.render_prompt([HumanMessage(PROMPT)])
    started = time.perf_counter()
    grammar_tokenizer(pair.tokenizer, pair.eos_token_ids)
    print(f"grammar tokenizer (once per process): {time.perf_counter() - started:.2f} s")
    runs = []
    for threshold in (0.5, 2.0):
        run(llm, prompt, threshold, True, args.max_tokens)  # warm-up, both ways
        run(llm, prompt, threshold, False, args.max_tokens)
        for _ in range(args.repeats):
            constrained = run(llm, prompt, threshold, True, args.max_tokens)
            free = run(llm, prompt, threshold, False, args.max_tokens)
            runs += [constrained, free]
            for item in (constrained, free):
                print({k: v for k, v in item.items() if k != "text"})
    summary = []
    for threshold in (0.5, 2.0):
        row: dict[str, Any] = {"threshold": threshold}
        for constrained in (False, True):
            mine = [r for r in runs if r["threshold"] == threshold and r["constrained"] == constrained]
            key = "constrained" if constrained else "free"
            row[f"{key}_ms_per_token"] = statistics.median(r["ms_per_token"] for r in mine)
            for measure in ("draft_ms_per_drafted_position", "target_ms_per_forward"):
                row[f"{key}_{measure}"] = statistics.median(r[measure] for r in mine)
            row[f"{key}_tokens"] = mine[0]["tokens"]
            row[f"{key}_text"] = mine[0]["text"]
            if constrained:
                parts = mine[0]["grammar_ms_per_token"]
                row["grammar_ms_per_token"] = {k: statistics.median(r["grammar_ms_per_token"][k] for r in mine)
                                               for k in parts}  # fmt: skip
                row["grammar_total_ms_per_token"] = sum(row["grammar_ms_per_token"].values())
        summary.append(row)
        print(json.dumps(row, indent=1))
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "dtype": str(pair.target.dtype)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "summary": summary, "runs": runs}, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
