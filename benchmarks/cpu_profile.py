"""Where a CPU call's time goes: SpecGuard against the target alone on GSM8K prompts, profiled.

Loads a pair as ``ChatSpecGuard`` does (the embedded Gemma 3 270M with its first ``--draft-layers`` layers,
or ``--pair qwen2.5-coder``), times the load in stages with the resident memory after each, then runs
SpecGuard and the target's own greedy ``generate()`` on the same few-shot GSM8K prompts, interleaved
problem by problem, the target writing exactly as many tokens as SpecGuard did. Prints:

- the load: GGUF assembly, each model's ``from_pretrained`` (GGUF dequantisation), resident memory;
- per problem: tokens, seconds of each method, SpecGuard's draft / verify / target-write seconds, steps
  and accepted steps;
- cProfile of the SpecGuard calls (the top functions by own time and by cumulative time);
- torch.profiler of one SpecGuard call, operators by CPU time (``--torch-profile``).

    PYTHONPATH=. python benchmarks/cpu_profile.py --limit 3 --max-tokens 128 --out benchmarks/results/x.txt
    PYTHONPATH=. python benchmarks/cpu_profile.py --pair qwen2.5-coder --limit 3 --max-tokens 128

Timings on a shared machine move with its load: compare only rows of one run.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import dataclasses
import gc
import io
import json
import pstats
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from langchain_specguard.apps.bench import encode_prompts, load_problems, target_alone
from langchain_specguard.apps.fewshot import TERMINATOR
from langchain_specguard.engine import CallOptions, SpecGuardParams, generate
from langchain_specguard.engine.loading import ModelPair, self_speculative_draft

DATA = "/work/shared/data/gsm8k/test.jsonl"


def rss_gb() -> float:
    return psutil.Process().memory_info().rss / 1e9


@dataclass
class Loaded:
    pair: ModelPair
    stages: list[tuple[str, float, float]] = field(default_factory=list)  # (stage, seconds, RSS GB after)


def load(pair_name: str | None, draft_layers: int, dtype: str | None) -> Loaded:
    """The pair as ``ChatSpecGuard`` loads it, timed stage by stage."""
    stages: list[tuple[str, float, float]] = []
    started = time.perf_counter()
    if pair_name is None:
        from langchain_specguard.engine.loading import embedded_gguf_path, load_embedded_pair

        embedded_gguf_path()
        stages.append(("assemble GGUF", time.perf_counter() - started, rss_gb()))
        mark = time.perf_counter()
        pair = load_embedded_pair(dtype=dtype)
        if draft_layers == int(pair.target.config.num_hidden_layers):  # every layer: the target drafts itself
            pair = dataclasses.replace(pair, draft=pair.target, draft_layers=draft_layers, runtime_pools={})
        elif draft_layers != pair.draft_layers:
            draft = self_speculative_draft(pair.target, draft_layers)
            pair = dataclasses.replace(pair, draft=draft, draft_layers=draft_layers, runtime_pools={})
        stages.append(("from_pretrained (GGUF dequantised) + tokenizer", time.perf_counter() - mark, rss_gb()))
    else:
        from langchain_specguard.engine import packaged

        spec = packaged.PACKAGED_PAIRS[pair_name]
        folder = packaged.cache_dir(spec)
        for model in (spec.target, spec.draft):
            packaged.assemble(model, folder, spec.extra)
        stages.append(("assemble GGUFs (sha256 checked)", time.perf_counter() - started, rss_gb()))
        mark = time.perf_counter()
        pair = packaged.load_packaged_pair(pair_name, dtype=dtype)
        stages.append(("from_pretrained x2 (GGUF dequantised) + tokenizer", time.perf_counter() - mark, rss_gb()))
    stages.append(("total", time.perf_counter() - started, rss_gb()))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the conversion's freed buffers still hold, given back
    stages.append(("after gc + malloc_trim (measured, not what ChatSpecGuard does)", 0.0, rss_gb()))
    return Loaded(pair, stages)


def params_from(args: argparse.Namespace) -> SpecGuardParams:
    given: dict[str, Any] = {"max_tokens": args.max_tokens}
    if args.draft_vocab is not None:
        given["draft_vocab"] = args.draft_vocab
    if args.n_candidates is not None:
        given["n_candidates"] = args.n_candidates
    if args.max_step_tokens is not None:
        given["max_step_tokens"] = args.max_step_tokens
    return SpecGuardParams(**given)


class PassTimes:
    """Process-CPU seconds of every model pass of the SpecGuard calls, by model and shape: each draft decode
    iteration (rows), each forward pass (the model, rows and tokens fed). Installed around the engine's runner."""

    def __init__(self, pair: ModelPair) -> None:
        from langchain_specguard.engine import runner

        self.table: dict[tuple[str, int, int], list[float]] = {}
        self.on = False
        table, pool_of = self.table, runner.ModelRunner

        layers = pair.target.config.num_hidden_layers

        def role(r: Any) -> str:
            draft = r.subset is not None or r.width > 1 or r.view.config.num_hidden_layers != layers
            return "draft" if draft else "target"

        original_decode, original_forward = pool_of.decode, pool_of.forward
        timer = self

        def decode(r: Any, n: int, *args: Any, **kwargs: Any) -> None:
            if not timer.on:
                return original_decode(r, n, *args, **kwargs)
            for _ in range(n):
                started = time.process_time()
                original_decode(r, 1, *args, **kwargs)
                rows = len(range(*r.decoding.indices(r.batch)))
                table.setdefault((f"{role(r)} decode", rows, 1), []).append(time.process_time() - started)
            return None

        def forward(r: Any, fed: Any, *args: Any, **kwargs: Any) -> Any:
            if not timer.on:
                return original_forward(r, fed, *args, **kwargs)
            started = time.process_time()
            out = original_forward(r, fed, *args, **kwargs)
            q = max((len(f) for f in fed), default=0)
            if q:
                rows = sum(1 for f in fed if f)
                table.setdefault((f"{role(r)} forward", rows, q), []).append(time.process_time() - started)
            return out

        pool_of.decode, pool_of.forward = decode, forward  # type: ignore[method-assign,assignment]

    def report(self) -> str:
        lines = [f"{'pass':<16} {'rows':>4} {'tokens':>6} {'count':>6} {'cpu s':>8} {'ms each':>8}"]
        total = sum(sum(v) for v in self.table.values())
        for (name, rows, q), times in sorted(self.table.items(), key=lambda kv: -sum(kv[1])):
            lines.append(
                f"{name:<16} {rows:>4} {q:>6} {len(times):>6} {sum(times):8.2f} {1e3 * sum(times) / len(times):8.1f}"
            )
        lines.append(f"all passes: {total:.2f} cpu s")
        return "\n".join(lines)


