"""GPU check: batched generations on CUDA graphs (compiled and not) equal the dynamic eager path, and each call
equals itself alone.

Tiny random-weight pairs (tests/tiny_models.py) in float32 on the GPU: for each cache path, 8 prompts run alone
and then all at once; every variant's tokens must equal the eager path's alone, every step to the target must
equal the target's greedy ``generate()`` and every step accepted must equal the draft's. Prints a table and exits
non-zero on any mismatch.

    python benchmarks/check_batched_gpu.py
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from langchain_specguard.engine import SpecGuardParams, generate, load_pair
from tests.tiny_models import gemma_pair, llama_pair

TEXTS = ["<s>Hello there, how are you?", "<s>The sum of 3 and 5 is", "<s>abc def", "<s>Zyx w, v u.",
         "<s>One two three", "<s>(1 + 2) * 3 =", "<s>Lorem ipsum dolor", "<s>q"]  # fmt: skip


def together(pair: object, prompts: list[list[int]], params: SpecGuardParams) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]

    def run(i: int) -> None:
        out[i] = generate(pair, prompts[i], params).token_ids  # type: ignore[arg-type]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def main(device: str = "cuda") -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failures = 0
    for name, make in (("llama", llama_pair), ("gemma", gemma_pair)):
        target, draft = make()
        pair = load_pair(target, draft, dtype="float32", device=device)
        prompts = [pair.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
        base = SpecGuardParams(acceptance_threshold=0.5, n_candidates=3, max_tokens=40, max_step_tokens=6)
        variants = {
            "eager": base.model_copy(update={"cache_implementation": "dynamic"}),
            "graphs": base.model_copy(update={"cache_implementation": "static", "compile_decode": False}),
            "compiled": base.model_copy(update={"cache_implementation": "static", "compile_decode": True}),
            "sampled": base.model_copy(update={"cache_implementation": "static", "temperature": 0.8, "seed": 4}),
        }
        reference = [generate(pair, p, variants["eager"]).token_ids for p in prompts]
        sampled_alone: list[list[int]] = []
        for variant, params in variants.items():
            started = time.perf_counter()
            alone = [generate(pair, p, params).token_ids for p in prompts]
            first = time.perf_counter() - started
            batched = together(pair, prompts, params)
            if variant == "sampled":
                sampled_alone = alone
                same_alone, same_batch = "-", sum(a == b for a, b in zip(alone, batched, strict=True))
            else:
                same_alone = sum(a == r for a, r in zip(alone, reference, strict=True))
                same_batch = sum(b == r for b, r in zip(batched, reference, strict=True))
                failures += (same_alone != len(prompts)) + (same_batch != len(prompts))
            if variant == "sampled":
                failures += same_batch != len(prompts)
            print(f"{name:6s} {variant:9s} alone == eager {same_alone}/{len(prompts)}  batched == alone/eager "
                  f"{same_batch}/{len(prompts)}  (first pass over the prompts {first:.1f} s)", flush=True)  # fmt: skip
        del sampled_alone
        for threshold, model in ((2.0, pair.target), (-1.0, pair.draft)):
            params = variants["compiled"].model_copy(
                update={"acceptance_threshold": threshold, "n_candidates": 1 if threshold < 0 else 3}
            )
            batched = together(pair, prompts, params)
            eos = sorted(model.generation_config.eos_token_id or [])
            same = 0
            for prompt, got in zip(prompts, batched, strict=True):
                ids = torch.tensor([prompt], device=device)
                ref = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)[0, len(prompt) :].tolist()
                ref = ref[: next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))]
                same += got == ref
            failures += same != len(prompts)
            what = "all to the target == target generate" if threshold > 1 else "all accepted == draft generate"
            print(f"{name:6s} compiled, batched: {what}: {same}/{len(prompts)}", flush=True)
    print("FAILURES", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
