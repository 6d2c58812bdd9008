"""GPU check: the static-cache and CUDA-graph decode paths against the dynamic eager path.

Same trained testbed pair, same prompts, greedy: prints tokens/s, acceptance, how many outputs equal
the dynamic path's, and whether all-accepted decoding still equals the draft's own greedy output.

    python benchmarks/check_graphs.py /tmp/arith   # a directory made by research.arithmetic
"""

from __future__ import annotations

import json
import sys
import time

import torch

from langchain_specguard.apps.bench import encode_prompts
from langchain_specguard.engine import SpecGuardParams, generate, load_pair


def main(root: str, n: int = 20) -> None:
    pair = load_pair(f"{root}/target", f"{root}/draft")
    with open(f"{root}/test.jsonl", encoding="utf-8") as handle:
        questions = [json.loads(line)["question"] for line in handle][:n]
    prompts = encode_prompts(pair, questions, "raw")
    base = SpecGuardParams(acceptance_threshold=0.5, max_tokens=64, max_step_tokens=24, step_delimiters=["\n"])
    variants = {
        "dynamic": base,
        "static": base.model_copy(update={"cache_implementation": "static"}),
        "graphs": base.model_copy(update={"cache_implementation": "static", "compile_decode": True}),
    }
    outputs = {}
    for name, params in variants.items():
        for prompt in prompts[:2]:  # warm-up (compiles for "graphs")
            generate(pair, prompt, params)
        torch.cuda.synchronize()
        started = time.perf_counter()
        results = [generate(pair, prompt, params) for prompt in prompts]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        outputs[name] = results
        tokens = sum(len(r.token_ids) for r in results)
        steps = sum(r.summary["steps"] for r in results)
        accepted = sum(r.summary["accepted_steps"] for r in results)
        same = sum(a.token_ids == b.token_ids for a, b in zip(results, outputs["dynamic"], strict=True))
        print(f"{name:8s} {tokens / seconds:7.1f} tok/s  accepted {accepted / steps:.2f}  same as dynamic {same}/{n}")
    eos = sorted(pair.eos_token_ids)
    for name in variants:
        params = variants[name].model_copy(update={"acceptance_threshold": -1.0, "n_candidates": 1})
        same = 0
        for prompt in prompts[:10]:
            got = generate(pair, prompt, params).token_ids
            ids = torch.tensor([prompt], device=pair.device)
            ref = pair.draft.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=eos, pad_token_id=0)
            same += got == ref[0, len(prompt) :].tolist()
        print(f"{name:8s} all-accepted == draft greedy generate: {same}/10")
    for name in variants:
        first = outputs[name][0]
        print(name, [(s.source, round(s.score, 3)) for s in first.steps][:5], repr(first.text[:60]))


if __name__ == "__main__":
    main(sys.argv[1])
