"""What one linear layer costs on this CPU, by rows (candidates, verified tokens), dtype and threads.

A decode iteration on a CPU is a chain of ``linear`` calls whose weight is read once per call: with one row
the call is bound by memory bandwidth, with more rows it turns compute-bound somewhere, and where it does
decides what ``n_candidates`` and the verification pass cost. Shapes are the embedded Gemma 3 270M's and the
Qwen2.5-Coder 1.5B/0.5B pair's (their LM heads are most of a token's weight bytes). Prints the minimum and
median milliseconds over repeats (the minimum is the least disturbed by other processes on a shared machine)
and the GB/s and GFLOP/s the minimum implies.

    PYTHONPATH=. python benchmarks/cpu_matmul.py --threads 1,2 --rows 1,2,4,8 --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

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


def time_linear(weight: torch.Tensor, rows: int, repeats: int) -> list[float]:
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    out = []
    with torch.inference_mode():
        torch.nn.functional.linear(x, weight)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            out.append(time.perf_counter() - started)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'shape':<22} {'dtype':<9} {'thr':>3} {'rows':>4} {'min ms':>8} {'med ms':>8} {'GB/s':>6} {'GFLOP/s':>8}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name in args.shapes.split(","):
            fan_in, fan_out = SHAPES[name]
            for dtype_name in args.dtypes.split(","):
                dtype = getattr(torch, dtype_name)
                weight = torch.randn(fan_out, fan_in, dtype=dtype)
                for rows in (int(r) for r in args.rows.split(",")):
                    times = time_linear(weight, rows, args.repeats)
                    best = min(times)
                    gbs = weight.numel() * weight.element_size() / best / 1e9
                    gflops = 2 * rows * weight.numel() / best / 1e9
                    print(
                        f"{name:<22} {dtype_name:<9} {threads:>3} {rows:>4} {1e3 * best:8.2f} "
                        f"{1e3 * statistics.median(times):8.2f} {gbs:6.1f} {gflops:8.1f}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
