"""A step against a served target: round trips, judge() seconds, the local draft's proposal, the target alone.

The target is the packaged Qwen2.5-Coder-1.5B served by vLLM's CPU build on 127.0.0.1 (tests/served_server.py);
the draft is the packaged 0.5B, loaded locally by transformers from its GGUF as the engine loads it (float32).
The context is a chat prompt plus the first ``--context`` tokens of the served target's own greedy answer, so
the step under test sits mid-answer, as a real step does. For each step length ``k``:

* ``judge``: one request judging the target's own next ``k`` tokens (an accepted step);
* ``judge+write``: a rejected step: the judgement of a step changed at its middle token, then the server
  writing the rest of the step (``k / 2`` tokens) from the kept prefix;
* ``draft``: the local draft proposing ``k`` tokens greedily from a cache holding the context (its cost per step);
* ``target alone``: the served target writing ``k`` tokens by itself (one completion request).

Round trips are counted by the client (``ServedTarget.round_trips``). Each cell is the median of ``--repeats``
runs, interleaved so that machine load hits all alike. Prints a table, and writes it with the raw times as JSON.

    PYTHONPATH=. python benchmarks/served_step.py [--steps 8 12 16 20] [--repeats 3] [--out benchmarks/results/...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from langchain_specguard.engine.packaged import QWEN_CODER, assemble, cache_dir
from langchain_specguard.engine.served import ServedTarget
from tests.served_server import VLLMServer, exported

QUESTION = "Write a Python function that checks whether a number is prime, and explain how it works."


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def draft_proposal(model: Any, context: list[int], k: int) -> tuple[float, list[int]]:
    """The draft's greedy ``k`` tokens after ``context``, timed from a cache already holding the context."""
    with torch.inference_mode():
        cache = DynamicCache()
        out = model(torch.tensor([context[:-1]]), past_key_values=cache, use_cache=True)
        start = time.perf_counter()
        token, tokens = context[-1], []
        for _ in range(k):
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
        return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 12, 16, 20])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--context", type=int, default=48, help="answer tokens before the step")
    parser.add_argument("--out", default="benchmarks/results/served_step_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(exported("target"))
    folder = cache_dir(QWEN_CODER)
    draft_file = assemble(QWEN_CODER.draft, folder, QWEN_CODER.extra)
    draft = AutoModelForCausalLM.from_pretrained(folder, gguf_file=draft_file.name, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    prompt = list(tokenizer(text, add_special_tokens=False)["input_ids"])

    rows: dict[int, dict[str, list[float]]] = {k: {} for k in args.steps}
    trips: dict[int, dict[str, int]] = {k: {} for k in args.steps}
    with VLLMServer(exported("target"), "qwen-1.5b") as server, ServedTarget(server.url, timeout=600) as target:
        longest = max(args.steps)
        answer = target.write(prompt, args.context + longest).tokens
        context = prompt + answer[: args.context]
        target.judge(context, answer[args.context : args.context + 4])  # warm the server up
        target.write(context, 2)
        for _ in range(args.repeats):
            for k in args.steps:
                step = answer[args.context : args.context + k]
                cell = rows[k]
                before = target.round_trips
                seconds, judged = timed(lambda step=step: target.judge(context, step))
                assert judged.accepted() == (k, judged.choices[k].item()), "the target's own step is kept whole"
                cell.setdefault("judge", []).append(seconds)
                trips[k]["judge"] = target.round_trips - before

                middle = k // 2
                changed = [*step[:middle], (step[middle] + 1) % len(tokenizer), *step[middle + 1 :]]
                before = target.round_trips
                start = time.perf_counter()
                kept = target.judge(context, changed).accepted()
                written = target.write(context + changed[: kept.kept], k - kept.kept)
                cell.setdefault("judge+write", []).append(time.perf_counter() - start)
                trips[k]["judge+write"] = target.round_trips - before
                assert kept.kept == middle and written.tokens == step[middle:], "the server writes its own step"

                seconds, _ = draft_proposal(draft, context, k)
                cell.setdefault("draft", []).append(seconds)

                before = target.round_trips
                seconds, alone = timed(lambda k=k: target.write(context, k))
                assert alone.tokens == step
                cell.setdefault("target alone", []).append(seconds)
                trips[k]["target alone"] = target.round_trips - before

    medians = {k: {name: statistics.median(times) for name, times in cell.items()} for k, cell in rows.items()}
    head = f"{'k':>3} | {'round trips (acc/rej)':>21} | {'judge s':>8} | {'judge+write s':>13} | {'draft s':>8} |"
    head += f" {'draft+judge s':>13} | {'1.5B alone s':>12}"
    lines = [
        f"served target: Qwen2.5-Coder-1.5B (float32, vLLM-CPU {server_version()}) on 127.0.0.1; local draft: "
        f"Qwen2.5-Coder-0.5B GGUF via transformers, float32; context {len(context)} tokens; "
        f"median of {args.repeats}; {platform.machine()}, {os.cpu_count()} cores (shared)",
        head,
        "-" * len(head),
    ]
    for k, m in medians.items():
        both = f"{trips[k]['judge']}/{trips[k]['judge+write']}"
        lines.append(
            f"{k:>3} | {both:>21} | {m['judge']:>8.2f} | {m['judge+write']:>13.2f} | {m['draft']:>8.2f} |"
            f" {m['draft'] + m['judge']:>13.2f} | {m['target alone']:>12.2f}"
        )
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = {"table": lines, "medians": medians, "round_trips": trips, "raw": rows, "context_tokens": len(context)}
    Path(args.out).write_text(json.dumps(report, indent=2))


def server_version() -> str:
    from tests.served_server import server_python

    python = server_python()
    if python is None:
        return "?"
    import subprocess

    return subprocess.run(
        [str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True, check=False
    ).stdout.strip()


if __name__ == "__main__":
    main()
