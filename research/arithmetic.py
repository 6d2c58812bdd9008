"""An accuracy testbed that runs without downloads: synthetic multi-step arithmetic.

Models good at GSM8K cannot be fetched on machines without the Hub, so this module generates a task
with verifiable steps, trains a small target and a smaller, weaker draft on it (minutes on a GPU),
and saves both with a character-level tokenizer through ``save_pretrained``. The benchmark then
measures what matters for SpecGuard: does verification catch the draft's wrong steps?

A problem and its reference solution (one step per line, the delimiter SpecGuard steps on):

    Q: Start with 7. Add 5. Multiply by 2. Subtract 3.
    A:
    7 + 5 = 12
    12 * 2 = 24
    24 - 3 = 21
    Answer: 21

    python -m research.arithmetic --out runs/arith --device cuda
    python -m langchain_specguard.apps.bench --target runs/arith/target --draft runs/arith/draft \\
        --data runs/arith/test.jsonl --prompt raw --methods target,draft,specguard --thresholds 0.3,0.5,0.7
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from langchain_specguard.apps.fewshot import raw_prompt_ids as encode_prompt

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
CHARACTERS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"()+-*/=<>[]{}_#\n")
_OPS = [("Add", "+"), ("Subtract", "-"), ("Multiply by", "*")]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (plus ``\\n\\n``): step delimiters are real tokens, no merges to learn."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for piece in [*CHARACTERS, "\n\n"]:
        vocab.setdefault(piece, len(vocab))
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"</?s>|<pad>|\n\n|\n|."), behavior="isolated")
    inner.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_problem(rng: random.Random, min_ops: int = 2, max_ops: int = 4) -> dict[str, Any]:
    """A start value and operations whose running result stays in 0..999; GSM8K-style record."""
    value = rng.randint(1, 20)
    words, steps = [f"Start with {value}."], []
    for _ in range(rng.randint(min_ops, max_ops)):
        while True:
            name, sign = rng.choice(_OPS)
            operand = rng.randint(2, 9) if sign == "*" else rng.randint(1, 30)
            result = value + operand if sign == "+" else value - operand if sign == "-" else value * operand
            if 0 <= result <= 999:
                break
        words.append(f"{name} {operand}.")
        steps.append(f"{value} {sign} {operand} = {result}")
        value = result
    solution = "\n".join([*steps, f"Answer: {value}"])
    return {"question": " ".join(words), "solution": solution, "answer": f"{solution}\n#### {value}"}


def _batch(
    tokenizer: PreTrainedTokenizerFast, rng: random.Random, size: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    texts = []
    for _ in range(size):
        problem = make_problem(rng)
        texts.append((problem["question"], problem["solution"]))
    ids, labels = [], []
    for question, solution in texts:
        p = encode_prompt(tokenizer, question)
        s = [*tokenizer(solution, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        ids.append(p + s)
        labels.append([-100] * len(p) + s)  # learn the solution, not the question
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
    label_ids = torch.tensor([x + [-100] * (width - len(x)) for x in labels], device=device)
    return input_ids, label_ids


def train_model(
    config: LlamaConfig,
    tokenizer: PreTrainedTokenizerFast,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    device: str,
    seed: int,
) -> tuple[LlamaForCausalLM, float]:
    """Train from scratch with AdamW and a cosine schedule; returns the model and its last loss."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = LlamaForCausalLM(config)
    model.to(device)  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        input_ids, labels = _batch(tokenizer, rng, batch_size, device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval(), float(loss.detach())


def llama_config(vocab: int, hidden: int, layers: int, heads: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )


def build(out: Path, *, target_steps: int, draft_steps: int, device: str, test_size: int, seed: int) -> dict[str, Any]:
    """Train the pair, save both and a held-out test set; return what was done."""
    tokenizer = char_tokenizer()
    report: dict[str, Any] = {}
    specs = {
        "target": (llama_config(len(tokenizer), 256, 6, 8), target_steps, 1e-3),
        "draft": (llama_config(len(tokenizer), 96, 2, 4), draft_steps, 2e-3),
    }
    for name, (config, steps, lr) in specs.items():
        started = time.perf_counter()
        model, loss = train_model(config, tokenizer, steps=steps, batch_size=128, lr=lr, device=device, seed=seed)
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        report[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "steps": steps,
            "final_loss": loss,
            "train_seconds": time.perf_counter() - started,
        }
    rng = random.Random(seed + 10_000)  # disjoint stream from training
    with open(out / "test.jsonl", "w", encoding="utf-8") as handle:
        for _ in range(test_size):
            problem = make_problem(rng)
            handle.write(json.dumps({"question": problem["question"], "answer": problem["answer"]}) + "\n")
    (out / "testbed.json").write_text(json.dumps(report, indent=2))
    return report


_STEP = re.compile(r"^\s*(-?\d+) ([+*-]) (-?\d+) = (-?\d+)\s*$")


def step_is_correct(line: str) -> bool | None:
    """Whether an ``a op b = c`` line is right; None for lines that are not arithmetic."""
    match = _STEP.match(line)
    if match is None:
        return None
    a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
    return (a + b if op == "+" else a - b if op == "-" else a * b) == c


def auc(positives: list[float], negatives: list[float]) -> float | None:
    """Probability that a random correct step scores above a random wrong one (ties count half)."""
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def signal_separation(pair: Any, questions: list[str], *, max_tokens: int = 64) -> dict[str, Any]:
    """How well each signal tells the draft's correct arithmetic steps from its wrong ones (ROC AUC).

    Every draft step is accepted (threshold below 0, one greedy candidate) so the draft writes the
    whole solution, and each arithmetic line is checked. Run per signal source and grounding method.
    """
    from langchain_specguard.engine import SpecGuardParams, generate
    from langchain_specguard.engine.loading import decode

    results: dict[str, Any] = {}
    tok = pair.tokenizer
    prompts = [encode_prompt(tok, q) for q in questions]
    for source in ("target", "draft"):
        for method in ("rollout", "mean"):
            params = SpecGuardParams(
                acceptance_threshold=-1.0,
                n_candidates=1,
                signal_source=source,
                decision="both",  # records attention, so grounding is measured too
                grounding_method=method,
                step_delimiters=["\n"],
                max_tokens=max_tokens,
                max_step_tokens=24,
            )
            scored: dict[str, tuple[list[float], list[float]]] = {
                k: ([], []) for k in ("grounding", "confidence", "score")
            }
            for prompt in prompts:
                for step in generate(pair, prompt, params).steps:
                    correct = step_is_correct(decode(tok, step.token_ids))
                    if correct is None:
                        continue
                    for key in scored:
                        scored[key][0 if correct else 1].append(float(getattr(step, key)))
            results[f"{source}/{method}"] = {
                "correct_steps": len(scored["score"][0]),
                "wrong_steps": len(scored["score"][1]),
                **{f"auc_{key}": auc(*scored[key]) for key in scored},
            }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--target-steps", type=int, default=1500)
    parser.add_argument("--draft-steps", type=int, default=250)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--separation", type=int, default=0, help="also score N test problems' draft steps (AUC)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = build(
        out,
        target_steps=args.target_steps,
        draft_steps=args.draft_steps,
        device=args.device,
        test_size=args.test_size,
        seed=args.seed,
    )
    if args.separation:
        from langchain_specguard.engine import load_pair

        pair = load_pair(str(out / "target"), str(out / "draft"), device=args.device, dtype="float32")
        with open(out / "test.jsonl", encoding="utf-8") as handle:
            questions = [json.loads(line)["question"] for line in handle][: args.separation]
        report["signal_separation"] = signal_separation(pair, questions)
        (out / "testbed.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
