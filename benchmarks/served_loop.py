"""Whole calls against a served target: ChatSpecGuard (served 1.5B judging, local 0.5B drafting) against the served
1.5B writing the same number of tokens by itself.

The target is the packaged Qwen2.5-Coder-1.5B served by vLLM's CPU build on 127.0.0.1 (tests/served_server.py,
float32); the draft is the packaged 0.5B loaded locally from its GGUF by transformers (float32), as the engine
loads it. For each GSM8K test question (greedy, the engine's defaults otherwise): one ``ChatSpecGuard.invoke``
through the step loop, counting steps, accepted steps and the client's round trips; then the served target alone
writing as many tokens after the same prompt in one completion request. Interleaved per question, so the machine's
load hits both alike. Prints a table and writes it with the raw numbers as JSON.

    PYTHONPATH=. python benchmarks/served_loop.py --limit 5 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from langchain_core.messages import HumanMessage
from transformers import AutoModelForCausalLM, AutoTokenizer

from langchain_specguard import ChatSpecGuard, SpecGuardCallbackHandler
from langchain_specguard.apps.bench import load_problems
from langchain_specguard.engine.packaged import QWEN_CODER, assemble, cache_dir
from langchain_specguard.engine.served import ServedTarget
from tests.served_server import VLLMServer, exported

DATA = "/work/shared/data/gsm8k/test.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--limit", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="this process's torch threads (the server has its own)")
    parser.add_argument("--out", default="benchmarks/results/served_loop_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(exported("target"))
    folder = cache_dir(QWEN_CODER)
    draft_file = assemble(QWEN_CODER.draft, folder, QWEN_CODER.extra)
    draft = AutoModelForCausalLM.from_pretrained(folder, gguf_file=draft_file.name, dtype=torch.float32).eval()
    questions = [q for q, _ in load_problems(args.data, args.limit)]
    rows = []
    with VLLMServer(exported("target"), "qwen-1.5b", max_model_len=2048) as server:
        llm = ChatSpecGuard(target_url=server.url, model=server.name, draft_model=draft, tokenizer=tokenizer,
                            device="cpu", max_tokens=args.max_tokens,
                            target_server_options={"timeout": 900})  # fmt: skip
        with ServedTarget(server.url, timeout=900) as alone:
            llm.invoke("Hi")  # loads, and warms the server and the draft
            alone.write(llm.render_prompt([HumanMessage("Hi")]), 4)
            for question in questions:
                prompt = llm.render_prompt([HumanMessage(question)])
                events = SpecGuardCallbackHandler()
                loaded = llm._pairs().pair  # the loaded pair: its client's round trips are the loop's requests
                served = loaded.served if loaded is not None else None
                trips = served.round_trips if served is not None else 0
                start = time.perf_counter()
                llm.invoke(question, config={"callbacks": [events]})
                specguard = time.perf_counter() - start
                steps = events.to_records()
                tokens = sum(s["num_tokens"] for s in steps)
                requests = (served.round_trips - trips) if served is not None else 0
                start = time.perf_counter()
                written = alone.write(prompt, tokens)
                target = time.perf_counter() - start
                row = {
                    "prompt_tokens": len(prompt), "tokens": tokens, "target_tokens": len(written.tokens),
                    "steps": len(steps), "accepted": sum(bool(s["accepted"]) for s in steps), "requests": requests,
                    "specguard_s": specguard, "target_alone_s": target,
                    "speed": (tokens / specguard) / (len(written.tokens) / target),
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    speeds = [r["speed"] for r in rows]
    lines = [
        f"served target: Qwen2.5-Coder-1.5B (float32, vLLM-CPU) on 127.0.0.1; local draft: Qwen2.5-Coder-0.5B GGUF "
        f"via transformers, float32, {args.threads} thread(s); GSM8K test, first {args.limit}; greedy, "
        f"<= {args.max_tokens} tokens; {platform.machine()}, {os.cpu_count()} cores",
        f"{'tokens':>6} {'steps':>5} {'kept':>4} {'requests':>8} {'SpecGuard s':>11} {'1.5B alone s':>12} {'speed':>6}",
    ]
    for r in rows:
        lines.append(f"{r['tokens']:>6} {r['steps']:>5} {r['accepted']:>4} {r['requests']:>8} "
                     f"{r['specguard_s']:>11.2f} {r['target_alone_s']:>12.2f} {r['speed']:>5.2f}x")  # fmt: skip
    lines.append(f"median speed (tokens/s against the served 1.5B alone): {statistics.median(speeds):.2f}x "
                 f"[{min(speeds):.2f}-{max(speeds):.2f}]")  # fmt: skip
    print("\n".join(lines))
    Path(args.out).write_text(json.dumps({"rows": rows, "args": vars(args), "table": lines}, indent=2))
    Path(args.out).with_suffix(".txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
