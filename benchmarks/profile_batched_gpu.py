"""Where a batched step's time goes on the GPU: per phase, per pass shape, graph captures, at 1-16 concurrent calls.

A planted real-shape pair (random weights whose next-token maps agree at ``--agreement``), so it needs no model
files. Every phase boundary synchronises the device (the phases read the host anyway); captures are timed apart.

    python benchmarks/profile_batched_gpu.py --pair qwen2.5-1.5b:qwen2.5-0.5b --concurrency 1,8,16
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any

import torch

from langchain_specguard.apps import synthetic, throughput
from langchain_specguard.engine import SpecGuardParams, decoding
from langchain_specguard.engine import runner as runner_module

PHASES = ("propose", "verify", "write", "commit")
seconds: collections.Counter[str] = collections.Counter()
calls: collections.Counter[str] = collections.Counter()
passes: collections.Counter[tuple[Any, ...]] = collections.Counter()
batch_sizes: list[int] = []


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(name: str, function: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sync()
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            sync()
            seconds[name] += time.perf_counter() - started
            calls[name] += 1

    return wrapper


def instrument() -> None:
    for phase in PHASES:
        setattr(decoding, phase, timed(phase, getattr(decoding, phase)))
    step = decoding.step

    def counted_step(runtime: Any, gens: list[Any]) -> Any:
        batch_sizes.append(len(gens))
        return step(runtime, gens)

    decoding.step = counted_step
    graphed = runner_module.ModelRunner._graphed

    def graphed_counted(self: Any, key: Any, body: Any) -> Any:
        name = "draft" if self.width > 1 else "target"
        passes[(name, *key[:4])] += 1
        if self.use_graphs and key not in self._graphs:
            sync()
            started = time.perf_counter()
            try:
                return graphed(self, key, body)
            finally:
                sync()
                seconds["capture"] += time.perf_counter() - started
                calls["capture"] += 1
        return graphed(self, key, body)

    runner_module.ModelRunner._graphed = graphed_counted


def clients(pair: Any, params: SpecGuardParams, prompts: list[list[int]], concurrency: int) -> tuple[float, int]:
    """The throughput app's closed-loop clients; the wall time and the tokens written."""
    call = throughput.engine_call(pair, params, (), max(concurrency, 1))
    wall, answers = throughput.clients(call, prompts, concurrency)
    return wall, sum(a.tokens for a in answers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pair", default="qwen2.5-1.5b:qwen2.5-0.5b")
    parser.add_argument("--agreement", type=float, default=0.9)
    parser.add_argument("--concurrency", default="1,8,16")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=120)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--torch-profile", type=int, default=0, help="also a torch.profiler table at this concurrency")
    args = parser.parse_args()
    target, _, draft = args.pair.partition(":")
    pair = synthetic.synthetic_pair(target, draft, args.agreement, device=args.device)
    params = SpecGuardParams(max_tokens=args.max_tokens, compile_decode=args.compile, seed=0)
    prompts = synthetic.synthetic_prompts(pair, 64, args.prompt_tokens)
    instrument()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"{pair.name}; {device}, torch {torch.__version__}; params {params.max_step_tokens=} "
        f"{params.n_candidates=} {params.compile_decode=}",
        flush=True,
    )
    header = (
        "conc",
        "tok/s",
        "steps",
        "batch",
        "ms/step",
        *(f"{p} ms" for p in PHASES),
        "captures",
        "capture s",
        "passes/step",
    )
    print(" ".join(f"{h:>10}" for h in header), flush=True)
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        clients(pair, params, prompts[:concurrency], concurrency)  # warm this concurrency's shapes
        seconds.clear(), calls.clear(), passes.clear(), batch_sizes.clear()
        wall, tokens = clients(pair, params, prompts[: 2 * concurrency], concurrency)
        steps = max(len(batch_sizes), 1)
        row = [concurrency, tokens / wall, steps, sum(batch_sizes) / steps,
               1000 * (wall - seconds["capture"]) / steps,
               *(1000 * (seconds[p] - (seconds["capture"] if p == "propose" else 0)) / steps for p in PHASES),
               calls["capture"], seconds["capture"], sum(passes.values()) / steps]  # fmt: skip
        print(" ".join(f"{v:>10.2f}" if isinstance(v, float) else f"{v:>10}" for v in row), flush=True)
        top = passes.most_common(8)
        print("   most run passes (model, kind, rows.stop, rows.step, q): " + ", ".join(f"{k}x{n}" for k, n in top))
        if concurrency == args.torch_profile:
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            ) as prof:
                clients(pair, params, prompts[:concurrency], concurrency)
            # CUDA time first (what the device spends, by kernel); host time is inflated by the profiler's tracing
            for key in ("self_cuda_time_total", "self_cpu_time_total"):
                print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
