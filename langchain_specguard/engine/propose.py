"""Proposing a step: the draft decodes ``n_candidates`` continuations in one batch, the most consistent is kept.

The draft's decode loop runs on the device in chunks (:meth:`~.runner.ModelRunner.decode`); the host
reads each chunk's tokens once and asks :meth:`~.text.OutputText.step_end` where each row's step ends,
which checks the exact text rules only at tokens that can end a step. Rows that ended keep decoding
until the chunk is over (the batch costs the same); their extra tokens are dropped.

With tools bound, every candidate that finishes a tool call is schema-checked before the vote: a
candidate whose call breaks the schema never wins over one that fits. The vote runs among the
candidates without a problem (valid calls, text, calls still open); only when every candidate is a
broken call is the vote among all of them, and the kept one is then rejected as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .attention import StepAttention
from .signals import select_consistent

if TYPE_CHECKING:
    from .generation import Generation


@dataclass
class Proposal:
    """The kept draft candidate of one step."""

    tokens: list[int]
    row: int  # its batch row in the draft runner's buffers (logprobs, step attention)
    drafted: int  # candidate positions computed: rows x decode iterations
    record: StepAttention | None  # the draft's step attention, when the draft computes the signals
    problem: str | None = None  # why the kept candidate's finished tool call is unacceptable (schema check)
    call_candidates: int = 0  # candidates that finished a tool call (each one schema-checked)
    valid_call_candidates: int = 0  # of those, the ones whose call fits the bound tools


def propose(gen: Generation, limit: int) -> Proposal:
    """Draft at most ``limit`` tokens per candidate from the committed sequence ``gen.ids``."""
    draft, ids = gen.runtime.draft, gen.ids
    start = len(ids) - 1  # the last committed token is fed again: its logits start every candidate
    draft.prefill(ids[draft.cache.valid : start], draft.cache.valid)
    # the draft's own log-probabilities are reported only for steps it scores itself (else the target's are)
    top = gen.logprobs.top if gen.logprobs is not None and gen.params.signal_source == "draft" else 0
    draft.start_decode(
        ids[-1], start, gen.params.candidate_temperatures, gen.controls, seen=gen.seen(draft), top_logprobs=top
    )
    grounding = gen.grounding
    record = grounding.record(draft, len(ids)) if grounding is not None and grounding.source == "draft" else None
    rows: list[list[int]] = [[] for _ in range(draft.batch)]
    ends: list[int | None] = [None] * draft.batch
    while draft.decoded < limit and None in ends:
        before = draft.decoded
        draft.decode(min(gen.runtime.chunk, limit - before), gen.generator, record)
        fresh = draft.out_tokens[:, before : draft.decoded].tolist()  # the only host read of the chunk
        for row, tokens in enumerate(fresh):
            if ends[row] is None:
                rows[row].extend(tokens)
                ends[row] = gen.out.step_end(rows[row], before)
    candidates = [row[:end] if end is not None else row for row, end in zip(rows, ends, strict=True)]
    calls, problems = check_calls(gen, candidates)
    fit = [i for i, problem in enumerate(problems) if problem is None] or list(range(len(candidates)))
    best = fit[select_consistent([candidates[i] for i in fit])]
    draft.cache.copy_row(best, start, start + draft.decoded)
    valid = sum(call is not None and problem is None for call, problem in zip(calls, problems, strict=True))
    checked = sum(call is not None for call in calls)
    return Proposal(candidates[best], best, draft.batch * draft.decoded, record, problems[best], checked, valid)


def check_calls(gen: Generation, candidates: list[list[int]]) -> tuple[list[str | None], list[str | None]]:
    """Each candidate's finished tool call (None: not a finished call) and why it is unacceptable (None: fine).

    A call that is not valid JSON, names an unbound tool or breaks its schema is a problem whatever the
    scores say: the scores judge reasoning, not whether a call can run.
    """
    validate = gen.validate_step
    if validate is None:
        return [None] * len(candidates), [None] * len(candidates)
    calls = [gen.out.finished_call(tokens) for tokens in candidates]
    return calls, [validate(call) if call is not None else None for call in calls]
