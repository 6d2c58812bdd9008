"""Benchmark: SpecGuard vs target-only greedy vs draft-only vs token-level speculative decoding.

All methods run in one process on the same prompts and token budget, interleaved problem by
problem so that clock or thermal drift hits every method alike. Needs no LangChain.

    python -m langchain_specguard.bench --data ../shared/data/gsm8k/test.jsonl --limit 20 \\
        --methods target,draft,assisted,specguard --thresholds 0.3,0.5,0.7 --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .engine import SpecGuardParams, generate, load_embedded_pair, load_pair
from .engine.loading import ModelPair, decode
from .fewshot import DEFAULT_QUESTION, chat_messages, extract_answer, trim_to_answer
from .testbed import encode_prompt


@dataclass
class Run:
    tokens: int
    text: str
    target_forwards: int | None = None
    steps: int | None = None
    accepted: int | None = None
    phases: dict[str, float] = field(default_factory=dict)  # SpecGuard: seconds in draft / verify / target


@dataclass
class Tally:
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    target_forwards: int = 0
    steps: int = 0
    accepted: int = 0
    peak_bytes: int = 0
    phases: dict[str, float] = field(default_factory=dict)

    def row(self, name: str) -> dict[str, Any]:
        total_s, total_t = sum(self.seconds), sum(self.tokens)
        return {
            "method": name,
            "problems": len(self.seconds),
            "accuracy": sum(self.correct) / len(self.correct) if self.correct else None,
            "tokens_per_s": total_t / total_s if total_s else 0.0,
            "median_s_per_problem": statistics.median(self.seconds) if self.seconds else None,
            "output_tokens": total_t,
            "target_forwards_per_token": self.target_forwards / total_t if total_t and self.steps else None,
            "acceptance_rate": self.accepted / self.steps if self.steps else None,
            "peak_gpu_mib": self.peak_bytes / 2**20 if self.peak_bytes else None,
            **{f"{phase}_share": seconds / total_s for phase, seconds in self.phases.items() if total_s},
        }


def load_problems(path: str | None, limit: int) -> list[tuple[str, float | None]]:
    """GSM8K-style jsonl (``question``, ``answer`` ending in ``#### N``), or the default question."""
    if path is None:
        return [(DEFAULT_QUESTION, 8.0)]
    problems: list[tuple[str, float | None]] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            item = json.loads(line)
            gold = item["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
            problems.append((item["question"], float(gold)))
            if len(problems) >= limit:
                break
    return problems


def encode_prompts(pair: ModelPair, questions: list[str], style: str) -> list[list[int]]:
    """``chat``: the few-shot prompt through the chat template; ``raw``: the testbed's ``Q: ...\nA:\n``."""
    tok = pair.tokenizer
    if style == "raw":
        return [encode_prompt(tok, q) for q in questions]
    return [
        tok(
            tok.apply_chat_template(chat_messages(q), add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for q in questions
    ]


def _hf_runner(
    pair: ModelPair, model: torch.nn.Module, max_tokens: int, assistant: Any = None, static: bool = False
) -> Callable:
    eos = sorted(pair.eos_token_ids)
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else eos[0]

    def run(prompt: list[int]) -> Run:
        ids = torch.tensor([prompt], device=pair.device)
        kwargs: dict[str, Any] = {"assistant_model": assistant} if assistant is not None else {}
        if static:  # transformers compiles the decode step (CUDA graphs) when the cache is static
            kwargs["cache_implementation"] = "static"
        out = model.generate(  # type: ignore[operator]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
            **kwargs,
        )
        new = out[0, len(prompt) :].tolist()
        return Run(tokens=len(new), text=decode(pair.tokenizer, new))

    return run


def _specguard_runner(pair: ModelPair, params: SpecGuardParams) -> Callable:
    def run(prompt: list[int]) -> Run:
        result = generate(pair, prompt, params)
        summary = result.summary
        return Run(
            tokens=len(result.token_ids),
            text=result.text,
            target_forwards=summary["target_forwards"],
            steps=summary["steps"],
            accepted=summary["accepted_steps"],
            phases={k: summary[f"{k}_seconds"] for k in ("draft", "verify", "target")},
        )

    return run


def build_methods(pair: ModelPair, args: argparse.Namespace) -> dict[str, Callable]:
    methods: dict[str, Callable] = {}
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in wanted:
        if name == "target":
            methods["target"] = _hf_runner(pair, pair.target, args.max_tokens)
        elif name == "target-static":
            methods["target-static"] = _hf_runner(pair, pair.target, args.max_tokens, static=True)
        elif name == "draft":
            methods["draft"] = _hf_runner(pair, pair.draft, args.max_tokens)
        elif name == "assisted":
            methods["assisted"] = _hf_runner(pair, pair.target, args.max_tokens, assistant=pair.draft)
        elif name == "specguard":
            for source in args.signal_sources.split(","):
                for threshold in (float(t) for t in args.thresholds.split(",")):
                    params = SpecGuardParams(
                        acceptance_threshold=threshold,
                        signal_source=source.strip(),
                        max_tokens=args.max_tokens,
                        max_step_tokens=args.max_step_tokens,
                        n_candidates=args.n_candidates,
                        step_delimiters=["\n"],
                        grounding_method=args.grounding,
                    )
                    methods[f"specguard[{source.strip()},t={threshold:g}]"] = _specguard_runner(pair, params)
                    if args.graphs:
                        graphed = params.model_copy(update={"cache_implementation": "static", "compile_decode": True})
                        methods[f"specguard[{source.strip()},t={threshold:g},graphs]"] = _specguard_runner(
                            pair, graphed
                        )
        else:
            raise SystemExit(f"unknown method {name!r}: choose from target, target-static, draft, assisted, specguard")
    return methods


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_benchmark(pair: ModelPair, args: argparse.Namespace) -> dict[str, Any]:
    problems = load_problems(args.data, args.limit)
    prompts = encode_prompts(pair, [q for q, _ in problems], args.prompt)
    methods = build_methods(pair, args)
    tallies = {name: Tally() for name in methods}
    device = pair.device
    for runner in methods.values():  # warm-up: kernels, allocator, lazy init
        runner(prompts[0])
    try:
        from tqdm import tqdm

        progress: Any = tqdm(total=len(prompts) * len(methods), desc="bench", unit="run")
    except ImportError:  # pragma: no cover
        progress = None
    samples: list[dict[str, Any]] = []
    for (question, gold), prompt in zip(problems, prompts, strict=True):
        for name, runner in methods.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            started = time.perf_counter()
            run = runner(prompt)
            _sync(device)
            seconds = time.perf_counter() - started
            tally = tallies[name]
            tally.seconds.append(seconds)
            tally.tokens.append(run.tokens)
            answer = extract_answer(run.text)
            tally.correct.append(gold is not None and answer is not None and abs(answer - gold) < 1e-6)
            if run.steps is not None:
                tally.steps += run.steps
                tally.accepted += run.accepted or 0
                tally.target_forwards += run.target_forwards or 0
                for phase, phase_seconds in run.phases.items():
                    tally.phases[phase] = tally.phases.get(phase, 0.0) + phase_seconds
            if device.type == "cuda":
                tally.peak_bytes = max(tally.peak_bytes, torch.cuda.max_memory_allocated(device))
            if len(samples) < 3 * len(methods):
                samples.append({"method": name, "question": question, "output": trim_to_answer(run.text)})
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    rows = [tally.row(name) for name, tally in tallies.items()]
    base = next((r["tokens_per_s"] for r in rows if r["method"] == "target"), None)
    for row in rows:
        row["speed_vs_target"] = row["tokens_per_s"] / base if base else None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": pair.name,
        "draft_layers": pair.draft_layers,
        "dtype": str(pair.target.dtype),
        "max_tokens": args.max_tokens,
        "rows": rows,
        "samples": samples,
    }


def _shares(row: dict[str, Any]) -> str:
    if "verify_share" not in row:
        return "-"
    return "/".join(f"{100 * row[f'{phase}_share']:.0f}" for phase in ("draft", "verify", "target"))


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{'method':<28} {'acc':>5} {'tok/s':>8} {'x target':>8} {'med s':>7} "
        f"{'tgt fwd/tok':>11} {'accept':>6} {'MiB':>7}  {'draft/verify/target time %':>26}"
    )
    lines = [f"{result['model']} on {result['device']} ({result['dtype']}, torch {result['torch']})", head]

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in result["rows"]:
        lines.append(
            f"{r['method']:<28} {fmt(r['accuracy'], '.2f'):>5} {r['tokens_per_s']:8.1f} "
            f"{fmt(r['speed_vs_target'], '.2f'):>8} {fmt(r['median_s_per_problem'], '.2f'):>7} "
            f"{fmt(r['target_forwards_per_token'], '.3f'):>11} {fmt(r['acceptance_rate'], '.2f'):>6} "
            f"{fmt(r['peak_gpu_mib'], '.0f'):>7}  {_shares(r):>26}"
        )
    return "\n".join(lines)


def plot_results(result: dict[str, Any], path: str) -> None:
    """Accuracy against tokens/s, one point per method (needs matplotlib: the ``plot`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    markers = "osD^v<>phX*"
    for i, row in enumerate(result["rows"]):
        ax.scatter(
            row["tokens_per_s"],
            row["accuracy"] or 0.0,
            marker=markers[i % len(markers)],
            s=60,
            label=row["method"],
            alpha=0.85,
        )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlabel("tokens / s")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{Path(str(result['model'])).name} on {result['device']}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="target model id/path; default: the embedded Gemma 3 270M")
    parser.add_argument("--draft", default=None, help="draft model id/path")
    parser.add_argument(
        "--draft-layers", type=int, default=None, help="self-speculative draft: target's first k layers"
    )
    parser.add_argument("--data", default=None, help="GSM8K-style jsonl; default: one built-in question")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--methods", default="target,draft,assisted,specguard")
    parser.add_argument("--prompt", default="chat", choices=["chat", "raw"], help="raw: the testbed's format")
    parser.add_argument("--thresholds", default="0.5")
    parser.add_argument(
        "--graphs", action="store_true", help="also run each SpecGuard setting with static caches + CUDA graphs"
    )
    parser.add_argument("--signal-sources", default="target")
    parser.add_argument("--grounding", default="rollout", choices=["rollout", "mean"])
    parser.add_argument("--n-candidates", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-step-tokens", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--plot", default=None, help="write an accuracy-vs-speed PNG here (needs matplotlib)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.target is None:
        pair = load_embedded_pair(draft_layers=args.draft_layers or 15, device=args.device, dtype=args.dtype)
    else:
        pair = load_pair(
            args.target,
            args.draft,
            draft_layers=args.draft_layers if args.draft is None else None,
            device=args.device,
            dtype=args.dtype,
        )
    print(f"loaded {pair.name} in {time.perf_counter() - started:.1f} s", flush=True)
    result = run_benchmark(pair, args)
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.plot:
        plot_results(result, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
