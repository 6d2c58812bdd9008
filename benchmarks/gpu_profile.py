"""GPU check and micro-profile of the engine on a planted real-shape pair (see langchain_specguard.apps.synthetic).

1. Correct: CUDA-graph replay gives the same tokens as the same passes run without graphs, and every
   step rejected gives exactly the target's own output (the planted map); no host sync inside a chunk
   of draft decode iterations.
2. Fast: median times (CUDA events) of one draft decode iteration for all candidates (graphed, and
   compiled + graphed), one verification pass over a 24-token step with step attention, one target
   decode iteration, each next to its memory-bandwidth floor.

    python benchmarks/gpu_profile.py qwen2.5-7b:qwen2.5-0.5b
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from langchain_specguard.apps import synthetic
from langchain_specguard.apps.bench import measure_bandwidth
from langchain_specguard.engine import SpecGuardParams, generate
from langchain_specguard.engine.loading import weight_bytes
from langchain_specguard.engine.runtimes import RuntimePool


def events_ms(fn: Any, repeats: int = 30, inner: int = 1) -> float:
    """Median milliseconds of ``fn`` (``inner`` calls per timing), after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def profile_runtime(rt: Any, prompt: list[int], compiled: bool, target_shape: str) -> dict[str, float]:
    """Median times of the passes one step is made of, on one runtime (its graphs captured first)."""
    draft, target, timings = rt.draft, rt.target, {}
    start = len(prompt) - 1
    draft.prefill(prompt[:-1], 0)
    target.prefill(prompt[:-1], 0)
    generator = torch.Generator(device=draft.device).manual_seed(0)
    temps = [0.0] + [0.8] * (draft.batch - 1)

    def draft_iteration() -> None:
        if draft.decoded >= 24:
            draft.start_decode(prompt[-1], start, temps)
        draft.decode(1, generator)

    draft.start_decode(prompt[-1], start, temps)
    t0 = time.perf_counter()
    draft.decode(1, generator)
    torch.cuda.synchronize()
    label = "compiled + graphed" if compiled else "graphed"
    timings[f"first draft iteration, {label} (capture) s"] = time.perf_counter() - t0
    timings[f"draft iteration, {draft.batch} rows, {label} (ms)"] = events_ms(draft_iteration, inner=8)
    if compiled:
        return timings
    draft.start_decode(prompt[-1], start, temps)
    torch.cuda.set_sync_debug_mode("error")  # no host synchronisation inside a chunk of decode iterations
    try:
        draft.decode(4, generator)
        timings["sync-free decode chunk (1 = yes)"] = 1.0
    except RuntimeError as exc:
        print("sync inside the decode chunk:", exc)
        timings["sync-free decode chunk (1 = yes)"] = 0.0
    finally:
        torch.cuda.set_sync_debug_mode("default")
    n_layers = target.view.config.num_hidden_layers
    record = target.record(tuple(range(n_layers - n_layers // 3, n_layers)))
    record.context_len.fill_(start + 1)
    target.tokens_in[:, :24].copy_(torch.tensor(prompt[:24]))
    timings["verify pass, 24 tokens + step attention (ms)"] = events_ms(
        lambda: target.forward(None, start, record, q=24)
    )
    timings["verify pass, 24 tokens, no attention (ms)"] = events_ms(lambda: target.forward(None, start, q=24))

    def target_iteration() -> None:
        if target.decoded >= 24:
            target.start_decode(prompt[-1], start, [0.0])
        target.decode(1, None)

    target.start_decode(prompt[-1], start, [0.0])
    timings["target decode iteration (ms)"] = events_ms(target_iteration, inner=8)
    return timings


def main(shapes: str = "qwen2.5-7b:qwen2.5-0.5b") -> None:
    target_shape, _, draft_shape = shapes.partition(":")
    started = time.perf_counter()
    pair = synthetic.synthetic_pair(target_shape, draft_shape or None, 1.0, draft_layers=None if draft_shape else 4)
    print(f"built {pair.name} in {time.perf_counter() - started:.1f} s", flush=True)
    bandwidth = measure_bandwidth(pair.device) or 0.0
    tb, db = weight_bytes(pair.target), weight_bytes(pair.draft)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "bandwidth_gb_s": bandwidth / 1e9,
        "target_gb": tb / 1e9,
        "draft_gb": db / 1e9,
    }
    prompts = synthetic.synthetic_prompts(pair, 3, 200)
    target_map = pair.target_map.tolist()

    def expected(prompt: list[int], n: int) -> list[int]:
        out, token = [], prompt[-1]
        for _ in range(n):
            token = target_map[token]
            out.append(token)
        return out

    # -- correctness ---------------------------------------------------------------------------------
    base = SpecGuardParams(
        max_tokens=96, max_step_tokens=24, step_delimiters=["\n"], decision="weighted", grounding_weight=0.0
    )
    checks = {}
    for agreement in (1.0, 0.97, 0.0):
        synthetic.set_agreement(pair, agreement)
        for threshold in (0.5, 2.0):
            params = base.model_copy(update={"acceptance_threshold": threshold})
            graphs = [generate(pair, p, params) for p in prompts]
            plain = [generate(pair, p, params.model_copy(update={"cache_implementation": "dynamic"})) for p in prompts]
            checks[f"a={agreement:g},t={threshold:g}"] = {
                "equals_target": sum(r.token_ids == expected(p, 96) for r, p in zip(graphs, prompts, strict=True)),
                "accepted": sum(r.summary["accepted_steps"] for r in graphs),
                "steps": sum(r.summary["steps"] for r in graphs),
                "kept": sum(r.summary["kept_tokens"] for r in graphs),
                "speculated": sum(r.summary["speculated_tokens"] for r in graphs),
                "same_as_dynamic": sum(a.token_ids == b.token_ids for a, b in zip(graphs, plain, strict=True)),
            }
            print(agreement, threshold, checks[f"a={agreement:g},t={threshold:g}"], flush=True)
    report["checks"] = checks

    # -- host time of one warm generation (where the Python goes) ------------------------------------------
    import cProfile
    import io
    import pstats

    synthetic.set_agreement(pair, 1.0)
    params = base.model_copy(update={"acceptance_threshold": 0.5, "max_tokens": 128})
    generate(pair, prompts[0], params)
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    started = time.perf_counter()
    profiler.enable()
    result = generate(pair, prompts[1], params)
    profiler.disable()
    print(f"\none warm generation: {len(result.token_ids)} tokens in {time.perf_counter() - started:.3f} s")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(22)
    print(text.getvalue()[-6000:])

    # -- micro timings -----------------------------------------------------------------------------------
    synthetic.set_agreement(pair, 1.0)
    pool = RuntimePool.for_pair(pair)
    timings: dict[str, float] = {}
    for compiled in (False, True):
        rt = pool.take(base.model_copy(update={"compile_decode": compiled}), 200 + 128, 25, pair.device)
        with torch.inference_mode():
            timings.update(profile_runtime(rt, prompts[0], compiled, target_shape))
        pool.give(rt)
    timings["target floor: weights / bandwidth (ms)"] = 1e3 * tb / bandwidth
    timings["draft floor: weights / bandwidth (ms)"] = 1e3 * db / bandwidth
    report["timings"] = timings
    for key, value in timings.items():
        print(f"{key:<55} {value:8.3f}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_profile.json"), "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:])
