"""The benchmark as a tool (issue 20 item 7, issue 18 item 4), run for real on a tiny pair on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from langchain_specguard.apps import bench
from tests.tiny_models import llama_pair


def problems_file(tmp_path: Path) -> Path:
    path = tmp_path / "problems.jsonl"
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b}\n#### {a + b}"} for a, b in ((2, 3), (4, 1))]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_every_method_is_warmed_timed_by_problem_and_named_against_its_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, draft = llama_pair()
    out = tmp_path / "result.json"
    code = bench.main(
        [
            "--target", target, "--draft", draft, "--data", str(problems_file(tmp_path)), "--limit", "2",
            "--methods", "target,specguard", "--max-tokens", "6", "--stop", "Done.", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "warmed target" in printed and "warmed specguard" in printed  # warm-up before any timing
    assert "problem 1/2:" in printed and "problem 2/2:" in printed  # progress per problem and method
    assert "median seconds per problem" in printed  # the table says what its ratios are relative to
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"target", "specguard[target,t=default]"}
    assert rows["target"]["speed_vs_target"] == pytest.approx(1.0)
    mine = rows["specguard[target,t=default]"]
    assert mine["speed_vs_target"] == pytest.approx(
        rows["target"]["median_s_per_problem"] / mine["median_s_per_problem"]
    )
    assert all(r["accuracy"] is not None for r in rows.values())  # accuracy printed beside speed


def test_the_engines_defaults_are_what_the_bench_runs_unless_told() -> None:
    params = bench.specguard_params(bench.argparse.Namespace(max_tokens=32))
    defaults = bench.SpecGuardParams()
    assert params.model_dump() == defaults.model_copy(update={"max_tokens": 32}).model_dump()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_synthetic_without_cuda_is_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench.main(["--synthetic", "qwen2.5-7b:qwen2.5-0.5b"])
    assert info.value.code == 2
    assert "no CUDA device is available" in capsys.readouterr().err
