"""Multi-GPU check: a target sharded with accelerate (``device_map``) decodes exactly like one on one GPU.

Builds a random-weight Llama (float32, so rounding cannot differ between layouts), saves it, loads it
once on GPU 0 and once split over every visible GPU, and compares SpecGuard's output in three regimes:
all steps to the target (= the target's greedy decoding), all accepted, and a mixed threshold.

    python benchmarks/check_multi_gpu.py
"""

from __future__ import annotations

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from langchain_specguard.engine import SpecGuardParams, generate, load_pair
from research.arithmetic import char_tokenizer


def main() -> None:
    gpus = torch.cuda.device_count()
    print(f"{gpus} GPUs: {[torch.cuda.get_device_name(i) for i in range(gpus)]}")
    tokenizer = char_tokenizer()
    root = tempfile.mkdtemp()
    for name, layers, hidden, seed in (("target", 8, 512, 0), ("draft", 2, 128, 1)):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        LlamaForCausalLM(config).save_pretrained(f"{root}/{name}")
        tokenizer.save_pretrained(f"{root}/{name}")
    single = load_pair(f"{root}/target", f"{root}/draft", device="cuda:0", dtype="float32")
    budget = {i: "80MiB" for i in range(gpus)}  # forces the ~100 MB target across every GPU
    sharded = load_pair(f"{root}/target", f"{root}/draft", device_map="auto", dtype="float32", max_memory=budget)
    placement = sorted({str(p.device) for p in sharded.target.parameters()})
    print(f"sharded target on {placement}; draft on {sharded.draft.device}")
    prompts = [[1, *tokenizer(text, add_special_tokens=False)["input_ids"]] for text in ("Q: 3 + 4\nA:\n", "hello ")]
    for threshold in (2.0, -1.0, 0.3):
        params = SpecGuardParams(
            acceptance_threshold=threshold,
            n_candidates=3,
            max_tokens=48,
            max_step_tokens=8,
            step_delimiters=["\n"],
            seed=0,
        )
        same = [generate(single, p, params).token_ids == generate(sharded, p, params).token_ids for p in prompts]
        print(f"threshold {threshold:>4}: sharded output equals single-GPU output: {sum(same)}/{len(same)}")
    reference = single.target.generate(
        torch.tensor([prompts[0]], device="cuda:0"), max_new_tokens=48, do_sample=False, eos_token_id=2, pad_token_id=0
    )[0, len(prompts[0]) :].tolist()
    fallback = generate(
        sharded, prompts[0], SpecGuardParams(acceptance_threshold=2.0, max_tokens=48, step_delimiters=["\n"])
    ).token_ids
    print(f"sharded all-fallback equals the single-GPU target's greedy generate(): {fallback == reference}")


if __name__ == "__main__":
    main()
