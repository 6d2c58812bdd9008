"""GSM8K accuracy of the target, the draft and SpecGuard configurations on one pair, in worker processes.

    python -m research.gsm8k.run --pair-dir /tmp/w --data ../shared/data/gsm8k/train.jsonl --range 0:200 \
        --methods research/gsm8k/sweep.json --workers 12 --deadline 500 --out /tmp/out/train.jsonl

Each worker loads the pair once and takes tasks from one queue: an engine task is one problem under one
SpecGuard configuration (the library's own ``generate``, greedy or sampled), a Hugging Face task is a
batch of problems through the target's or the draft's own ``generate()``. Tasks go out problem by
problem, every method of a problem before the next problem, so a run cut short by ``--deadline`` still
leaves every method with about the same problems (what paired comparisons need). One JSON line per
(method, problem): correctness, answer, token counts by who wrote them, seconds, and each step's
verdict, signals and label (:func:`research.gsm8k.data.step_label`).

Small-batch decoding leaves a GPU mostly idle, so workers share it (with CUDA MPS where available).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import queue
import sys
import time
from pathlib import Path
from typing import Any

import torch

MAX_TOKENS = 320
_STATE: dict[str, Any] = {}


def _load(args: argparse.Namespace) -> Any:
    from langchain_specguard.engine import load_pair
    from langchain_specguard.engine.packaged import QWEN_CODER, check_tokenizer, load_packaged_pair

    if args.pair_dir:  # the pair converted once to safetensors (research/gsm8k/convert.py)
        root = Path(args.pair_dir)
        pair = load_pair(
            str(root / "target"),
            str(root / "draft"),
            tokenizer=str(root / "tokenizer"),
            draft_tokenizer=str(root / "tokenizer"),
            dtype=args.dtype,
            device=args.device,
        )
        check_tokenizer(QWEN_CODER, pair.tokenizer)
        ends = {pair.tokenizer.convert_tokens_to_ids(t) for t in QWEN_CODER.extra_eos}
        pair.eos_token_ids = pair.eos_token_ids | ends
        pair.name = QWEN_CODER.target.filename
        return pair
    return load_packaged_pair(args.pair, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)


def _prompt_ids(problem: dict[str, Any]) -> list[int]:
    from research.gsm8k.data import messages

    tok = _STATE["pair"].tokenizer
    ids = tok.apply_chat_template(messages(problem), add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _engine(method: dict[str, Any], problem: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from langchain_specguard.apps.fewshot import TERMINATOR
    from langchain_specguard.engine import CallOptions, SpecGuardParams, generate
    from research.gsm8k.data import correct, step_label

    options = {"max_tokens": args.max_tokens, "compile_decode": False, **method["params"]}
    params = SpecGuardParams(**options, seed=args.seed * 100_003 + problem["index"])
    result = generate(_STATE["pair"], _prompt_ids(problem), params, CallOptions(stop=(TERMINATOR,)))
    right, answer = correct(result.text, problem)
    summary = result.summary
    steps = [
        {
            "a": int(s.accepted),
            "n": s.num_tokens,
            "kept": s.kept_tokens,
            "spec": s.speculated_tokens,
            "score": _num(s.score),
            "g": _num(s.grounding),
            "th": s.threshold,
            **{k: _num(v) for k, v in s.signals.items()},
            "label": step_label(s.draft_text, problem),  # the draft's kept candidate, accepted or not
        }
        for s in result.steps
    ]
    return {
        "correct": right,
        "answer": answer,
        "tokens": len(result.token_ids),
        "draft_tokens": summary["draft_tokens"],
        "kept_tokens": summary["kept_tokens"],
        "speculated_tokens": summary["speculated_tokens"],
        "target_forwards": summary["target_forwards"],
        "seconds": result.seconds,
        "steps": steps,
        "text": result.text if problem["index"] % 50 == 0 else None,
    }


def _hf(method: dict[str, Any], problems: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The target's or the draft's own ``generate()`` over a left-padded batch (greedy or sampled)."""
    from research.gsm8k.data import correct, messages

    pair = _STATE["pair"]
    tok = copy.deepcopy(pair.tokenizer)  # padding side is ours to set, not the pair's
    tok.padding_side = "left"
    model = pair.target if method["model"] == "target" else pair.draft
    texts = [tok.apply_chat_template(messages(p), add_generation_prompt=True, tokenize=False) for p in problems]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(pair.device)
    temperature = float(method.get("temperature", 0.0))
    kwargs: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        torch.manual_seed(args.seed * 100_003 + problems[0]["index"])
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=args.max_tokens,
            eos_token_id=sorted(pair.eos_token_ids),
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            **kwargs,
        )
    seconds = (time.perf_counter() - started) / len(problems)
    records = []
    for problem, row in zip(problems, out[:, batch["input_ids"].shape[1] :].tolist(), strict=True):
        ends = [i for i, t in enumerate(row) if t in pair.eos_token_ids]
        row = row[: ends[0]] if ends else row
        text = tok.decode(row, skip_special_tokens=True)
        right, answer = correct(text, problem)
        records.append(
            {
                "index": problem["index"],
                "correct": right,
                "answer": answer,
                "tokens": len(row),
                "seconds": seconds,
                "text": text if problem["index"] % 50 == 0 else None,
            }
        )
    return records