def torch_profile(pair: ModelPair, prompt: list[int], params: SpecGuardParams, options: CallOptions) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        generate(pair, prompt, params, options)
    averages = prof.key_averages()
    by_op = averages.table(sort_by="self_cpu_time_total", row_limit=25)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25)
    return f"operators by self CPU time\n{by_op}\noperators and input shapes by self CPU time\n{by_shape}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default=None, choices=["qwen2.5-coder"], help="default: the embedded Gemma 3 270M")
    parser.add_argument(
        "--draft-layers", type=int, default=15, help="embedded pair: draft with the first k layers (all: the target)"
    )
    parser.add_argument("--dtype", default=None, help="default: the engine's (float32 on a CPU)")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--offset", type=int, default=0, help="skip this many problems of --data")
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--stop", action="store_true", help=f"stop at {TERMINATOR!r} (default: write --max-tokens)")
    parser.add_argument("--n-candidates", type=int, default=None)
    parser.add_argument("--max-step-tokens", type=int, default=None)
    parser.add_argument("--draft-vocab", type=int, default=None, help="the draft's subset head (default: engine's)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-target", action="store_true", help="skip the target-alone runs")
    parser.add_argument("--cprofile", action="store_true", help="profile the SpecGuard calls with cProfile")
    parser.add_argument("--passes", action="store_true", help="time every model pass of the SpecGuard calls")
    parser.add_argument("--torch-profile", action="store_true", help="torch.profiler over one more SpecGuard call")
    parser.add_argument("--out", default=None, help="also write the report here")
    parser.add_argument("--json", default=None, help="write per-problem rows as JSON here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"command: {' '.join(sys.argv)}")
    say(
        f"torch {torch.__version__}, threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {psutil.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in psutil.getloadavg())}"
    )
    loaded = load(args.pair, args.draft_layers, args.dtype)
    pair = loaded.pair
    draft = f"first {pair.draft_layers} layers" if pair.draft_layers else "own model"
    say(f"pair {pair.name}, draft {draft}")
    say(f"dtype {pair.target.dtype}")
    for stage, seconds, rss in loaded.stages:
        say(f"  load: {stage:<52} {seconds:7.1f} s   RSS {rss:5.2f} GB")

    params = params_from(args)
    stop = [TERMINATOR] if args.stop else None
    options = CallOptions(stop=tuple(stop or ()))
    problems = load_problems(args.data, args.offset + args.limit)[args.offset :]
    prompts = encode_prompts(pair, [q for q, _ in problems], "chat")
    say(
        f"{len(prompts)} problems from {Path(args.data).name} (offset {args.offset}), prompt tokens "
        f"{[len(p) for p in prompts]}; n_candidates {params.n_candidates} (None: the device's), draft_vocab "
        f"{params.draft_vocab} (None: the device's), max_step_tokens {params.max_step_tokens}, "
        f"max_tokens {params.max_tokens}, stop {stop}"
    )

    started = time.perf_counter()
    generate(pair, prompts[0], params.model_copy(update={"max_tokens": 8}), options)  # warm-up, never timed
    if not args.no_target:
        target_alone(pair, prompts[0], 4)
    say(f"warm-up {time.perf_counter() - started:.1f} s")

    profiler = cProfile.Profile() if args.cprofile else None
    passes = PassTimes(pair) if args.passes else None
    rows: list[dict[str, Any]] = []
    say(
        "problem  tokens  specguard_s  target_s  ratio  sg_cpu_s  tgt_cpu_s  draft_s  verify_s  write_s  steps  "
        "accepted  drafted  target_fwd  kept  speculated"
    )
    for number, prompt in enumerate(prompts):
        if profiler is not None:
            profiler.enable()
        if passes is not None:
            passes.on = True
        t0, c0 = time.perf_counter(), time.process_time()
        result = generate(pair, prompt, params, options)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if profiler is not None:
            profiler.disable()
        if passes is not None:
            passes.on = False
        tokens = len(result.token_ids)
        alone, alone_cpu = target_alone(pair, prompt, tokens) if not args.no_target else (float("nan"),) * 2
        steps = result.steps
        row = {
            "problem": args.offset + number,
            "tokens": tokens,
            "specguard_s": seconds,
            "target_s": alone,
            "specguard_cpu_s": cpu,
            "target_cpu_s": alone_cpu,
            "draft_s": sum(s.draft_seconds for s in steps),
            "verify_s": sum(s.verify_seconds for s in steps),
            "write_s": sum(s.target_seconds for s in steps),
            "steps": len(steps),
            "accepted": sum(s.accepted for s in steps),
            "drafted": sum(s.drafted_tokens for s in steps),
            "target_forwards": sum(s.target_forwards for s in steps),
            "kept": sum(s.kept_tokens for s in steps),
            "speculated": sum(s.speculated_tokens for s in steps),
            "verdicts": [(s.source, s.num_tokens, round(s.score, 6)) for s in steps],
            "text": result.text,
        }
        rows.append(row)
        say(
            f"{row['problem']:>7}  {tokens:>6}  {seconds:11.2f}  {alone:8.2f}  {alone / seconds:5.2f}  {cpu:8.2f}  "
            f"{alone_cpu:9.2f}  "
            f"{row['draft_s']:7.2f}  {row['verify_s']:8.2f}  {row['write_s']:7.2f}  {row['steps']:>5}  "
            f"{row['accepted']:>8}  {row['drafted']:>7}  {row['target_forwards']:>10}  {row['kept']:>4}  "
            f"{row['speculated']:>10}"
        )
    total = {
        k: sum(r[k] for r in rows)
        for k in (
            "tokens",
            "specguard_s",
            "target_s",
            "specguard_cpu_s",
            "target_cpu_s",
            "draft_s",
            "verify_s",
            "write_s",
        )
    }
    say(
        f"total: {total['tokens']} tokens; SpecGuard {total['specguard_s']:.1f} s "
        f"({total['tokens'] / total['specguard_s']:.2f} tok/s), target alone {total['target_s']:.1f} s "
        f"({total['tokens'] / total['target_s']:.2f} tok/s); process CPU s: SpecGuard {total['specguard_cpu_s']:.1f}, "
        f"target {total['target_cpu_s']:.1f}; SpecGuard's time: "
        + ", ".join(f"{k} {100 * total[f'{k}_s'] / total['specguard_s']:.0f}%" for k in ("draft", "verify", "write"))
    )
    for clock in ("", "_cpu"):
        ratios = [r[f"target{clock}_s"] / r[f"specguard{clock}_s"] for r in rows]
        say(
            f"speed vs target ({'process CPU' if clock else 'wall'} seconds, target's over SpecGuard's): median "
            f"{statistics.median(ratios):.2f}, min {min(ratios):.2f}, max {max(ratios):.2f}"
        )
    say(f"RSS now {rss_gb():.2f} GB, peak {peak_rss_gb():.2f} GB")

    if passes is not None:
        say("\nmodel passes of the SpecGuard calls (process CPU time; the rest of a call is Python and sampling)")
        say(passes.report())
    if profiler is not None:
        for key in ("tottime", "cumulative"):
            buffer = io.StringIO()
            pstats.Stats(profiler, stream=buffer).strip_dirs().sort_stats(key).print_stats(30)
            say(f"\ncProfile of the SpecGuard calls, by {key}\n" + buffer.getvalue())
    if args.torch_profile:
        say(torch_profile(pair, prompts[0], params, options))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"stages": loaded.stages, "rows": rows}, indent=1))
    return 0


def peak_rss_gb() -> float:
    """Peak resident memory of this process (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


if __name__ == "__main__":
    raise SystemExit(main())
