"""GPU check: grounding recorded inside CUDA graphs equals the eager dynamic path's, for both scoring models.

On the tiny random test pair (float32): for each decision that records attention and each model that
scores, the static-cache path (one CUDA graph per bucket, decode iterations graphed, not compiled) against
the dynamic eager path: same tokens, same per-step grounding and confidence. Prints one line per case.

    PYTHONPATH=. python benchmarks/check_grounding_graphs.py
"""

from __future__ import annotations

import math
import time

import torch

from langchain_specguard.engine import SpecGuardParams, generate, load_pair
from tests.tiny_models import llama_pair


def main() -> None:
    target, draft = llama_pair()
    pair = load_pair(target, draft, dtype="float32", device="cuda")
    prompts = [pair.tokenizer(text)["input_ids"] for text in ("Hello there", "Count with me: 1 2 3", "abc abc")]
    cases = {
        "target, both": {"decision": "both", "signal_source": "target", "confidence_method": "mean"},
        "draft, both": {"decision": "both", "signal_source": "draft", "confidence_method": "mean"},
        "target, confidence (ratio)": {"decision": "confidence"},
    }
    base = {"acceptance_threshold": 0.3, "step_delimiters": ["\n"], "max_step_tokens": 6, "max_tokens": 24, "seed": 0}
    failures = 0
    for name, options in cases.items():
        params = SpecGuardParams(**base, **options, cache_implementation="dynamic")
        graphed = params.model_copy(update={"cache_implementation": "static", "compile_decode": False})
        same_tokens = same_signals = 0
        started = time.perf_counter()
        for prompt in prompts:
            a, b = generate(pair, prompt, params), generate(pair, prompt, graphed)
            same_tokens += a.token_ids == b.token_ids
            pairs = [
                (x, y)
                for s, t in zip(a.steps, b.steps, strict=False)
                for x, y in ((s.grounding, t.grounding), (s.confidence, t.confidence))
            ]
            same_signals += all((math.isnan(x) and math.isnan(y)) or abs(x - y) < 1e-4 for x, y in pairs)
        failures += (same_tokens != len(prompts)) + (same_signals != len(prompts))
        print(
            f"{name:28s} tokens equal {same_tokens}/{len(prompts)}  signals equal {same_signals}/{len(prompts)}  "
            f"{time.perf_counter() - started:.1f} s"
        )
    print("OK" if failures == 0 else f"FAILED: {failures}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
