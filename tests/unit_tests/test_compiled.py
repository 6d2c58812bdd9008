"""The compiled decode pass (``compile_decode``) equals the eager one, and its compilations stay bounded per model.

On a GPU the compiled pass runs inside CUDA graphs; here the same compiled function runs on the CPU without graphs,
on a fixed cache, in float64, so its outputs can be compared with the eager path's exactly and its compilations
counted. The backend is ``aot_eager``: the same capture, guards and recompilations as inductor (which decides how
often a batch compiles), without a C++ build per frame (minutes here); inductor's kernels are checked against the
eager path on the GPU (benchmarks/check_batched_gpu.py). One call alone, then four at once (more slots, leaders-only
and full-row passes, the draft's and the target's runners): the compiled frames stay within one per model and row
class, however many slots the batches take (a compilation per slot bucket and per buffer view took minutes per
concurrency level on a GPU).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from langchain_specguard.engine import SpecGuardParams, generate, load_pair, runner, view
from langchain_specguard.engine.loading import ModelPair
from langchain_specguard.engine.runner import ModelRunner
from tests.threads import together
from tests.tiny_models import llama_pair
from tests.unit_tests.test_batching import TEXTS

PARAMS = SpecGuardParams(acceptance_threshold=0.5, n_candidates=3, max_tokens=16, max_step_tokens=4,
                         cache_implementation="static", draft_int8=False, seed=0)  # fmt: skip


def pair() -> ModelPair:
    """A pair of its own (its runtimes are pooled on it: the compiled runs must not reuse the eager runs')."""
    return load_pair(*llama_pair(), dtype="float64", device="cpu")


def run(p: ModelPair, text: str) -> list[int]:
    return generate(p, p.tokenizer(text, add_special_tokens=False)["input_ids"], PARAMS).token_ids


def test_compiled_passes_equal_eager_and_compile_once_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # the views a GPU makes (a CPU's draft view has skinny layers, whose row-count branch the GPU never takes)
    monkeypatch.setattr(view, "_on_cpu", lambda model: False)
    texts = [TEXTS[i % len(TEXTS)] for i in range(8)]
    batches = ([texts[0]], texts[:4], texts)  # 1, 4 and 8 calls at once: 1, 4 and 8 slots
    p = pair()
    eager = [together([functools.partial(run, p, t) for t in batch]) for batch in batches]

    init = ModelRunner.__init__

    def compiled(self: ModelRunner, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        self.compile_decode = True  # (compiled passes run without graphs on a CPU)

    monkeypatch.setattr(ModelRunner, "__init__", compiled)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    monkeypatch.setattr(runner, "_COMPILED", {})
    p = pair()
    torch._dynamo.reset()
    counters.clear()
    frames = []
    for batch, expected in zip(batches, eager, strict=True):
        assert together([functools.partial(run, p, t) for t in batch]) == expected
        frames.append(counters["stats"]["unique_graphs"])
    # each model compiles once for passes of several rows, and at most twice more for a pass of one row (torch
    # specialises sizes of 1: one row over a one-slot cache, one row over a larger one); which of those a run meets
    # depends on how the threads' calls meet, so the bound is on the total, whatever the batches
    assert 1 <= frames[0] <= frames[1] <= frames[2] <= 6, frames
