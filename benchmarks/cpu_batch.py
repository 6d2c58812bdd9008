"""``batch()`` of N prompts against N ``invoke()`` calls in a row, on a CPU, as a LangChain user runs them.

One ``ChatSpecGuard`` on the embedded Gemma pair (or ``--pair qwen2.5-coder``), greedy, GSM8K test questions. The
N invokes run first, then ``batch()`` of the same N prompts (its calls share batched passes, docs/engine.md "Many
calls, one batch"), then the invokes again, so a change in the machine's speed shows as a gap between the two
invoke rounds. Greedy batched calls must answer exactly as alone: the script checks the texts are equal.

    PYTHONPATH=. python benchmarks/cpu_batch.py --calls 8 --max-tokens 64 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from langchain_specguard import ChatSpecGuard
from langchain_specguard.apps.bench import load_problems

DATA = "/work/shared/data/gsm8k/test.jsonl"


def timed(run: Any) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default=None, choices=["qwen2.5-coder"], help="default: the embedded Gemma 3 270M")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ChatSpecGuard(model=args.pair, max_tokens=args.max_tokens) if args.pair else ChatSpecGuard(
        max_tokens=args.max_tokens)  # fmt: skip
    questions = [q for q, _ in load_problems(args.data, args.calls)]
    model.invoke(questions[0])  # load and warm outside the timings
    rows = []
    first = timed(lambda: [model.invoke(q) for q in questions])
    batched = timed(lambda: model.batch(questions))
    second = timed(lambda: [model.invoke(q) for q in questions])
    alone = [m.content for m in first[2]]
    same = alone == [m.content for m in batched[2]] == [m.content for m in second[2]]
    tokens = sum(m.usage_metadata["output_tokens"] for m in first[2] if m.usage_metadata)
    for name, (wall, cpu, _) in (("invokes", first), ("batch", batched), ("invokes again", second)):
        rows.append({"method": name, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tokens": tokens})
        print(f"{name:<14} {args.calls} calls  wall {wall:7.2f} s  process CPU {cpu:7.2f} s  ({tokens} tokens)")
    invokes = (first[0] + second[0]) / 2
    print(f"batch() over the mean of the invoke rounds: {batched[0] / invokes:.2f}x the wall time; "
          f"answers identical to the invokes: {same}")  # fmt: skip
    if args.out:
        result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args), "rows": rows,
                  "identical": same}  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
