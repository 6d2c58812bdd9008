"""Schema-constrained decoding on a GPU: the exactness checks of tests/unit_tests/test_grammar.py with CUDA graphs.

On the GPU the draft's masks go through the captured decode iteration (a static bitmask buffer, unpacked with device
shifts) and the target's through device shifts too; the CPU tests never run that path. This runs the tiny pairs in
float32 on ``cuda`` with static caches (every pass a replayed graph) and compares, for each prompt:

- every step rejected (threshold 2.0) with the target's greedy ``generate()`` under the schema's logits processor;
- every step accepted with one greedy candidate (threshold -1.0) with the draft's;
- sampled calls (threshold 0.5, temperature 0.8) parse and validate.

    python -m research.structured.check_gpu

Float32 near-ties can flip a greedy choice between a 24-token pass and a one-token pass (docs/engine.md); a mismatch
is printed with both texts, and the exit status is the number of mismatches.
"""

from __future__ import annotations

import sys

import torch

from langchain_specguard.engine import CallOptions, SpecGuardParams, generate, load_pair
from tests.tiny_models import bpe_pair, gemma_pair, llama_pair
from tests.unit_tests.test_grammar import GRAMMAR, PROMPTS, Person, constrained_greedy


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    mismatches = 0
    for name, make in (("llama", llama_pair), ("gemma", gemma_pair), ("bpe", bpe_pair)):
        p = load_pair(*make(), dtype="float32", device="cuda")
        for text in PROMPTS:
            prompt = p.tokenizer(text, add_special_tokens=False)["input_ids"]
            base = {"n_candidates": 3, "max_tokens": 120, "max_step_tokens": 6, "step_delimiters": ["\n"],
                    "cache_implementation": "static", "seed": 0}  # fmt: skip
            for threshold, model, candidates in ((2.0, p.target, 3), (-1.0, p.draft, 1)):
                params = SpecGuardParams(**{**base, "acceptance_threshold": threshold, "n_candidates": candidates})
                got = generate(p, prompt, params, CallOptions(grammar=GRAMMAR))
                want = constrained_greedy(model, p, prompt, 120)
                same = got.token_ids == want
                mismatches += not same
                print(f"{name} threshold={threshold}: {'equal' if same else 'DIFFERENT'}", repr(got.text))
                if not same:
                    print("   generate():", repr(p.tokenizer.decode(want)))
            for seed in range(3):
                params = SpecGuardParams(**{**base, "acceptance_threshold": 0.5, "temperature": 0.8, "seed": seed})
                sampled = generate(p, prompt, params, CallOptions(grammar=GRAMMAR))
                Person.model_validate_json(sampled.text)
            print(f"{name}: sampled outputs validate")
    return mismatches


if __name__ == "__main__":
    sys.exit(main())
