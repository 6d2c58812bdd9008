"""Accuracy of target, draft, token-level SD and SpecGuard on held-out word problems, plus the signal study.

    python -m research.accuracy.evaluate --target runs/acc/target --draft runs/acc/draft \
        --out runs/acc/eval.json --problems 100 --seeds 1,2,3 --workers 8

Every problem is generated from ``--seeds`` (never the training seed); each seed also seeds sampling.
SpecGuard runs through the library's own engine (``generate``) in worker processes that share the GPU
(small-batch decoding leaves it mostly idle), one loaded pair per worker, under each way of scoring in
``--scorings`` at fixed thresholds and "auto", greedy and sampled. Baselines: the target and the draft
alone and assisted generation (token-level SD), greedy and sampled, one problem at a time. Each
verified step is logged with its signals and two labels: whether the draft's kept candidate was right
(the signal study) and whether the committed step was.

The signal study also scores every step with grounding variants computed from the same attention:
rollout and mean, as the engine now computes them and as it did before the audit (query 0 counted,
residual counted as the step's own), on the full-attention layers of the upper half (the default on
hybrid models) and on the last third of the layers (the earlier default). Decisions always use the
engine's default layers and configured method, so the runs are what a user gets.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import time
from typing import Any

import torch

_EPS = 1e-9
MAX_TOKENS = 256

# --------------------------------------------------------------------------------------------------
# grounding as it was before the audit (for the comparison only)


def legacy_mean(context: torch.Tensor, step: torch.Tensor) -> float:
    share = context / (context + step.sum(-1)).clamp_min(_EPS)
    return float(share.mean())


def legacy_rollout(sink: torch.Tensor, context: torch.Tensor, step: torch.Tensor) -> float:
    m, k = context.shape
    own_eye = torch.eye(k, dtype=context.dtype)
    own_eye[0, 0] = 0.0
    residual_ctx = torch.zeros(k, dtype=context.dtype)
    residual_ctx[0] = 1.0
    ctx = 0.5 * context[m - 1] + 0.5 * residual_ctx
    flow = 0.5 * step[m - 1] + 0.5 * own_eye
    for layer in range(m - 2, -1, -1):
        ctx = ctx + flow @ (0.5 * context[layer] + 0.5 * residual_ctx)
        flow = flow @ (0.5 * step[layer] + 0.5 * own_eye)
    own = flow.sum(-1)
    return float((ctx / (ctx + own).clamp_min(_EPS)).mean())


# --------------------------------------------------------------------------------------------------
# worker state: one loaded pair per process

_STATE: dict[str, Any] = {}


def _layer_sets(model: Any) -> dict[str, tuple[int, ...]]:
    from langchain_specguard.engine.attention import decoder_layers
    from langchain_specguard.engine.scoring import score_layers

    n = len(decoder_layers(model))
    return {"default": score_layers(model, None), "last_third": tuple(range(n - max(1, n // 3), n))}


def _study_scorer(params: Any) -> Any:
    """The engine's grounding scorer, recording the union of the studied layer sets: it scores every variant
    from the same attention (kept in ``_STATE["variants"]``, one entry per scored step) and decides with the
    engine's own score on the default layers. None when the decision reads no grounding (nothing recorded)."""
    from langchain_specguard.engine.scoring import GroundingScorer
    from langchain_specguard.engine.signals import grounding_mean, grounding_rollout, grounding_score

    if not params.uses_grounding:
        return None
    sets = _STATE["sets"][params.signal_source]
    recorded = tuple(sorted(set(sets["default"]) | set(sets["last_third"])))

    class StudyScorer(GroundingScorer):
        def score(self, record: Any, row: int, k: int) -> float:
            sink, context, step = (t.double().cpu() for t in record.for_row(row, k))
            out: dict[str, float | None] = {}
            for name, layers in sets.items():
                idx = [recorded.index(i) for i in layers]
                s, c, st = sink[idx], context[idx], step[idx]
                values = {
                    "rollout": grounding_rollout(s, c, st) if k > 1 else None,
                    "mean": grounding_mean(s, c, st) if k > 1 else None,
                    "legacy_rollout": legacy_rollout(s, c, st),
                    "legacy_mean": legacy_mean(c, st),
                }
                out.update({f"{key}@{name}": value for key, value in values.items()})
            _STATE["variants"].append(out)
            idx = [recorded.index(i) for i in sets["default"]]
            return grounding_score(sink[idx], context[idx], step[idx], self.method)

    return StudyScorer(params.signal_source, recorded, params.grounding_method)


def _init(target: str, draft: str, device: str, dtype: str) -> None:
    from langchain_specguard.engine import load_pair

    torch.set_num_threads(1)
    pair = load_pair(target, draft, dtype=dtype, device=device)
    _STATE.update(pair=pair, variants=[], sets={"target": _layer_sets(pair.target), "draft": _layer_sets(pair.draft)})


