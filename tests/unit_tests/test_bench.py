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


def test_a_planted_pair_writes_its_map_and_set_agreement_moves_only_the_draft(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted shapes on the CPU at a tiny width: the target writes ``target_map`` token after token, and
    ``set_agreement`` re-points the draft alone (the bench's per-agreement rows)."""
    from langchain_specguard.apps import synthetic
    from langchain_specguard.engine import SpecGuardParams, generate

    tiny = {
        **synthetic.SHAPES["qwen2.5-0.5b"],
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 152064,
    }  # fmt: skip
    monkeypatch.setitem(synthetic.SHAPES, "tiny-target", tiny)
    monkeypatch.setitem(synthetic.SHAPES, "tiny-draft", {**tiny, "num_hidden_layers": 1})
    pair = synthetic.synthetic_pair("tiny-target", "tiny-draft", 1.0, device="cpu", dtype=torch.float32)
    assert isinstance(pair, synthetic.SyntheticPair) and torch.equal(pair.target_map, pair.draft_map)
    (prompt,) = synthetic.synthetic_prompts(pair, 1, 8)
    expected, token = [], prompt[-1]
    for _ in range(6):
        token = int(pair.target_map[token])
        expected.append(token)
    # the planted draft as planted: no int8 layers or frequent-token head (a CPU's defaults), which would re-point it
    params = SpecGuardParams(max_tokens=6, max_step_tokens=3, seed=0, draft_int8=False, draft_vocab=1 << 20)
    agreeing = generate(pair, prompt, params)
    assert agreeing.token_ids == expected and all(s.accepted for s in agreeing.steps)

    target_map = pair.target_map.clone()
    synthetic.set_agreement(pair, 0.0)
    assert torch.equal(pair.target_map, target_map) and not torch.equal(pair.draft_map, target_map)
    disagreeing = generate(pair, prompt, params)
    assert disagreeing.token_ids == expected and not any(s.accepted for s in disagreeing.steps)
