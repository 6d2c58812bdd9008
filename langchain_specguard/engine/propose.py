"""Proposing a step: for every generation of the batch, the draft decodes ``n_candidates`` continuations in one
batched loop, and each generation keeps its most consistent one.

The draft's decode loop runs on the device in chunks (:meth:`~.runner.ModelRunner.decode`); the host reads
each chunk's tokens once for the whole batch and asks each generation's :meth:`~.text.OutputText.step_end`
where each of its rows' step ends, which checks the exact text rules only at tokens that can end a step. A
generation whose rows have all ended (or reached its step's limit) stops advancing while the others go on;
rows keep computing until the chunk is over (the batch costs the same) and their extra tokens are dropped.
Each generation's sampling draws are made up front, one block per step, so how long the others decode never
moves them.

With a grammar (:mod:`.grammar`), each candidate row samples only what the grammar allows after its own tokens.

With tools bound, every candidate that finishes a tool call is schema-checked before the vote: a
candidate whose call breaks the schema never wins over one that fits. The vote runs among the
candidates without a problem (valid calls, text, calls still open); only when every candidate is a
broken call is the vote among all of them, and the kept one is then rejected as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .attention import StepAttention
from .grammar import decode
from .signals import select_consistent

if TYPE_CHECKING:
    from .generation import Generation
    from .runtimes import Runtime


@dataclass(kw_only=True)
class Proposal:
    """The kept draft candidate of one generation's step."""

    tokens: list[int]
    row: int  # its buffer row in the draft's decode state (log-probabilities, step attention)
    drafted: int  # candidate positions computed: rows x decode iterations
    record: StepAttention | None  # the draft's step attention, when the draft computes the signals
    problem: str | None = None  # why the kept candidate's finished tool call is unacceptable (schema check)
    call_candidates: int = 0  # candidates that finished a tool call (each one schema-checked)
    valid_call_candidates: int = 0  # of those, the ones whose call fits the bound tools


def propose(runtime: Runtime, gens: list[Generation]) -> dict[int, Proposal]:
    """Draft at most ``gen.limit`` tokens per candidate from each generation's committed sequence, by slot."""
    draft = runtime.draft
    slots = max(g.slot for g in gens) + 1
    by_slot = {g.slot: g for g in gens}
    # each leader catches up to the last committed token but one (fed again: its logits start every candidate)
    fed: list[list[int]] = [[] for _ in range(slots)]
    starts: list[int | None] = [None] * slots
    for gen in gens:
        valid = draft.cache.valid[gen.slot * draft.width]
        fed[gen.slot], starts[gen.slot] = gen.ids[valid : len(gen.ids) - 1], valid
        draft.own_tokens(gen.slot, gen.ids)  # a subset head also proposes the sequence's own tokens
    draft.forward(fed, starts, leaders=True, logits=False)
    for gen in gens:
        draft.spread(gen.slot)
    grounding = gens[0].grounding  # (one scorer per batch: it is part of the batch's key)
    scored = grounding is not None and grounding.source == "draft"
    top = _top(gens[0]) if gens[0].params.signal_source == "draft" else 0
    draft.start_decode(
        [by_slot[s].ids[-1] if s in by_slot else None for s in range(slots)],
        [len(by_slot[s].ids) - 1 if s in by_slot else 0 for s in range(slots)],
        [by_slot[s].params.candidate_temperatures if s in by_slot else [] for s in range(slots)],
        [by_slot[s].limit if s in by_slot else 0 for s in range(slots)],
        controls=gens[0].controls,
        seen=[by_slot[s].seen(draft) if s in by_slot else None for s in range(slots)],
        uniforms=[_draws(by_slot[s], draft.width) if s in by_slot else None for s in range(slots)],
        top_logprobs=top,
        masked=any(g.grammar is not None for g in gens),
    )
    record = grounding.record(draft, [len(g.ids) for g in _padded(by_slot, slots)]) if scored and grounding else None
    rows: dict[int, list[list[int]]] = {g.slot: [[] for _ in range(draft.width)] for g in gens}
    ends: dict[int, list[int | None]] = {g.slot: [None] * draft.width for g in gens}
    ran: dict[int, int] = {}  # iterations each generation decoded
    going = list(gens)
    cursors = {g.slot: [g.grammar.cursor() for _ in range(draft.width)] for g in gens if g.grammar is not None}
    while going:
        before = draft.decoded
        constrained = {g.slot: cursors[g.slot] for g in going if g.slot in cursors}
        n = min(runtime.chunk, max(g.limit - before for g in going))
        decode(draft, constrained, n, record=record)
        fresh = draft.read_decoded([g.slot for g in going], before)  # one host read a chunk (a grammar: one a token)
        stopped = []
        for gen in going:
            usable = max(0, gen.limit - before)  # never past its own limit, however long the batch decodes
            for r, tokens in enumerate(fresh[gen.slot]):
                if ends[gen.slot][r] is None:
                    rows[gen.slot][r].extend(tokens[:usable])
                    ends[gen.slot][r] = gen.out.step_end(rows[gen.slot][r], before)
            if None not in ends[gen.slot] or draft.decoded >= gen.limit or gen.overdue():
                stopped.append(gen)
                ran[gen.slot] = min(draft.decoded, gen.limit)
        if stopped:
            draft.stop_slots([g.slot for g in stopped])
            going = [g for g in going if g not in stopped]
    proposals = {}
    for gen in gens:
        candidates = [r[:end] if end is not None else r for r, end in zip(rows[gen.slot], ends[gen.slot], strict=True)]
        proposals[gen.slot] = _keep(runtime, gen, candidates, record, ran[gen.slot])
    return proposals


