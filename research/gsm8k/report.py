"""Tables from ``research.gsm8k.run`` results: accuracy with intervals, paired differences, draft share, AUCs.

    python -m research.gsm8k.report results/train.jsonl --reference target [--markdown]
    python -m research.gsm8k.report results/train.jsonl --select sweep.json   # the rule the defaults come from
    python -m research.gsm8k.report results/test_h100_3fb210f_a.jsonl.gz results/test_h100_3fb210f_b.jsonl.gz

Several files are one run continued (a problem in more than one keeps the last file's row); ``.gz`` is read as is.

Accuracy intervals are Wilson 95%; a paired difference is over the problems both methods finished,
mean +- 1.96 standard errors of the per-problem differences. "draft share" is the output tokens of
accepted draft steps; "draft-computed share" adds what rejected steps kept of the draft's proposal and
what the target accepted of the draft's speculation while writing (tokens the target would also have
written greedily, computed by the draft). ROC AUC (right vs wrong draft steps, step_label) has a
percentile-bootstrap 95% interval over steps (the statistics are research/accuracy/report.py's).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from research.accuracy.report import auc, auc_interval, wilson


def read(paths: list[str]) -> dict[str, dict[int, dict[str, Any]]]:
    by: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for path in paths:
        raw = Path(path).read_bytes()
        for line in (gzip.decompress(raw) if path.endswith(".gz") else raw).decode().splitlines():
            if line.strip():
                row = json.loads(line)
                by[row["method"]][row["index"]] = row
    return dict(by)


def paired(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> tuple[float, float, float, int]:
    """Mean of correct(a) - correct(b) over the problems both have, and its 95% interval."""
    common = sorted(a.keys() & b.keys())
    d = [int(a[i]["correct"]) - int(b[i]["correct"]) for i in common]
    n = len(d)
    if n < 2:
        return (math.nan, math.nan, math.nan, n)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return mean, mean - half, mean + half, n


def shares(rows: dict[int, dict[str, Any]]) -> tuple[float, float]:
    tokens = sum(r["tokens"] for r in rows.values())
    if not tokens or "draft_tokens" not in next(iter(rows.values())):
        return (math.nan, math.nan)
    draft = sum(r["draft_tokens"] for r in rows.values())
    computed = draft + sum(r["kept_tokens"] + r["speculated_tokens"] for r in rows.values())
    return draft / tokens, computed / tokens


def signal_table(by: dict[str, dict[int, dict[str, Any]]]) -> list[tuple[str, str, int, int, float, float, float]]:
    """AUC of each signal over each method's labelled draft steps (the kept candidate of every step)."""
    rows = []
    for method, problems in sorted(by.items()):
        steps = [s for r in problems.values() for s in r.get("steps", []) if s.get("label") is not None]
        if not steps:
            continue
        for signal in ("ratio", "min", "mean", "g", "both"):
            values = []
            for s in steps:
                value = min(s["g"], s["mean"]) if signal == "both" and s.get("g") is not None else s.get(signal)
                if signal == "both" and s.get("g") is None:
                    value = None
                if value is not None:
                    values.append((float(value), bool(s["label"])))
            if len(values) >= 20:
                pos, neg = [v for v, y in values if y], [v for v, y in values if not y]
                rows.append((method, signal, len(pos), len(neg), auc(pos, neg), *auc_interval(pos, neg)))
    return rows


def table(by: dict[str, dict[int, dict[str, Any]]], reference: str | None) -> list[dict[str, Any]]:
    out = []
    for method, rows in by.items():
        k, n = sum(bool(r["correct"]) for r in rows.values()), len(rows)
        low, high = wilson(k, n)
        draft, computed = shares(rows)
        entry: dict[str, Any] = {
            "method": method,
            "n": n,
            "accuracy": k / n if n else math.nan,
            "ci": (low, high),
            "draft_share": draft,
            "computed_share": computed,
            "seconds": sorted(r["seconds"] for r in rows.values())[n // 2] if n else math.nan,
        }
        if reference and reference in by and method != reference:
            entry["paired"] = paired(rows, by[reference])
        out.append(entry)
    return out


def select(by: dict[str, dict[int, dict[str, Any]]], methods: list[dict[str, Any]], reference: str) -> dict[str, Any]:
    """The rule the defaults come from, fixed before the test run: among deterministic rules (a fixed
    threshold of at most 1), the largest draft share whose train accuracy is within one point of the
    reference's (paired, on the same problems); ties go to the earlier method in the sweep. If none is,
    the one closest to the reference's accuracy (and a warning)."""
    eligible = []
    for order, m in enumerate(methods):
        threshold = m.get("params", {}).get("acceptance_threshold")
        if m["kind"] != "engine" or m["name"] not in by or not isinstance(threshold, (int, float)) or threshold > 1:
            continue
        diff, _, _, n = paired(by[m["name"]], by[reference])
        if n >= 2:
            eligible.append((diff, shares(by[m["name"]])[0], -order, m))
    if not eligible:
        raise SystemExit("no deterministic configuration has results on the reference's problems")
    within = [e for e in eligible if e[0] >= -0.01]
    if within:
        return max(within, key=lambda e: (e[1], e[2]))[3]
    best = max(eligible, key=lambda e: (e[0], e[2]))
    print(f"warning: no configuration within one point of {reference}; closest: {best[3]['name']}", file=sys.stderr)
    return best[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+")
    parser.add_argument("--reference", default="target")
    parser.add_argument("--select", default=None, help="the sweep's methods JSON: print the chosen method")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    by = read(args.results)
    if args.select:
        print(json.dumps(select(by, json.loads(Path(args.select).read_text()), args.reference)))
        return
    sep = " | " if args.markdown else "  "
    head = [
        "method",
        "n",
        "accuracy [95% CI]",
        f"vs {args.reference} [95% CI]",
        "draft share",
        "draft-computed",
        "s/problem",
    ]
    print(("| " if args.markdown else "") + sep.join(head) + (" |" if args.markdown else ""))
    if args.markdown:
        print("|" + "---|" * len(head))
    for e in table(by, args.reference):
        p = e.get("paired")
        cells = [
            e["method"],
            str(e["n"]),
            f"{e['accuracy']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]",
            f"{100 * p[0]:+.1f} [{100 * p[1]:+.1f}, {100 * p[2]:+.1f}] (n={p[3]})" if p else "-",
            "-" if e["draft_share"] != e["draft_share"] else f"{e['draft_share']:.0%}",
            "-" if e["computed_share"] != e["computed_share"] else f"{e['computed_share']:.0%}",
            f"{e['seconds']:.2f}",
        ]
        print(("| " if args.markdown else "") + sep.join(cells) + (" |" if args.markdown else ""))
    print()
    print(sep.join(["method", "signal", "right", "wrong", "ROC AUC [95% CI]"]))
    for method, signal, right, wrong, value, low, high in signal_table(by):
        print(sep.join([method, signal, str(right), str(wrong), f"{value:.3f} [{low:.3f}, {high:.3f}]"]))


if __name__ == "__main__":
    main()
