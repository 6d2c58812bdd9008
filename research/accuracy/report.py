"""Tables (accuracy with 95% intervals, draft share, signal ROC AUC) and a plot from an evaluation's raw JSON.

    python -m research.accuracy.report research/accuracy/results/gemma270m_h100_eval.json.gz [--plot out.png]

In the committed H100 run the target- and draft-alone baselines ran as one left-padded batch, which
broke their first tokens on that model and transformers version (see the README): they are printed
flagged, and the target's greedy accuracy comes from assisted generation (lossless under greedy
decoding, unpadded). ``evaluate.py`` now runs every baseline unpadded, one problem at a time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
from collections import defaultdict
from typing import Any


def load(path: str) -> dict[str, Any]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:  # type: ignore[operator]
        return json.load(f)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def auc(pos: list[float], neg: list[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    if not pos or not neg:
        return math.nan
    ranked = sorted([(v, 1) for v in pos] + [(v, 0) for v in neg])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + j + 1) / 2
        rank_sum += mean_rank * sum(label for _, label in ranked[i:j])
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def auc_interval(pos: list[float], neg: list[float], rounds: int = 300) -> tuple[float, float]:
    rng = random.Random(0)
    values = sorted(auc([rng.choice(pos) for _ in pos], [rng.choice(neg) for _ in neg]) for _ in range(rounds))
    return values[int(0.025 * rounds)], values[int(0.975 * rounds) - 1]


def accuracy_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by[r["method"]].append(r)
    rows = []
    for method, runs in sorted(by.items()):
        k, n = sum(r["correct"] for r in runs), len(runs)
        row: dict[str, Any] = {"method": method, "n": n, "accuracy": k / n, "ci": wilson(k, n)}
        if "steps" in runs[0]:
            steps = [s for r in runs for s in r["steps"]]
            row["accepted_steps"] = sum(s["accepted"] for s in steps) / len(steps)
            row["draft_token_share"] = sum(r["draft_tokens"] for r in runs) / max(1, sum(r["tokens"] for r in runs))
            row["mean_threshold"] = sum(s["threshold"] for s in steps) / len(steps)
        row["batched"] = method.startswith(("target[", "draft[")) and not runs[0].get("unpadded")
        rows.append(row)
    return rows


def paired_difference(
    records: list[dict[str, Any]], a: str, b: str, rounds: int = 2000
) -> tuple[float, tuple[float, float], int] | None:
    """Accuracy of ``a`` minus ``b`` on the problems both ran, with a 95% bootstrap interval over problems."""
    runs: dict[str, dict[tuple[int, int], bool]] = {a: {}, b: {}}
    for r in records:
        if r["method"] in runs:
            runs[r["method"]][(r["seed"], r["index"])] = bool(r["correct"])
    common = sorted(set(runs[a]) & set(runs[b]))
    if not common:
        return None
    diffs = [int(runs[a][key]) - int(runs[b][key]) for key in common]
    rng = random.Random(0)
    boot = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(rounds))
    return sum(diffs) / len(diffs), (boot[int(0.025 * rounds)], boot[int(0.975 * rounds) - 1]), len(common)


def derived_signals(step: dict[str, Any]) -> dict[str, float]:
    """Ways of combining the engine's grounding with either confidence, scored after the fact."""
    grounding, out = step.get("grounding"), {}
    for kind in ("mean", "min"):
        confidence = step.get("variants", {}).get(f"confidence_{kind}")
        if confidence is None:
            continue
        # a one-token step has no grounding: the engine judges it on confidence alone
        grounding_or_conf = confidence if grounding is None else grounding
        out[f"min(grounding, confidence_{kind})"] = min(grounding_or_conf, confidence)
        for w in (0.1, 0.25, 0.5):
            out[f"{w:g}*grounding + {1 - w:g}*confidence_{kind}"] = w * grounding_or_conf + (1 - w) * confidence
    return out