def _run_specguard(job: dict[str, Any]) -> list[dict[str, Any]]:
    from langchain_specguard.engine import CallOptions, SpecGuardParams, generate
    from research.accuracy.problems import dataset, final_answer, prompt_text, step_is_correct

    pair = _STATE["pair"]
    options = dict(job["params"])
    problems = dataset(job["seed"], job["problems"])
    records = []
    for index in job["indices"]:
        problem = problems[index]
        params = SpecGuardParams(
            **options, max_tokens=MAX_TOKENS, step_delimiters=["\n"], max_step_tokens=48,
            seed=job["seed"] * 100_000 + index, compile_decode=False,
        )  # fmt: skip
        prompt = pair.tokenizer(prompt_text(problem))["input_ids"]
        _STATE["variants"].clear()
        result = generate(pair, prompt, params, CallOptions(grounding=_study_scorer(params)))
        variants = list(_STATE["variants"])
        if len(variants) != len(result.steps):  # one grounding per verified step; never misalign them
            variants = [{} for _ in result.steps]
        steps = []
        for event, extra in zip(result.steps, variants, strict=True):
            if extra:  # both ways of scoring the step's log-probabilities, whichever one decided
                extra.update({f"confidence_{m}": _num(event.signals.get(m, math.nan)) for m in ("mean", "min")})
            steps.append(
                {
                    "source": event.source,
                    "accepted": event.accepted,
                    "score": _num(event.score),
                    "grounding": _num(event.grounding),
                    "confidence": _num(event.confidence),
                    "threshold": event.threshold,
                    "tokens": event.num_tokens,
                    "draft_right": step_is_correct(event.draft_text, problem),
                    "step_right": step_is_correct(event.text, problem),
                    "variants": extra,
                }
            )
        answer = final_answer(result.text)
        summary = result.summary
        records.append(
            {
                "method": job["name"],
                "seed": job["seed"],
                "index": index,
                "correct": answer == problem["answer"],
                "answer": answer,
                "tokens": len(result.token_ids),
                "draft_tokens": summary["draft_tokens"],
                "seconds": result.seconds,
                "steps": steps,
                "text": result.text if index < 3 else None,
            }
        )
    return records


