"""What one linear layer costs on this CPU, by rows (candidates, verified tokens), dtype and threads.

A decode iteration on a CPU is a chain of ``linear`` calls whose weight is read once per call: with one row
the call is bound by memory bandwidth, with more rows it turns compute-bound somewhere, and where it does
decides what ``n_candidates`` and the verification pass cost. Shapes are the embedded Gemma 3 270M's and the
Qwen2.5-Coder 1.5B/0.5B pair's (their LM heads are most of a token's weight bytes). Prints the minimum and
median milliseconds over repeats (the minimum is the least disturbed by other processes on a shared machine)
and the GB/s and GFLOP/s the minimum implies.

    PYTHONPATH=. python benchmarks/cpu_matmul.py --threads 1,2 --rows 1,2,4,8 --dtypes float32,bfloat16
    PYTHONPATH=. python benchmarks/cpu_matmul.py --threads 1 --rows 1,2,4,8,12,16 --dtypes float32 \\
        --shapes "qwen-1.5b gate+up" --kernels linear,skinny,onednn
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch

from langchain_specguard.engine.view import SkinnyLinear

SHAPES = {
    # name: (in_features, out_features)
    "gemma-270m lm_head": (640, 262144),
    "gemma-270m gate+up": (640, 2 * 2048),
    "qwen-0.5b lm_head": (896, 151936),
    "qwen-0.5b gate+up": (896, 2 * 4864),
    "qwen-1.5b lm_head": (1536, 151936),
    "qwen-1.5b gate+up": (1536, 2 * 8960),
    "qwen-1.5b down": (8960, 1536),
}


def kernel(name: str, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``linear``: ``F.linear`` (what a model's own forward runs); ``skinny``: the engine's CPU view of the layer
    (:class:`~langchain_specguard.engine.view.SkinnyLinear`: ``weight @ x.T`` for 2 to 16 rows); ``onednn``: oneDNN
    with the weight laid out for it once (a copy of the weight: what a faster verification pass would cost)."""
    if name == "linear":
        return lambda x: torch.nn.functional.linear(x, weight)
    if name == "skinny":
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        return SkinnyLinear.of(layer)
    if name == "onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    raise SystemExit(f"unknown kernel {name!r}: linear, skinny or onednn")


def time_linear(weight: torch.Tensor, rows: int, repeats: int, name: str = "linear") -> list[float]:
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    run = kernel(name, weight)
    out = []
    with torch.inference_mode():
        run(x)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            run(x)
            out.append(time.perf_counter() - started)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--kernels", default="linear", help="linear,skinny,onednn (see kernel())")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(
        f"{'shape':<22} {'kernel':<7} {'dtype':<9} {'thr':>3} {'rows':>4} {'min ms':>8} {'med ms':>8} {'GB/s':>6} "
        f"{'GFLOP/s':>8}"
    )
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name in args.shapes.split(","):
            fan_in, fan_out = SHAPES[name]
            for dtype_name in args.dtypes.split(","):
                dtype = getattr(torch, dtype_name)
                weight = torch.randn(fan_out, fan_in, dtype=dtype)
                for kernel_name, rows in itertools.product(args.kernels.split(","), map(int, args.rows.split(","))):
                    times = time_linear(weight, rows, args.repeats, kernel_name)
                    best = min(times)
                    gbs = weight.numel() * weight.element_size() / best / 1e9
                    gflops = 2 * rows * weight.numel() / best / 1e9
                    print(
                        f"{name:<22} {kernel_name:<7} {dtype_name:<9} {threads:>3} {rows:>4} {1e3 * best:8.2f} "
                        f"{1e3 * statistics.median(times):8.2f} {gbs:6.1f} {gflops:8.1f}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
