"""Throughput under concurrency: aggregate output tokens/s and per-call latency with 1 to 32 calls at once.

Every method answers the same prompts with the same token budget, at each concurrency ``c``:

- ``generate``: transformers' batched ``generate()`` of the target alone: the prompts in batches of ``c``,
  left-padded to one length, static cache + compile (``--eager-generate``: dynamic cache, no compile); every
  call of a batch returns when the batch does;
- ``specguard``: ``c`` client threads calling SpecGuard at once (a closed loop: each takes the next prompt
  when its call returns); concurrent calls share batched passes;
- ``serial``: the same clients with ``max_batch_size=1``: each call's passes run alone, one call at a time,
  which is what concurrent calls got before batching (batch-1 passes, interleaved);
- ``sd``: token-level speculative decoding through the engine (one candidate, every step written by the
  target while the draft speculates), the same clients, batched.

Each method is warmed at each concurrency before it is timed (compilation, graph capture; ``generate`` sees
every batch once untimed, since a static cache compiles per shape). Reported per method and concurrency:
aggregate output tokens/s (all tokens over the wall time), p50/p95 latency per call, tokens per call, the
draft share (SpecGuard: share of output tokens from accepted draft steps) and accuracy where the problems
have answers.

    # the real pair, GSM8K test prompts
    python -m langchain_specguard.apps.throughput --pair qwen2.5-coder --data test.jsonl --concurrency 1,4,8,16,32 \\
        --max-tokens 256 --stop "Done." --out results.json --plot throughput.png
    # planted 7B/0.5B shapes (GPU)
    python -m langchain_specguard.apps.throughput --synthetic qwen2.5-7b:qwen2.5-0.5b --agreement 0.97 \\
        --max-tokens 128 --max-step-tokens 24 --concurrency 1,4,8,16,32
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine import CallOptions, SpecGuardParams, generate, load_embedded_pair, load_pair
from ..engine.loading import ModelPair, decode
from .bench import Run, _environment, answer_problems, specguard_params


@dataclass
class Answer:
    tokens: int
    text: str
    seconds: float
    draft_tokens: int = 0


@dataclass
class Measured:
    """One method at one concurrency."""

    method: str
    concurrency: int
    wall: float
    answers: list[Answer]
    correct: list[bool] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        tokens = sum(a.tokens for a in self.answers)
        latencies = sorted(a.seconds for a in self.answers)
        return {
            "method": self.method,
            "concurrency": self.concurrency,
            "calls": len(self.answers),
            "tokens_per_s": tokens / self.wall if self.wall else 0.0,
            "wall_s": self.wall,
            "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
            "tokens_per_call": tokens / len(self.answers),
            "draft_share": sum(a.draft_tokens for a in self.answers) / tokens if tokens else 0.0,
            "accuracy": sum(self.correct) / len(self.correct) if self.correct else None,
        }


Call = Callable[[list[int]], Answer]


def engine_call(pair: ModelPair, params: SpecGuardParams, stop: tuple[str, ...], max_batch_size: int) -> Call:
    options = CallOptions(stop=stop, max_batch_size=max_batch_size)

    def call(prompt: list[int]) -> Answer:
        started = time.perf_counter()
        result = generate(pair, prompt, params, options)
        seconds = time.perf_counter() - started
        draft = result.summary["draft_tokens"]
        return Answer(len(result.token_ids), result.text, seconds, draft)

    return call


def clients(call: Call, prompts: list[list[int]], concurrency: int) -> tuple[float, list[Answer]]:
    """``concurrency`` threads answering ``prompts`` in a closed loop; the wall time and the answers in order."""
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(prompts)):
        todo.put(i)
    answers: list[Answer | None] = [None] * len(prompts)
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                answers[i] = call(prompts[i])
            except BaseException as error:
                errors.append(error)
                return

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return wall, [a for a in answers if a is not None]


def batched_generate(
    pair: ModelPair, prompts: list[list[int]], concurrency: int, max_tokens: int, stop: tuple[str, ...], static: bool
) -> tuple[float, list[Answer]]:
    """The target's own ``generate()`` on batches of ``concurrency`` prompts, left-padded to one length (so a static
    cache has one shape per batch size); each batch runs twice, the first time untimed."""
    tok = pair.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(pair.eos_token_ids)
    width = max(len(p) for p in prompts)
    eos = sorted(pair.eos_token_ids)
    answers: list[Answer] = []
    wall = 0.0
    for start in range(0, len(prompts), concurrency):
        batch = prompts[start : start + concurrency]
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=pair.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=pair.device)
        kwargs: dict[str, Any] = {"cache_implementation": "static"} if static else {}
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=tok)
        for _ in range(2 if static else 1):  # with a static cache the first run of each batch compiles; then timed
            _sync(pair.device)
            started = time.perf_counter()
            out = pair.local_target.generate(  # type: ignore[operator]
                ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                pad_token_id=pad, **kwargs,
            )  # fmt: skip
            _sync(pair.device)
            seconds = time.perf_counter() - started
        wall += seconds
        for row in out[:, width:].tolist():
            ends = [i for i, t in enumerate(row) if t in pair.eos_token_ids or t == pad]
            row = until_stop(tok, row[: ends[0]] if ends else row, stop)
            text = decode(tok, row)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            answers.append(Answer(len(row), text[:cut] if cut >= 0 else text, seconds))
    return wall, answers


def until_stop(tokenizer: Any, row: list[int], stop: tuple[str, ...]) -> list[int]:
    """``row`` up to the token that completes the first stop string: what a call that stops there is charged
    (a batch's rows go on after their own stop until the whole batch is done, which must not count as throughput)."""
    if not stop or not any(s in decode(tokenizer, row) for s in stop):
        return row
    low, high = 1, len(row)  # the shortest prefix whose text holds a stop string
    while low < high:
        middle = (low + high) // 2
        if any(s in decode(tokenizer, row[:middle]) for s in stop):
            high = middle
        else:
            low = middle + 1
    return row[:low]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(pair: ModelPair, prompts: list[list[int]], check: Callable[[int, str], bool | None], args: argparse.Namespace
        ) -> list[dict[str, Any]]:  # fmt: skip
    stop = tuple(s for s in (args.stop or "").split("|") if s)
    base = specguard_params(args)
    if args.no_compile:
        base = base.model_copy(update={"compile_decode": False})
    sd = base.model_copy(update={"n_candidates": 1, "acceptance_threshold": 2.0})
    methods: dict[str, Callable[[int], Call]] = {
        "specguard": lambda c: engine_call(pair, base, stop, max(c, 1)),
        "serial": lambda c: engine_call(pair, base, stop, 1),
        "sd": lambda c: engine_call(pair, sd, stop, max(c, 1)),
    }
    rows: list[dict[str, Any]] = []
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        share = prompts[: max(args.calls_per_client * concurrency, args.min_calls)]
        for method in wanted:
            only = {"serial": args.serial_at, "sd": args.sd_at}.get(method)
            if only and concurrency not in [int(c) for c in only.split(",")]:
                continue
            started = time.perf_counter()
            if method == "generate":
                wall, answers = batched_generate(
                    pair, share, concurrency, args.max_tokens, stop, not args.eager_generate
                )
            else:
                call = methods[method](concurrency)
                clients(call, share[:concurrency], concurrency)  # warm: compile and capture this concurrency's shapes
                wall, answers = clients(call, share, concurrency)
            measured = Measured(method, concurrency, wall, answers)
            measured.correct = [c for i, a in enumerate(answers) if (c := check(i, a.text)) is not None]
            row = measured.row()
            row["run_s"] = time.perf_counter() - started
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<10} {'calls':>5} {'conc':>4} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} {'tok/call':>8} "
             f"{'draft':>6} {'acc':>5}"]  # fmt: skip
    for r in rows:
        accuracy = f"{r['accuracy']:.2f}" if r["accuracy"] is not None else "-"
        lines.append(
            f"{r['method']:<10} {r['calls']:>5} {r['concurrency']:>4} {r['tokens_per_s']:>8.1f} {r['p50_s']:>7.2f} "
            f"{r['p95_s']:>7.2f} {r['tokens_per_call']:>8.1f} {r['draft_share']:>6.2f} {accuracy:>5}"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        axis.plot([r["concurrency"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", label=method)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("concurrent calls")
    axis.set_ylabel("aggregate output tokens/s")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default=None, help="a pair installed from PyPI, e.g. qwen2.5-coder")
    parser.add_argument("--target", default=None)
    parser.add_argument("--draft", default=None)
    parser.add_argument("--draft-layers", type=int, default=None)
    parser.add_argument("--synthetic", default=None, metavar="TARGET:DRAFT", help="planted real-shape pair (GPU)")
    parser.add_argument("--agreement", type=float, default=0.97, help="synthetic: draft/target agreement")
    parser.add_argument("--prompt-tokens", type=int, default=200, help="synthetic: prompt length")
    parser.add_argument("--data", default=None, help="GSM8K-style jsonl")
    parser.add_argument("--concurrency", default="1,4,8,16,32")
    parser.add_argument("--methods", default="generate,specguard,serial,sd")
    parser.add_argument("--serial-at", default="8", help="concurrencies at which 'serial' runs (it is slow)")
    parser.add_argument("--sd-at", default=None, help="concurrencies at which 'sd' runs (default: all)")
    parser.add_argument("--calls-per-client", type=int, default=2, help="calls per concurrency: this x clients...")
    parser.add_argument("--min-calls", type=int, default=8, help="...and at least this many")
    parser.add_argument("--eager-generate", action="store_true", help="generate() with a dynamic cache, no compile")
    parser.add_argument("--no-compile", action="store_true", help="SpecGuard: CUDA graphs of eager kernels, no compile")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-step-tokens", type=int, default=None)
    parser.add_argument("--n-candidates", type=int, default=None)
    parser.add_argument(
        "--step-delimiters", default=None, type=lambda text: text.encode().decode("unicode_escape").split("|"),
    )  # fmt: skip
    parser.add_argument("--stop", default=None, help="'|'-separated stop sequences, e.g. 'Done.'")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    needed = max(max(args.calls_per_client * int(c), args.min_calls) for c in args.concurrency.split(","))
    started = time.perf_counter()
    check: Callable[[int, str], bool | None] = lambda i, text: None  # noqa: E731
    if args.synthetic:
        from . import synthetic

        target_shape, _, draft_shape = args.synthetic.partition(":")
        planted = synthetic.synthetic_pair(
            target_shape, draft_shape or None, args.agreement, draft_layers=args.draft_layers,
            device=args.device or "cuda",
        )  # fmt: skip
        pair: ModelPair = planted
        prompts = synthetic.synthetic_prompts(planted, needed, args.prompt_tokens)
    else:
        if args.pair is not None:
            from ..engine.packaged import load_packaged_pair

            pair = load_packaged_pair(args.pair, device=args.device, dtype=args.dtype)
        elif args.target is None:
            pair = load_embedded_pair(draft_layers=args.draft_layers or 15, device=args.device, dtype=args.dtype)
        else:
            pair = load_pair(args.target, args.draft, draft_layers=args.draft_layers, device=args.device,
                             dtype=args.dtype)  # fmt: skip
        args.limit, args.prompt = needed, "chat"
        problems = answer_problems(pair, args)
        prompts = [p.prompt for p in problems]
        if args.data:
            check = lambda i, text: problems[i].check(Run(tokens=[], text=text))  # noqa: E731
    print(f"loaded {pair.name} in {time.perf_counter() - started:.1f} s; {len(prompts)} prompts", flush=True)

    rows = run(pair, prompts, check, args)
    print(format_table(rows))
    result = {**_environment(pair), "args": vars(args), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    if args.plot:
        plot(rows, f"{pair.name}, {result.get('device', '')}", args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