def _num(value: float) -> float | None:
    return None if value != value else round(float(value), 6)


def _worker(rank: int, args: argparse.Namespace, tasks: Any, results: Any, deadline: float) -> None:
    torch.set_num_threads(1)
    try:
        _STATE["pair"] = _load(args)
    except Exception as exc:  # report and stop: the main process prints it
        results.put({"error": f"worker {rank} could not load the pair: {type(exc).__name__}: {exc}"})
        return
    methods = json.loads(Path(args.methods).read_text())
    from research.gsm8k.data import load

    problems = {p["index"]: p for p in load(args.data, *_range(args.range))}
    results.put({"ready": rank})
    while time.time() < deadline:
        try:
            task = tasks.get(timeout=1)
        except queue.Empty:
            return
        if task is None:
            return
        name, indices = task
        method = next(m for m in methods if m["name"] == name)
        try:
            if method["kind"] == "hf":
                rows = _hf(method, [problems[i] for i in indices], args)
            else:
                rows = [{"index": indices[0], **_engine(method, problems[indices[0]], args)}]
        except Exception as exc:
            results.put({"error": f"{name} on {indices[:3]}: {type(exc).__name__}: {exc}"})
            continue
        for row in rows:
            results.put({"method": name, **row})


def _range(text: str) -> tuple[int, int | None]:
    start, _, stop = text.partition(":")
    return int(start or 0), int(stop) if stop else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="qwen2.5-coder", help="a packaged pair (langchain_specguard.engine.packaged)")
    parser.add_argument("--pair-dir", default=None, help="a directory with target/, draft/ and tokenizer/ instead")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--data", required=True)
    parser.add_argument("--range", default="0:200", help="problems start:stop of the file")
    parser.add_argument("--methods", required=True, help="JSON list of methods (see sweep.json)")
    parser.add_argument("--only", default=None, help="comma-separated method names to run (default: all)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds after which no task starts")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--hf-batch", type=int, default=48)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args(argv)
    from research.gsm8k.data import load

    methods = json.loads(Path(args.methods).read_text())
    if args.only:
        wanted = args.only.split(",")
        methods = [m for m in methods if m["name"] in wanted]
        missing = set(wanted) - {m["name"] for m in methods}
        if missing:
            parser.error(f"unknown methods {sorted(missing)}")
    indices = [p["index"] for p in load(args.data, *_range(args.range))]
    started = time.time()
    deadline = started + args.deadline
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    # batched baselines first (each is one long task), then problem by problem, every method of a problem together
    for m in methods:
        if m["kind"] == "hf":
            for i in range(0, len(indices), args.hf_batch):
                tasks.put((m["name"], indices[i : i + args.hf_batch]))
    for index in indices:
        for m in methods:
            if m["kind"] != "hf":
                tasks.put((m["name"], [index]))
    expected = len(indices) * len(methods)
    for _ in range(args.workers):
        tasks.put(None)
    procs = [ctx.Process(target=_worker, args=(r, args, tasks, results, deadline)) for r in range(args.workers)]
    for p in procs:
        p.start()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, list[bool]] = {}
    last_report = time.time()
    with out.open("a") as f:
        while any(p.is_alive() for p in procs) or not results.empty():
            try:
                row = results.get(timeout=1)
            except queue.Empty:
                row = None
            if row is not None and "error" in row:
                print("ERROR", row["error"], flush=True)
            elif row is not None and "ready" in row:
                print(f"worker {row['ready']} ready after {time.time() - started:.0f} s", flush=True)
            elif row is not None:
                f.write(json.dumps(row) + "\n")
                f.flush()
                done.setdefault(row["method"], []).append(bool(row["correct"]))
            if time.time() - last_report > 30 or (row is None and not any(p.is_alive() for p in procs)):
                last_report = time.time()
                total = sum(len(v) for v in done.values())
                print(
                    f"[{time.time() - started:.0f} s] {total}/{expected} done: "
                    + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in done.items()),
                    flush=True,
                )
            if time.time() > deadline + 120:  # a task started before the deadline has had two more minutes
                break
    for p in procs:
        p.terminate()
    print(f"wrote {out} in {time.time() - started:.0f} s", file=sys.stderr)
    os._exit(0)  # never wait on queues' feeder threads of terminated workers


if __name__ == "__main__":
    main()
