"""The test run's methods, from the configuration the train sweep chose (report.py --select).

python -m research.gsm8k.plan chosen.json > test.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

T = 0.7
"""The sampling temperature of the paper's comparison."""


def test_methods(chosen: dict[str, Any]) -> list[dict[str, Any]]:
    params = dict(chosen["params"])
    steps = {k: params[k] for k in ("step_delimiters", "max_step_tokens") if k in params}
    return [
        {"name": "target", "kind": "hf", "model": "target", "temperature": 0.0},
        {"name": "draft", "kind": "hf", "model": "draft", "temperature": 0.0},
        {"name": f"target-t{T}", "kind": "hf", "model": "target", "temperature": T},
        {"name": "specguard", "kind": "engine", "params": params, "chosen": chosen["name"]},
        {"name": f"specguard-t{T}", "kind": "engine", "params": {**params, "temperature": T}},
        # token-level speculative decoding through the same engine: every step goes to the target, which
        # keeps the draft's tokens by exact rejection sampling (one candidate, so nothing is selected)
        {
            "name": f"token-sd-t{T}",
            "kind": "engine",
            "params": {**steps, "acceptance_threshold": 2.0, "n_candidates": 1, "temperature": T},
        },
        {"name": "target-engine", "kind": "engine", "params": {**steps, "acceptance_threshold": 2.0}},
        {
            "name": "old-default",
            "kind": "engine",
            "params": {
                "confidence_method": "mean",
                "acceptance_threshold": "auto",
                "step_delimiters": ["\n\n"],
                "max_step_tokens": 64,
            },
        },
    ]


def bench_args(chosen: dict[str, Any]) -> str:
    """The chosen configuration as ``langchain_specguard.apps.bench`` options."""
    p = chosen["params"]
    args = [f"--thresholds {p.get('acceptance_threshold', 0.3)}"]
    if "confidence_method" in p:
        args.append(f"--confidence-method {p['confidence_method']}")
    if "step_delimiters" in p:
        args.append("--step-delimiters " + "|".join(d.encode("unicode_escape").decode() for d in p["step_delimiters"]))
    for key in ("max_step_tokens", "n_candidates"):
        if key in p:
            args.append(f"--{key.replace('_', '-')} {p[key]}")
    return " ".join(args)


if __name__ == "__main__":
    if sys.argv[1] == "--bench-args":
        print(bench_args(json.loads(Path(sys.argv[2]).read_text())))
    else:
        print(json.dumps(test_methods(json.loads(Path(sys.argv[1]).read_text())), indent=1))
