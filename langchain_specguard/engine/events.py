"""What a generation reports: one :class:`StepEvent` per step, and the summary of a call.

The field list here is the schema: ``callbacks.py`` documents it for LangChain users, and
``EVENT_VERSION`` changes whenever a field changes meaning (new fields may appear without a bump).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .logprobs import TokenLogprob

EVENT_VERSION = 4

StepKind = Literal["text", "tool_call", "reasoning"]
"""What a step is: "tool_call" (one step, opening to closing marker), "reasoning" (a step of the think block a
reasoning model opens its answer with, the one holding the closing marker included), "text" (the rest)."""


@dataclass
class StepEvent:
    """What happened to one step: who wrote it, how the kept draft candidate scored, what it cost."""

    index: int
    source: Literal["draft", "target"]
    text: str
    num_tokens: int
    n_candidates: int
    grounding: float
    confidence: float
    score: float
    threshold: float
    accepted: bool
    reason: str  # "accepted", or why the draft step was rejected: "score" or "schema" (a bad tool call)
    seconds: float
    draft_text: str
    drafted_tokens: int  # candidate positions the draft computed this step, every row and iteration
    target_forwards: int
    finish_reason: str | None = None  # "stop" (EOS or stop sequence), "length", or None
    token_ids: list[int] = field(default_factory=list)
    kind: StepKind = "text"
    detail: str | None = None  # with reason "schema": what was wrong with the draft's tool call
    version: int = EVENT_VERSION
    # where ``seconds`` went: drafting the candidates, scoring the kept one (selection, signals and
    # the target's verification pass), and the target writing a rejected step; the rest is detokenizing
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    target_seconds: float = 0.0
    # a rejected step: how many of the draft's tokens the target itself would have written (kept), and
    # how many tokens of the rest the draft proposed and the target accepted (speculated)
    kept_tokens: int = 0
    speculated_tokens: int = 0
    # with ``logprobs=True``: one entry per token of ``token_ids`` (see :mod:`.logprobs` for whose they
    # are). Not part of the event's dict (the custom events, the traces): it is the message's
    # ``response_metadata["logprobs"]``, and would weigh on every trace
    logprobs: list[TokenLogprob] | None = None
    # with tools bound: how many of the n_candidates drafts finished a tool call (each was schema-checked),
    # and how many of those calls fit the bound tools (a broken call never wins the vote over one that fits)
    call_candidates: int = 0
    valid_call_candidates: int = 0
    # the kept candidate's confidence under each ``confidence_method`` the scoring pass allows ("mean", "min",
    # and "ratio" when the target scored it), whichever one the decision used: for comparing methods
    signals: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(replace(self, logprobs=None))
        del data["logprobs"]
        for key in ("grounding", "confidence", "score"):
            if isinstance(data[key], float) and math.isnan(data[key]):
                data[key] = None
        data["signals"] = {k: None if math.isnan(v) else v for k, v in self.signals.items()}
        return data


@dataclass
class GenerationResult:
    """The whole output of one call plus its per-step record and summary."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    steps: list[StepEvent]
    seconds: float

    @property
    def summary(self) -> dict[str, Any]:
        return summarize(self.steps, self.seconds, self.prompt_tokens)


def step_totals(steps: Sequence[StepEvent] | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The figures every summary of steps reports, under one set of names: one call's summary
    (:func:`summarize`) and the callback handler's totals over many calls read them from here.

    ``steps`` are events or their dicts (``StepEvent.to_dict()``, as callbacks receive them).
    """

    def get(step: StepEvent | Mapping[str, Any], key: str) -> Any:
        return step.get(key) if isinstance(step, Mapping) else getattr(step, key)

    def total(key: str, where: Callable[[StepEvent | Mapping[str, Any]], bool] = lambda s: True) -> Any:
        return sum(get(s, key) or 0 for s in steps if where(s))

    accepted = sum(bool(get(s, "accepted")) for s in steps)
    return {
        "steps": len(steps),
        "accepted_steps": accepted,
        "accepted_share": accepted / len(steps) if steps else 0.0,
        "output_tokens": total("num_tokens"),
        "draft_tokens": total("num_tokens", lambda s: get(s, "source") == "draft"),
        "target_tokens": total("num_tokens", lambda s: get(s, "source") == "target"),
        "reasoning_tokens": total("num_tokens", lambda s: get(s, "kind") == "reasoning"),
        "kept_tokens": total("kept_tokens"),
        "speculated_tokens": total("speculated_tokens"),
        "drafted_tokens": total("drafted_tokens"),
        "target_forwards": total("target_forwards"),
        "draft_seconds": total("draft_seconds"),
        "verify_seconds": total("verify_seconds"),
        "target_seconds": total("target_seconds"),
    }


def summarize(steps: Sequence[StepEvent], seconds: float, prompt_tokens: int) -> dict[str, Any]:
    """One call's summary (the ``specguard_summary`` event, ``response_metadata["specguard"]``)."""
    totals = step_totals(steps)
    return {
        "version": EVENT_VERSION,
        **totals,
        "num_steps": totals["steps"],
        "prompt_tokens": prompt_tokens,
        "seconds": seconds,
    }
