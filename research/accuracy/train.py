"""Fine-tune a target on the word problems and train an early-exit draft from its first layers (GPU, minutes).

    python -m research.accuracy.train --model DIR [--gguf FILE] --out runs/acc --device cuda

The target is the pretrained model (Gemma 3 270M from its GGUF) fine-tuned on generated problems with
their step-by-step solutions. The draft is the fine-tuned target's first ``--draft-layers`` layers with
a trained exit: a copy of those layers and the final norm, trained on the same data for fewer steps
while the embedding and LM head stay frozen (shared in value with the target's). So the draft agrees
with the target often, not always, which is what step verification is for. Both are saved with
``save_pretrained`` next to the tokenizer, ready for ``load_pair``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from langchain_specguard.engine.loading import load_model, load_tokenizer
from research.accuracy.problems import dataset, final_answer, prompt_text

TRAIN_SEED = 1000
"""Training problems come from this seed; evaluation uses other seeds."""


def encode(tokenizer: Any, problem: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Prompt ids (with BOS, as the evaluation encodes them) and the solution ids ending in EOS."""
    prompt = tokenizer(prompt_text(problem))["input_ids"]
    answer = tokenizer(problem["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, answer


def batches(tokenizer: Any, problems: list[dict[str, Any]], size: int, rng: random.Random) -> Any:
    """Endless shuffled batches: input ids, attention mask and labels (-100 outside the solution)."""
    encoded = [encode(tokenizer, p) for p in problems]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    while True:
        rng.shuffle(encoded)
        for start in range(0, len(encoded) - size + 1, size):
            chunk = encoded[start : start + size]
            width = max(len(p) + len(a) for p, a in chunk)
            ids = torch.full((size, width), pad)
            labels = torch.full((size, width), -100)
            mask = torch.zeros((size, width), dtype=torch.long)
            for row, (p, a) in enumerate(chunk):
                ids[row, : len(p) + len(a)] = torch.tensor(p + a)
                labels[row, len(p) : len(p) + len(a)] = torch.tensor(a)
                mask[row, : len(p) + len(a)] = 1
            yield ids, mask, labels


def train(model: Any, data: Any, steps: int, lr: float, device: str, label: str) -> list[float]:
    """AdamW with warm-up and cosine decay, bf16 autocast on CUDA; returns the loss every 25 steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    losses, started = [], time.time()
    for step in range(steps):
        ids, mask, labels = (t.to(device) for t in next(data))
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            losses.append(float(loss))
            print(f"{label} step {step:4d} loss {float(loss):.4f} ({time.time() - started:.0f} s)", flush=True)
    model.eval()
    return losses


def early_exit_draft(target: Any, layers: int) -> Any:
    """A copy of the target's first ``layers`` layers and final norm; embedding and head frozen."""
    draft = copy.deepcopy(target)
    draft.model.layers = torch.nn.ModuleList(list(draft.model.layers)[:layers])
    draft.config.num_hidden_layers = layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = list(draft.config.layer_types)[:layers]
    draft.get_input_embeddings().weight.requires_grad_(False)
    draft.get_output_embeddings().weight.requires_grad_(False)
    return draft


@torch.no_grad()
def quick_accuracy(model: Any, tokenizer: Any, problems: list[dict[str, Any]], device: str) -> float:
    """Greedy accuracy on a few problems, one at a time (a sanity check, not the evaluation)."""
    right = 0
    for problem in problems:
        prompt = torch.tensor([encode(tokenizer, problem)[0]], device=device)
        out = model.generate(prompt, max_new_tokens=200, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
        right += final_answer(text) == problem["answer"]
    return right / len(problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="directory of the pretrained model (or of its GGUF)")
    parser.add_argument("--gguf", default=None, help="GGUF file name inside --model")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's own)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--train-problems", type=int, default=24000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--target-steps", type=int, default=400)
    parser.add_argument("--target-lr", type=float, default=5e-5)
    parser.add_argument("--draft-layers", type=int, default=8)
    parser.add_argument("--draft-steps", type=int, default=1200)
    parser.add_argument("--draft-lr", type=float, default=2e-4)
    parser.add_argument("--check", type=int, default=40, help="problems for the quick accuracy check")
    parser.add_argument("--trained-target", default=None, help="a target fine-tuned before: train only a new draft")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    out = Path(args.out)
    started = time.time()
    if args.trained_target:  # only a new draft, from a target fine-tuned before
        model = load_model(args.trained_target, device=args.device, dtype=torch.float32)
        args.tokenizer = args.tokenizer or args.trained_target
    else:
        model = load_model(args.model, device=args.device, dtype=torch.float32, gguf_file=args.gguf)
    # transformers before 5.2x converts Gemma's GGUF tokenizer wrongly (no BOS, broken merges; seen on 5.17),
    # so the tokenizer can come from a directory saved where the conversion is right
    tokenizer = load_tokenizer(args.tokenizer, model, gguf_file=None if args.tokenizer else args.gguf)
    model.hf_quantizer = None  # dequantised from the GGUF: what we save is a plain model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    print(f"loaded in {time.time() - started:.0f} s", flush=True)
    problems = dataset(TRAIN_SEED, args.train_problems)
    check = dataset(TRAIN_SEED + 1, args.check)
    report: dict[str, Any] = {"args": vars(args)}
    if not args.trained_target:  # the pretrained model before fine-tuning
        report["base_accuracy"] = quick_accuracy(model, tokenizer, check[:8], args.device)
    rng = random.Random(0)
    if not args.trained_target:
        report["target_loss"] = train(
            model,
            batches(tokenizer, problems, args.batch, rng),
            args.target_steps,
            args.target_lr,
            args.device,
            "target",
        )
    draft = early_exit_draft(model, args.draft_layers)
    report["draft_loss"] = train(
        draft, batches(tokenizer, problems, args.batch, rng), args.draft_steps, args.draft_lr, args.device, "draft"
    )
    report["target_accuracy"] = quick_accuracy(model, tokenizer, check, args.device)
    report["draft_accuracy"] = quick_accuracy(draft, tokenizer, check, args.device)
    for name, net in (("target", model), ("draft", draft))[1 if args.trained_target else 0 :]:
        # float32: fine-tuning moves weights by less than bfloat16 can represent (2^-8 of their size),
        # so rounding to bfloat16 would undo much of it (seen: 81% -> 0% accuracy)
        net.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    report["seconds"] = time.time() - started
    (out / "train_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if "loss" not in k}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