def _keep(
    runtime: Runtime, gen: Generation, candidates: list[list[int]], record: StepAttention | None, ran: int
) -> Proposal:
    """The generation's kept candidate, whose cache rows every row of its slot then takes."""
    draft = runtime.draft
    calls, problems = check_calls(gen, candidates)
    fit = [i for i, problem in enumerate(problems) if problem is None] or list(range(len(candidates)))
    best = fit[select_consistent([candidates[i] for i in fit])]
    start, rows = len(gen.ids) - 1, list(draft.slot_rows(gen.slot))
    draft.cache.copy_rows([rows[best]] * len(rows), rows, start, start + ran)
    for row in rows:
        draft.cache.valid[row] = draft.cache.valid[rows[best]]
    valid = sum(call is not None and problem is None for call, problem in zip(calls, problems, strict=True))
    checked = sum(call is not None for call in calls)
    return Proposal(
        tokens=candidates[best],
        row=draft.decoded_row(gen.slot, best),
        drafted=draft.width * ran,
        record=record,
        problem=problems[best],
        call_candidates=checked,
        valid_call_candidates=valid,
    )


def check_calls(gen: Generation, candidates: list[list[int]]) -> tuple[list[str | None], list[str | None]]:
    """Each candidate's finished tool call (None: not a finished call) and why it is unacceptable (None: fine).

    A call that is not valid JSON, names an unbound tool or breaks its schema is a problem whatever the
    scores say: the scores judge reasoning, not whether a call can run.
    """
    validate = gen.options.validate_step
    if validate is None:
        return [None] * len(candidates), [None] * len(candidates)
    calls = [gen.out.finished_call(tokens) for tokens in candidates]
    try:
        return calls, [validate(call) if call is not None else None for call in calls]
    except Exception as error:  # the caller's own check failed: that call ends with its error, no other
        gen.fail(error)
        return calls, [None] * len(candidates)


def _top(gen: Generation) -> int:
    return (gen.params.top_logprobs or 0) if gen.params.logprobs else 0


def _draws(gen: Generation, rows: int) -> torch.Tensor | None:
    """The generation's draws for this step's candidates, ``[rows, limit]`` (none when no row samples).

    One block per step, whatever the step's length: the generator then advances by what this generation's own
    step asks, never by how long the batch around it decodes."""
    if not any(t > 0 for t in gen.params.candidate_temperatures):
        return None
    return gen.uniform(rows, gen.limit)


def _padded(by_slot: dict[int, Generation], slots: int) -> list[Generation]:
    """The generation of every slot ``0..slots-1``, the first one standing in for empty slots."""
    first = next(iter(by_slot.values()))
    return [by_slot.get(s, first) for s in range(slots)]
