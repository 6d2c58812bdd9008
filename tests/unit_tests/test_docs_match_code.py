"""The cookbook and the step plot show what the code does (issue 20 item 8, the cookbook and plot parts).

- cookbook 05's benchmark command is the README's, the one behind the table both describe;
- cookbook 01 names no fixed acceptance threshold that its model does not set;
- the step plot's title, axis labels and legends lie inside the figure, also on a short run (narrowest figure).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from langchain_specguard import ChatSpecGuard, SpecGuardCallbackHandler
from tests.tiny_models import llama_pair

ROOT = Path(__file__).resolve().parents[2]


def cells(notebook: str, kind: str) -> list[str]:
    data = json.loads((ROOT / "cookbook" / notebook).read_text(encoding="utf-8"))
    return ["".join(cell["source"]) for cell in data["cells"] if cell["cell_type"] == kind]


def synthetic_commands(text: str) -> list[str]:
    """Each ``python -m langchain_specguard.apps.bench --synthetic ...`` command in ``text``, whitespace normalised."""
    found = re.findall(r"python -m langchain_specguard\.apps\.bench --synthetic[^`]*", text)
    return [" ".join(command.replace("\\\n", " ").split()) for command in found]


def test_cookbook_05_runs_the_readmes_benchmark_command() -> None:
    readme = synthetic_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    cookbook = synthetic_commands("\n".join(cells("05_benchmark.ipynb", "markdown")))
    assert readme and cookbook
    assert set(cookbook) <= set(readme), (cookbook, readme)


def test_cookbook_01_names_no_threshold_its_model_does_not_set() -> None:
    code = "\n".join(cells("01_quickstart.ipynb", "code"))
    built = re.search(r"^llm = ChatSpecGuard\((.*)\)", code, re.MULTILINE)
    assert built is not None
    set_here = re.findall(r"acceptance_threshold=([-\w.\"']+)", built.group(1))
    markdown = "\n".join(cells("01_quickstart.ipynb", "markdown"))
    # "here a fixed 0.5", "here the threshold is 0.3", 'fixed "auto"'...
    claimed = re.findall(r"\b(?:here|fixed)\b[^.;)]*?(-?\b\d+(?:\.\d+)?\b|\"auto\")", markdown)
    assert all(value in set_here for value in claimed), (claimed, set_here)


@pytest.fixture(scope="module")
def short_run() -> SpecGuardCallbackHandler:
    target, draft = llama_pair()
    llm = ChatSpecGuard(model=target, draft_model=draft, max_tokens=6, max_step_tokens=4, step_delimiters=["\n"])
    handler = SpecGuardCallbackHandler()
    llm.invoke("Hello", config={"callbacks": [handler]})
    assert 0 < len(handler.to_records()) <= 3
    return handler


def outside(figure: Any) -> list[str]:
    """The texts of the title, axis labels and legends that reach past the figure's edges."""
    figure.draw_without_rendering()
    texts = [t for t in figure.texts if t.get_text() == figure.get_suptitle()]
    for axes in figure.axes:
        texts += [axes.title, axes.xaxis.label, axes.yaxis.label]
        legend = axes.get_legend()
        texts += list(legend.get_texts()) if legend is not None else []
    box = figure.bbox
    return [
        t.get_text()
        for t in texts
        if t.get_text()
        and not (
            box.x0 <= t.get_window_extent().x0
            and t.get_window_extent().x1 <= box.x1
            and box.y0 <= t.get_window_extent().y0
            and t.get_window_extent().y1 <= box.y1
        )
    ]


@pytest.mark.parametrize("title", [None, "A custom title that goes on about the steps of this run " * 2])
def test_step_plot_title_fits_a_short_run(short_run: SpecGuardCallbackHandler, title: str | None) -> None:
    figure = short_run.plot(title=title)
    if title is None:
        assert figure.get_suptitle().startswith("SpecGuard steps: 1 call(s), acceptance ")
    else:
        assert figure.get_suptitle() == title
    assert outside(figure) == []
