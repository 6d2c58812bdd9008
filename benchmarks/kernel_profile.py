"""Where a decode iteration's GPU time goes, and which attention formulation suits decoding best.

On a planted real-shape pair (langchain_specguard.apps.synthetic): torch.profiler kernel tables for one
draft iteration (all candidates), one target decode iteration and one 24-token verification pass,
eager and compiled; then decode-shaped attention alone in several formulations.

    python benchmarks/kernel_profile.py qwen2.5-7b:qwen2.5-0.5b
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from gpu_profile import events_ms  # benchmarks/ is on the path when this runs as a script
from torch.profiler import ProfilerActivity, profile

from langchain_specguard.apps import synthetic
from langchain_specguard.engine.attention import _pack_mask, _pack_queries
from langchain_specguard.engine.runner import ModelRunner
from langchain_specguard.engine.view import engine_view


def median_ms(fn: Callable[[], Any]) -> float:
    return events_ms(fn, repeats=50)


def kernels(title: str, fn: Callable[[], Any], top: int = 18) -> None:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events) / 5 / 1e3
    count = sum(e.count for e in events) / 5
    print(f"\n== {title}: {total:.3f} ms of kernels, {count:.0f} kernels per call")
    rows = sorted(events, key=lambda e: e.device_time_total, reverse=True)[:top]
    for e in rows:
        print(f"{e.device_time_total / 5 / 1e3:8.3f} ms {e.count / 5:6.0f}x  {e.key[:100]}")


def attention_variants(batch: int, heads: int, kv_heads: int, dim: int, q: int, size: int, valid: int) -> None:
    device = "cuda"
    dtype = torch.bfloat16
    query = torch.randn(batch, heads, q, dim, device=device, dtype=dtype)
    key = torch.randn(batch, kv_heads, size, dim, device=device, dtype=dtype)
    value = torch.randn(batch, kv_heads, size, dim, device=device, dtype=dtype)
    positions = torch.arange(valid - q, valid, device=device)
    allowed = torch.arange(size, device=device)[None, :] <= positions[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    mask = mask[None, None]
    groups = heads // kv_heads
    scale = dim**-0.5

    def packed_sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            _pack_queries(query, kv_heads), key, value, attn_mask=_pack_mask(mask, groups), scale=scale
        )

    def gqa_sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed[None, None], scale=scale, enable_gqa=True
        )

    def math() -> torch.Tensor:
        scores = (_pack_queries(query, kv_heads) @ key.transpose(-1, -2)).float() * scale
        probs = torch.softmax(scores + _pack_mask(mask.float(), groups), dim=-1).to(dtype)
        return probs @ value

    compiled_math = torch.compile(math, dynamic=False)

    def exact_flash() -> torch.Tensor:  # the floor: keys cut to the valid length, no mask
        k, v = key[:, :, :valid], value[:, :, :valid]
        if q == 1:
            return torch.nn.functional.scaled_dot_product_attention(query, k, v, scale=scale, enable_gqa=True)
        return torch.nn.functional.scaled_dot_product_attention(query, k, v, scale=scale, enable_gqa=True)

    reference = math().float()
    print(f"\nattention B={batch} H={heads}/{kv_heads} D={dim} q={q} keys={size} (valid {valid})")
    for name, fn in (
        ("packed sdpa + mask", packed_sdpa),
        ("gqa sdpa + bool mask", gqa_sdpa),
        ("math", math),
        ("math, compiled", compiled_math),
        ("exact length, no mask", exact_flash),
    ):
        try:
            out = fn().float().reshape(reference.shape) if name != "gqa sdpa + bool mask" else None
            error = (out - reference).norm() / reference.norm() if out is not None else float("nan")
            print(f"  {name:<24} {median_ms(fn) * 1e3:8.1f} us   rel err {error:.1e}")
        except Exception as exc:
            print(f"  {name:<24} failed: {type(exc).__name__}: {str(exc)[:120]}")


def main(shapes: str = "qwen2.5-7b:qwen2.5-0.5b") -> None:
    target_shape, _, draft_shape = shapes.partition(":")
    pair = synthetic.synthetic_pair(target_shape, draft_shape)
    prompt = synthetic.synthetic_prompts(pair, 1, 200)[0]
    with torch.inference_mode():
        draft = ModelRunner(engine_view(pair.draft), batch=4, capacity=1024, rows=64, growable=False, graphs=False)
        target = ModelRunner(engine_view(pair.target), batch=1, capacity=1024, rows=64, growable=False, graphs=False)
        draft.prefill(prompt[:-1], 0)
        target.prefill(prompt[:-1], 0)
        generator = torch.Generator(device="cuda").manual_seed(0)

        def draft_iteration() -> None:
            if draft.decoded >= 60:
                draft.start_decode(prompt[-1], 199, [0.0, 0.8, 0.8, 0.8])
            draft.decode(1, generator)

        def target_iteration() -> None:
            if target.decoded >= 60:
                target.start_decode(prompt[-1], 199, [0.0])
            target.decode(1, None)

        draft.start_decode(prompt[-1], 199, [0.0, 0.8, 0.8, 0.8])
        target.start_decode(prompt[-1], 199, [0.0])
        kernels("draft iteration, eager", draft_iteration)
        kernels("target decode iteration, eager", target_iteration)
        target.tokens_in[:, :24].copy_(torch.tensor(prompt[:24]))
        kernels("verify pass, 24 tokens, eager", lambda: target.forward(None, 199, q=24))
        for runner, name in ((draft, "draft"), (target, "target")):
            started = time.perf_counter()
            compiled = torch.compile(runner._iteration, dynamic=False)
            runner._iteration = lambda record, sampling, fn=compiled: fn(record, sampling)  # type: ignore[method-assign]
            fn = draft_iteration if name == "draft" else target_iteration
            fn()
            torch.cuda.synchronize()
            print(f"\ncompiled {name} iteration in {time.perf_counter() - started:.1f} s")
            kernels(f"{name} iteration, compiled (no graph)", fn)
    for shape in (
        (4, 14, 2, 64, 1, 1024, 330),  # Qwen2.5-0.5B draft, 4 candidates
        (1, 28, 4, 128, 1, 1024, 330),  # Qwen2.5-7B target decode
        (1, 28, 4, 128, 32, 1024, 330),  # Qwen2.5-7B verification, bucket 32
        (1, 28, 4, 128, 1, 8192, 6000),  # long context decode
    ):
        attention_variants(*shape)


if __name__ == "__main__":
    main(*sys.argv[1:])
