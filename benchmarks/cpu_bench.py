"""SpecGuard against the target alone on a CPU: GSM8K prompts, greedy, same process, interleaved.

For every prompt, each SpecGuard configuration runs, then the target's own greedy ``generate()`` writes exactly
as many tokens as the first configuration did (same prompt, same token count), in turn, so a change in the
machine's speed hits every method alike. Reported per method: minimum, median and maximum over the prompts of
tokens per second (wall clock and process CPU time) and the speed against the target alone on the same prompt;
per SpecGuard configuration the steps, accepted steps and every step's verdict (saved in ``--out``), so two runs
(before and after an engine change) can be checked for identical verdicts with ``--compare``.

    # the "before" figures: both pairs at the current code
    PYTHONPATH=. python benchmarks/cpu_bench.py --limit 5 --max-tokens 128 --out before_gemma.json
    PYTHONPATH=. python benchmarks/cpu_bench.py --pair qwen2.5-coder --limit 5 --max-tokens 128 --out before_qwen.json
    # after applying engine changes: the same command, then the verdicts compared
    PYTHONPATH=. python benchmarks/cpu_bench.py --pair qwen2.5-coder --limit 5 --max-tokens 128 --out after_qwen.json \\
        --compare before_qwen.json

``--configs`` runs several SpecGuard configurations side by side, ``;``-separated, each ``field=value,...`` of
``SpecGuardParams`` plus ``draft_layers`` for the embedded pair (e.g. ``"n_candidates=4;n_candidates=1"`` or
``"draft_layers=15;draft_layers=6"``; ``draft_layers`` equal to the target's layer count drafts with the target
itself, which on a CPU means its whole trunk under the subset head); an empty configuration is the engine's
defaults.

``--threads`` sets ``torch.set_num_threads``. Process CPU time counts every thread's work, so with one thread it
is the measure least moved by other processes on a shared machine; wall time is what a user waits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from langchain_specguard.apps.bench import encode_prompts, load_problems, target_alone
from langchain_specguard.apps.fewshot import TERMINATOR
from langchain_specguard.engine import CallOptions, SpecGuardParams, generate
from langchain_specguard.engine.loading import ModelPair, self_speculative_draft

DATA = "/work/shared/data/gsm8k/test.jsonl"
PAIR_KEYS = {"draft_layers"}
"""Configuration keys that shape the pair rather than ``SpecGuardParams`` (a driver script may add its own)."""


def parse_configs(text: str) -> list[dict[str, Any]]:
    """``"n_candidates=1,max_step_tokens=24;draft_layers=6"`` -> one dict of typed values per configuration."""
    configs: list[dict[str, Any]] = []
    for part in text.split(";"):
        config: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in part.split(","))):
            key, _, value = item.partition("=")
            config[key.strip()] = json.loads(value) if value.strip()[:1] in "0123456789-[{tfn" else value.strip()
        configs.append(config)
    return configs


def label(config: dict[str, Any]) -> str:
    return "specguard[" + (",".join(f"{k}={v}" for k, v in config.items()) or "defaults") + "]"


def pair_for(pair: ModelPair, config: dict[str, Any]) -> ModelPair:
    """``pair`` with the configuration's self-speculative draft (its own runtime pool), or ``pair`` itself."""
    layers = config.get("draft_layers")
    if layers is None or layers == pair.draft_layers:
        return pair
    if pair.draft_layers is None:
        raise SystemExit("draft_layers applies to a self-speculative pair (the embedded Gemma)")
    if int(layers) == int(pair.target.config.num_hidden_layers):  # every layer: the target drafts with its own
        return dataclasses.replace(pair, draft=pair.target, draft_layers=int(layers), runtime_pools={})
    draft = self_speculative_draft(pair.target, int(layers))
    return dataclasses.replace(pair, draft=draft, draft_layers=int(layers), runtime_pools={})


