"""Proposing a step: the draft decodes ``n_candidates`` continuations in one batch, the most consistent is kept.

The draft's decode loop runs on the device in chunks (:meth:`~.runner.ModelRunner.decode`); the host
reads each chunk's tokens once and asks :meth:`~.text.OutputText.step_end` where each row's step ends,
which checks the exact text rules only at tokens that can end a step. Rows that ended keep decoding
until the chunk is over (the batch costs the same); their extra tokens are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .attention import StepAttention
from .signals import select_consistent

if TYPE_CHECKING:
    from .decoding import Generation


@dataclass
class Proposal:
    """The kept draft candidate of one step."""

    tokens: list[int]
    row: int  # its batch row in the draft runner's buffers (logprobs, step attention)
    drafted: int  # candidate positions computed: rows x decode iterations
    record: StepAttention | None  # the draft's step attention, when the draft computes the signals


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
    record = None
    if gen.params.signal_source == "draft":
        record = draft.record(gen.draft_layers)
        record.context_len.fill_(len(ids))
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
    best = select_consistent(candidates)
    draft.cache.copy_row(best, start, start + draft.decoded)
    draft.cache.valid = start + len(candidates[best])
    return Proposal(candidates[best], best, draft.batch * draft.decoded, record)