def signal_table(records: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """ROC AUC of each signal for telling right from wrong draft steps (the kept candidate)."""
    steps = [
        s
        for r in records
        if r["method"].startswith("specguard[greedy") and r["method"].endswith("draft-signals]") == (source == "draft")
        for s in r.get("steps", [])
        if s["draft_right"] is not None
    ]
    for s in steps:
        s["derived"] = derived_signals(s)
    names = [
        "score",
        "confidence",
        "grounding",
        *sorted({k for s in steps for k in s.get("variants", {})}),
        *sorted({k for s in steps for k in s["derived"]}),
    ]
    rows = []
    for name in names:
        pos, neg = [], []
        for s in steps:
            extra = {**s["variants"], **s["derived"]}
            value = s.get(name) if name in ("score", "confidence", "grounding") else extra.get(name)
            if value is None:
                continue
            (pos if s["draft_right"] else neg).append(value)
        if pos and neg:
            rows.append(
                {
                    "signal": name,
                    "auc": auc(pos, neg),
                    "ci": auc_interval(pos, neg),
                    "right": len(pos),
                    "wrong": len(neg),
                }
            )
    return rows


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    markers = "osD^v<>ph*"
    for i, row in enumerate(r for r in rows if "draft_token_share" in r):
        low, high = row["ci"]
        x, y = row["draft_token_share"], row["accuracy"]
        label = row["method"].removeprefix("specguard")
        color = plt.get_cmap("tab20")(i % 20)
        ax.errorbar(x, y, yerr=[[y - low], [high - y]], fmt=markers[i % len(markers)], c=color, capsize=3, label=label)
    for row in rows:
        if row["method"] in ("target[greedy]", "target[t=0.7]") and not row["batched"]:
            style = "--" if "greedy" in row["method"] else ":"
            label = row["method"].replace("target", "target alone ")
            ax.axhline(row["accuracy"], ls=style, c="grey", lw=1, label=label)
    ax.set_xlabel("share of output tokens written by the draft")
    ax.set_ylabel("accuracy (95% Wilson interval)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--title", default="SpecGuard on fine-tuned Gemma 3 270M with an early-exit draft")
    args = parser.parse_args(argv)
    data = load(args.path)
    records = [r for r in data["records"] if "error" not in r]
    rows = accuracy_table(records)
    print("| method | problems | accuracy [95% CI] | steps accepted | draft tokens | threshold (mean) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        flag = " (batched: padding artefact)" if r["batched"] else ""
        extra = (
            f"{r['accepted_steps']:.2f} | {r['draft_token_share']:.2f} | {r['mean_threshold']:.3f}"
            if "accepted_steps" in r
            else "| |"
        )
        print(
            f"| {r['method']}{flag} | {r['n']} | {r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {extra} |"
        )
    subset = {(r["seed"], r["index"]) for r in records if r["method"] == "assisted[greedy]"}
    if subset:
        print(f"\nOn the {len(subset)} problems assisted generation ran on:")
        for r in accuracy_table([x for x in records if (x["seed"], x["index"]) in subset]):
            print(f"  {r['method']:40s} {r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]")
    names = {r["method"] for r in records}
    pairs = [
        (a, b)
        for a in sorted(names)
        if a.startswith("specguard[")
        for b in ("target[greedy]", "assisted[greedy]", "target[t=0.7]", "assisted[t=0.7]")
        if b in names and ("greedy" in a) == ("greedy" in b)
    ]
    if pairs:
        print("\nPaired on the same problems: SpecGuard minus a baseline (95% bootstrap over problems)")
        print("| SpecGuard | baseline | difference [95% CI] | problems |")
        print("|---|---|---|---|")
        for a, b in pairs:
            found = paired_difference(records, a, b)
            if found is not None:
                d, (low, high), n = found
                print(f"| {a} | {b} | {d:+.3f} [{low:+.3f}, {high:+.3f}] | {n} |")
    for source in ("target", "draft"):
        print(f"\nSignals computed by the {source}: ROC AUC for right vs wrong draft steps")
        print("| signal | AUC [95% bootstrap] | right / wrong steps |")
        print("|---|---|---|")
        for s in signal_table(records, source):
            print(
                f"| {s['signal']} | {s['auc']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] | {s['right']} / {s['wrong']} |"
            )
    if args.plot:
        plot(rows, args.plot, args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