def commit() -> str | None:
    """``SPECGUARD_COMMIT`` (a snapshot made by ``git archive``), or the checkout's commit, ``+dirty`` when tracked
    files differ from it (git worktrees included)."""
    if os.environ.get("SPECGUARD_COMMIT"):
        return os.environ["SPECGUARD_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=here).returncode != 0
    except OSError:
        return None
    return (head.stdout.strip() + ("+dirty" if dirty else "")) if head.returncode == 0 else None


def rate(row: dict[str, Any], clock: str) -> float:
    return row["tokens"] / row[clock]


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{min(values):6.2f} {statistics.median(values):6.2f} {max(values):6.2f}"


def load(args: argparse.Namespace) -> tuple[ModelPair, float]:
    started = time.perf_counter()
    if args.pair is None:
        from langchain_specguard.engine.loading import load_embedded_pair

        pair = load_embedded_pair(draft_layers=args.draft_layers, dtype=args.dtype)
    else:
        from langchain_specguard.engine.packaged import load_packaged_pair

        pair = load_packaged_pair(args.pair, dtype=args.dtype)
    return pair, time.perf_counter() - started


def compare(rows: list[dict[str, Any]], path: str) -> list[str]:
    """Where this run's verdicts differ from an earlier run's (same method label, same problem)."""
    before = {(r["method"], r["problem"]): r for r in json.loads(Path(path).read_text())["rows"]}
    found = []
    for row in rows:
        old = before.get((row["method"], row["problem"]))
        if old is None or "verdicts" not in row:
            continue
        same = old["verdicts"] == row["verdicts"] and old["token_ids"] == row["token_ids"]
        found.append(f"{row['method']} problem {row['problem']}: {'identical' if same else 'DIFFERENT'}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default=None, choices=["qwen2.5-coder"], help="default: the embedded Gemma 3 270M")
    parser.add_argument("--draft-layers", type=int, default=15, help="the embedded pair's loaded draft")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--limit", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--stop", action="store_true", help=f"stop at {TERMINATOR!r} (default: write --max-tokens)")
    parser.add_argument("--configs", default="", help="';'-separated SpecGuard configurations (default: defaults)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-target", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--compare", default=None, help="an earlier --out: report whether the verdicts are identical")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pair, load_s = load(args)
    configs = parse_configs(args.configs)
    pairs = [pair_for(pair, c) for c in configs]
    params = [
        SpecGuardParams(**{"max_tokens": args.max_tokens, **{k: v for k, v in c.items() if k not in PAIR_KEYS}})
        for c in configs
    ]
    stop = [TERMINATOR] if args.stop else None
    options = CallOptions(stop=tuple(stop or ()))
    problems = load_problems(args.data, args.offset + args.limit)[args.offset :]
    prompts = encode_prompts(pair, [q for q, _ in problems], "chat")
    header = (
        f"{pair.name} on cpu ({pair.target.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"commit {commit()}); loaded in {load_s:.1f} s; {len(prompts)} problems of {Path(args.data).name} from "
        f"{args.offset}, max_tokens {args.max_tokens}, stop {stop}, greedy"
    )
    print(header, flush=True)
    for p, prm in zip(pairs, params, strict=True):  # warm-up: allocator, lazy initialisation; never timed
        generate(p, prompts[0], prm.model_copy(update={"max_tokens": 4}), options)
    if not args.no_target:
        target_alone(pair, prompts[0], 2)

    rows: list[dict[str, Any]] = []
    for number, prompt in enumerate(prompts, args.offset):
        tokens = None
        for config, p, prm in zip(configs, pairs, params, strict=True):
            started, cpu = time.perf_counter(), time.process_time()
            result = generate(p, prompt, prm, options)
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            tokens = len(result.token_ids) if tokens is None else tokens
            steps = result.steps
            rows.append(
                {
                    "method": label(config),
                    "problem": number,
                    "tokens": len(result.token_ids),
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "steps": len(steps),
                    "accepted": sum(s.accepted for s in steps),
                    "draft_s": sum(s.draft_seconds for s in steps),
                    "verify_s": sum(s.verify_seconds for s in steps),
                    "write_s": sum(s.target_seconds for s in steps),
                    "verdicts": [[s.source, s.num_tokens, s.score] for s in steps],
                    "token_ids": result.token_ids,
                }
            )
        if not args.no_target:
            assert tokens is not None
            wall, cpu = target_alone(pair, prompt, tokens)
            rows.append({"method": "target", "problem": number, "tokens": tokens, "wall_s": wall, "cpu_s": cpu})
        print(
            f"problem {number}: "
            + ", ".join(f"{r['method']} {r['tokens']} tok {r['wall_s']:.1f} s ({r['cpu_s']:.1f} cpu s)"
                        for r in rows if r["problem"] == number),
            flush=True,
        )  # fmt: skip

    target = {r["problem"]: r for r in rows if r["method"] == "target"}
    lines = [
        header,
        "min / median / max over problems; speed = the method's tokens/s over the target alone's on the same problem "
        "(the target writes as many tokens as the first configuration)",
        f"{'method':<48} {'tok/s (wall)':>20} {'tok/s (cpu)':>20} {'speed (wall)':>20} {'speed (cpu)':>20}  "
        "accepted steps",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        tps_wall = [r["tokens"] / r["wall_s"] for r in mine]
        tps_cpu = [r["tokens"] / r["cpu_s"] for r in mine]
        vs = [r for r in mine if r["problem"] in target and method != "target"]
        speed_wall = [rate(r, "wall_s") / rate(target[r["problem"]], "wall_s") for r in vs]
        speed_cpu = [rate(r, "cpu_s") / rate(target[r["problem"]], "cpu_s") for r in vs]
        accepted = f"{sum(r['accepted'] for r in mine)}/{sum(r['steps'] for r in mine)}" if "steps" in mine[0] else "-"
        lines.append(
            f"{method:<48} {spread(tps_wall):>20} {spread(tps_cpu):>20} {spread(speed_wall):>20} "
            f"{spread(speed_cpu):>20}  {accepted}"
        )  # fmt: skip
    if args.compare:
        lines += ["verdicts against " + args.compare + ":", *compare(rows, args.compare)]
    print("\n".join(lines))
    if args.out:
        result = {"command": " ".join(sys.argv), "summary": lines, "load_s": load_s, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
