"""Writing the rejected steps of a batch: the target continues each from its first disagreement, sped up by the draft.

What the target writes is exactly what it would write alone (greedy: its argmax at every position; sampling: its
own distribution, through speculative rejection sampling), so "every step rejected" still equals the target's own
``generate()``. The generations writing go in rounds, together: in each, the draft proposes ``gamma`` tokens for
each of them (one batched decode of the generations' first rows), and one target pass judges every generation's
proposals and adds its own next token (:mod:`.judge`). Each generation's ``gamma`` follows its own measured
agreement (:class:`~.generation.AgreementRate`); a draft that rarely agrees makes it 0 for the rest of the step:
plain target decoding, one token per round. A generation leaves the rounds when its step ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .grammar import decode
from .judge import Trial, decide, judge

if TYPE_CHECKING:
    from .generation import Generation
    from .runtimes import Runtime


@dataclass(kw_only=True)
class Written:
    tokens: list[int]
    speculated: int = 0  # draft tokens the target accepted while writing
    drafted: int = 0  # draft positions computed while writing
    target_forwards: int = 0


@dataclass(kw_only=True)
class Rejected:
    """A rejected step to write: what the verification pass already decided of it."""

    gen: Generation
    proposed: list[int]
    kept: int  # leading tokens of the draft's step the target keeps
    next_token: int | None  # the target's own token after them (None: it agrees with the whole step)


@dataclass
class _Writing:
    gen: Generation
    written: Written
    end: int | None
    plain: bool = False  # the target decodes alone for the rest of the step
    gamma: int = 0  # this round's draft tokens

    @property
    def open(self) -> bool:
        return self.end is None and len(self.written.tokens) < self.gen.limit and not self.gen.overdue()


def write(runtime: Runtime, steps: list[Rejected]) -> dict[int, Written]:
    """Each generation's step as the target writes it: the kept tokens, its own next token, then on to the step's
    end, by slot."""
    out: dict[int, Written] = {}
    every: list[_Writing] = []
    for step in steps:
        tokens = step.proposed[: step.kept]
        written = out[step.gen.slot] = Written(tokens=tokens)
        if step.next_token is None:  # the target agrees with the whole step
            continue
        tokens.append(step.next_token)
        every.append(_Writing(step.gen, written, step.gen.out.step_end(tokens, step.kept)))
    going = [w for w in every if w.open]
    while going:
        for w in going:
            room = w.gen.limit - len(w.written.tokens)
            w.gamma = 0 if w.plain else w.gen.agreement.speculation_length(room - 1)
            w.plain = w.gamma == 0
        drafted = _draft_round(runtime, [w for w in going if w.gamma > 0])
        trials = [
            Trial(
                gen=w.gen,
                proposed=drafted[w.gen.slot][0] if w.gamma else [],
                before=list(w.written.tokens),
                bonus=True,  # the round fed every proposal: the target always has a next token
                logq=drafted[w.gen.slot][1] if w.gamma else None,
            )
            for w in going
        ]
        judgement = judge(runtime, trials)
        for w, trial, logits, accepted in zip(going, trials, judgement.logits, decide(runtime, judgement), strict=True):
            assert accepted.token is not None
            new = [*trial.proposed[: accepted.kept], accepted.token]
            if w.gamma:
                w.gen.agreement.observe(accepted.kept, accepted.kept < w.gamma)  # the next round's length follows it
                w.written.speculated += accepted.kept
                w.written.drafted += w.gamma
            w.written.target_forwards += 1
            if w.gen.logprobs is not None:
                w.gen.logprobs.add_logits(logits[: accepted.kept + 1], new)
            tokens = w.written.tokens
            w.end = w.gen.out.step_end([*tokens, *new], len(tokens))
            tokens.extend(new)
            runtime.rewind(w.gen.slot, len(w.gen.ids) + len(tokens) - 1)  # the next round feeds the last token again
        going = [w for w in going if w.open]
    for w in every:
        tokens = w.written.tokens
        w.written.tokens = tokens[: w.end] if w.end is not None else tokens[: w.gen.limit]
    return out


def _draft_round(runtime: Runtime, writing: list[_Writing]) -> dict[int, tuple[list[int], torch.Tensor]]:
    """The draft's proposals for a round, by slot: ``gamma`` tokens from each generation's first draft row, with
    their log-probabilities under the distribution they were drawn from (on the device)."""
    if not writing:
        return {}
    draft = runtime.draft
    slots = max(w.gen.slot for w in writing) + 1
    by_slot = {w.gen.slot: w for w in writing}
    fed: list[list[int]] = [[] for _ in range(slots)]
    starts: list[int | None] = [None] * slots
    for w in writing:  # each leader catches up to the last written token but one (the decode feeds it)
        sequence = [*w.gen.ids, *w.written.tokens]
        valid = draft.cache.valid[w.gen.slot * draft.width]
        fed[w.gen.slot], starts[w.gen.slot] = sequence[valid : len(sequence) - 1], valid
    draft.forward(fed, starts, leaders=True, logits=False)

    order = [by_slot.get(s) for s in range(slots)]  # every slot of the pass: writing, or riding along (None)
    draft.start_decode(
        [o.written.tokens[-1] if o else None for o in order],
        [len(o.gen.ids) + len(o.written.tokens) - 1 if o else 0 for o in order],
        [[o.gen.params.temperature] if o else [] for o in order],
        [o.gamma if o else 0 for o in order],
        leaders=True,
        controls=writing[0].gen.controls,
        seen=[o.gen.seen(draft, o.written.tokens) if o else None for o in order],
        uniforms=[o.gen.uniform(1, o.gamma) if o and o.gen.sampling else None for o in order],
        masked=any(w.gen.grammar is not None for w in writing),
    )
    cursors = {s: [w.gen.grammar.cursor(w.written.tokens)] for s, w in by_slot.items() if w.gen.grammar is not None}
    decode(draft, cursors, max(w.gamma for w in writing))
    tokens = draft.read_decoded(list(by_slot), 0)
    return {s: (tokens[s][0][: w.gamma], draft.out_logq[draft.decoded_row(s)][: w.gamma]) for s, w in by_slot.items()}
