"""What reporting steps costs: ChatSpecGuard on the tiny test pair, per tracing mode.

Modes, run round-robin so machine load hits them alike:

* ``off``: no callbacks at all (nothing is reported);
* ``handler``: a ``SpecGuardCallbackHandler`` gets the custom events;
* ``langsmith-bare``: LangSmith tracing on (a local stand-in API) but the step events are not put on
  the traced run: what LangChain's tracer costs by itself;
* ``langsmith-events``: LangSmith tracing on, ``trace_steps="events"`` (the default);
* ``langsmith-runs``: the same with ``trace_steps="runs"`` (a child run per step).

For each call it records the wall time and the part of it spent outside the engine's steps
(``wall - sum(step seconds)``: prompt rendering, LangChain callbacks, tracing). The engine's own
time varies with load far more than the reporting does, so the outside-the-steps time is the
number that shows the overhead. Prints medians as JSON.

    PYTHONPATH=. python benchmarks/trace_overhead.py [--calls 15] [--out benchmarks/results/trace_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch
from langchain_core.tracers.langchain import wait_for_all_tracers
from langsmith import Client, tracing_context

from langchain_specguard import ChatSpecGuard, callbacks
from langchain_specguard.callbacks import SpecGuardCallbackHandler
from tests.langsmith_standin import LangSmithStandIn
from tests.tiny_models import llama_pair

MODES = ("off", "handler", "langsmith-bare", "langsmith-events", "langsmith-runs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=15, help="timed calls per mode")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    target, draft = llama_pair()
    base: dict[str, Any] = {
        "target_model": target,
        "draft_model": draft,
        "max_tokens": 32,
        "max_step_tokens": 4,
        "step_delimiters": ["\n"],
        "seed": 0,
        "decision": "weighted",
        "grounding_weight": 0.8,
        "acceptance_threshold": 0.478,
    }
    events_llm = ChatSpecGuard(**base)
    runs_llm = ChatSpecGuard(**base, trace_steps="runs")
    runs_llm._pair = events_llm.load()  # one loaded pair for both
    results: dict[str, dict[str, list[float]]] = {m: {"wall": [], "outside": [], "steps": []} for m in MODES}

    with LangSmithStandIn(lifetime_s=600) as server:
        client = Client(api_url=server.url, api_key="fake")

        def call(mode: str) -> None:
            llm = runs_llm if mode == "langsmith-runs" else events_llm
            config: Any = {"callbacks": [SpecGuardCallbackHandler()]} if mode == "handler" else {}
            record = callbacks.record_on_tracers
            if mode == "langsmith-bare":
                callbacks.record_on_tracers = lambda *args: None  # type: ignore[assignment]
            try:
                with tracing_context(enabled=mode.startswith("langsmith"), client=client, project_name="overhead"):
                    started = time.perf_counter()
                    message = llm.invoke("Hello", config=config)
                    wall = time.perf_counter() - started
            finally:
                callbacks.record_on_tracers = record
            summary = message.response_metadata["specguard"]
            results[mode]["wall"].append(wall)
            results[mode]["outside"].append(wall - summary["seconds"])
            results[mode]["steps"].append(summary["num_steps"])

        for mode in MODES:  # warm-up, not recorded
            call(mode)
        for key in results:
            results[key] = {"wall": [], "outside": [], "steps": []}
        for _ in range(args.calls):
            for mode in MODES:
                call(mode)
        wait_for_all_tracers()
        client.flush()
        posted_runs = len(server.runs())

    report: dict[str, Any] = {
        "pair": "tests/tiny_models.llama_pair (random weights, fp32, CPU)",
        "calls_per_mode": args.calls,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "runs_posted_to_standin": posted_runs,
        "modes": {},
    }
    off_outside = statistics.median(results["off"]["outside"])
    for mode, values in results.items():
        steps = statistics.median(values["steps"])
        outside = statistics.median(values["outside"])
        report["modes"][mode] = {
            "median_wall_ms": round(1000 * statistics.median(values["wall"]), 2),
            "median_outside_steps_ms": round(1000 * outside, 2),
            "overhead_vs_off_ms_per_call": round(1000 * (outside - off_outside), 2),
            "overhead_vs_off_ms_per_step": round(1000 * (outside - off_outside) / steps, 3),
            "median_steps": steps,
        }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