def _run_baseline(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Target or draft alone, or assisted generation, one problem at a time through ``generate``.

    Unpadded on purpose: run as one left-padded batch on Gemma 3 270M with transformers 5.17, the
    target's first tokens came out as garbage (0.69 against 0.98 unpadded on the same problems).
    """
    from research.accuracy.problems import dataset, final_answer, prompt_text

    pair = _STATE["pair"]
    tok = pair.tokenizer
    problems = [dataset(job["seed"], job["problems"])[i] for i in job["indices"]]
    eos, pad = sorted(pair.eos_token_ids), tok.pad_token_id if tok.pad_token_id is not None else 0
    sampling = job.get("temperature", 0.0) > 0
    kwargs: dict[str, Any] = {"do_sample": sampling, "eos_token_id": eos, "pad_token_id": pad}
    if job["model"] == "assisted":
        model, kwargs["assistant_model"] = pair.target, pair.draft
    else:
        model = pair.target if job["model"] == "target" else pair.draft
    if sampling:
        kwargs.update(temperature=job["temperature"], top_k=0, top_p=1.0)
        torch.manual_seed(job["seed"] * 7919 + job["indices"][0])
    texts: list[str] = []
    started = time.perf_counter()
    for problem in problems:
        ids = torch.tensor([tok(prompt_text(problem))["input_ids"]], device=pair.device)
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, **kwargs)
        texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    seconds = time.perf_counter() - started
    return [
        {
            "method": job["name"],
            "seed": job["seed"],
            "index": i,
            "correct": final_answer(text) == problem["answer"],
            "answer": final_answer(text),
            "seconds": seconds / len(problems),
            "text": text if i < 3 else None,
            "unpadded": True,
        }
        for i, problem, text in zip(job["indices"], problems, texts, strict=True)
    ]


def _run(job: dict[str, Any]) -> list[dict[str, Any]]:
    with torch.inference_mode() if job["kind"] == "specguard" else torch.no_grad():
        try:
            return _run_specguard(job) if job["kind"] == "specguard" else _run_baseline(job)
        except Exception as exc:  # one failing job must not lose the others' results
            return [{"method": job["name"], "seed": job["seed"], "error": f"{type(exc).__name__}: {exc}"}]


def _num(value: float) -> float | None:
    return None if value != value else value


# --------------------------------------------------------------------------------------------------


SCORINGS: dict[str, dict[str, Any]] = {
    "both": {"decision": "both"},  # min(grounding, mean confidence), the default before these measurements
    "confidence": {"decision": "weighted", "grounding_weight": 0.0},  # = decision="confidence", the default now
    "min-confidence": {"decision": "weighted", "grounding_weight": 0.0, "confidence_method": "min"},
    "weighted": {"decision": "weighted", "grounding_weight": 0.5},
    "weighted-0.1": {"decision": "weighted", "grounding_weight": 0.1},
}
"""Ways of scoring a step that the evaluation compares (``--scorings``)."""


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (method, seed, slice of problems) job."""
    seeds = [int(s) for s in args.seeds.split(",")]
    n, chunk = args.problems, args.chunk
    slices = [list(range(i, min(n, i + chunk))) for i in range(0, n, chunk)]
    jobs: list[dict[str, Any]] = []

    def add(name: str, kind: str, indices_list: list[list[int]], **extra: Any) -> None:
        for seed in seeds:
            for indices in indices_list:
                jobs.append({"name": name, "kind": kind, "seed": seed, "problems": n, "indices": indices, **extra})

    wanted = args.baselines.split(",") if args.baselines else None
    for temperature in (0.0, args.temperature):
        tag = "greedy" if temperature == 0 else f"t={temperature:g}"
        for model in ("target", "draft", "assisted"):
            name = f"{model}[{tag}]"
            if (model != "assisted" or args.assisted) and (wanted is None or name in wanted):
                add(name, "baseline", slices, model=model, temperature=temperature)
    for scoring in filter(None, args.scorings.split(";")):
        name, _, thresholds = scoring.partition(":")
        options = SCORINGS[name]
        for threshold in [float(t) for t in thresholds.split(",") if t] + ["auto"]:
            params = {**options, "acceptance_threshold": threshold}
            add(f"specguard[greedy,{name},{threshold}]", "specguard", slices, params=params)
        params = {**options, "acceptance_threshold": "auto", "temperature": args.temperature}
        add(f"specguard[t={args.temperature:g},{name},auto]", "specguard", slices, params=params)
    for spec in filter(None, args.extra.split(";")):
        # SCORING,THRESHOLD,N_CANDIDATES,TEMPERATURE: e.g. "confidence,auto,1,0.7"
        name, threshold, candidates, temperature = spec.split(",")
        params = {
            **SCORINGS[name],
            "acceptance_threshold": threshold if threshold == "auto" else float(threshold),
            "n_candidates": int(candidates),
            "temperature": float(temperature),
        }
        tag = "greedy" if float(temperature) == 0 else f"t={float(temperature):g}"
        add(f"specguard[{tag},{name},{threshold},n={candidates}]", "specguard", slices, params=params)
    if args.draft_signals:
        params = {"acceptance_threshold": args.draft_signals, "signal_source": "draft"}
        add(f"specguard[greedy,both,{args.draft_signals},draft-signals]", "specguard", slices, params=params)
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32", help="float32: the fine-tuned weights' own precision")
    parser.add_argument("--problems", type=int, default=100, help="problems per seed")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--chunk", type=int, default=25)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument(
        "--scorings",
        default="both:0.5;confidence:0.7,0.9;min-confidence:0.1,0.3",
        help="';'-separated NAME:THRESHOLDS (NAME from SCORINGS); each also runs 'auto', greedy and sampled",
    )
    parser.add_argument("--draft-signals", type=float, default=None, help="also: threshold with draft signals")
    parser.add_argument(
        "--extra",
        default="",
        help="';'-separated SCORING,THRESHOLD,N_CANDIDATES,TEMPERATURE, e.g. confidence,auto,1,0.7",
    )
    parser.add_argument("--baselines", default="", help="e.g. target[greedy],assisted[t=0.7] (default: all six)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--assisted", type=int, default=1, help="0: leave assisted generation out")
    parser.add_argument("--deadline", type=float, default=None, help="seconds: stop and save what is done")
    args = parser.parse_args(argv)

    jobs = plan(args)
    # every method's first slices before anyone's later ones, so a run cut at the deadline still covers
    # every method evenly (the slowest, assisted generation, first within a slice)
    jobs.sort(key=lambda j: (j["indices"][0], j["seed"], j["name"] != "assisted[greedy]"))
    started = time.time()
    records: list[dict[str, Any]] = []
    finished = 0
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(args.workers, initializer=_init, initargs=(args.target, args.draft, args.device, args.dtype))
    try:
        for batch in pool.imap_unordered(_run, jobs):
            records.extend(batch)
            finished += 1
            if batch and "error" in batch[0]:
                print("ERROR", batch[0], flush=True)
            print(f"{finished}/{len(jobs)} jobs, {time.time() - started:.0f} s", flush=True)
            if args.deadline and time.time() - started > args.deadline:
                print("deadline reached: saving the finished jobs", flush=True)
                break
    finally:
        pool.terminate()
    out = {"args": vars(args), "seconds": time.time() - started, "jobs": len(jobs), "finished": finished}
    out["records"] = records
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
