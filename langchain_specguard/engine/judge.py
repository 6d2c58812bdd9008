"""The target judges proposed tokens: one batched pass over every trial, then the accept rule for each.

A *trial* is one generation's proposal: a draft step to verify, or a speculation round's draft tokens while the
target writes. :func:`judge` feeds every trial of the batch to the target in one pass (catching a lagging
cache up in the same pass) and reads to the host, once, the target's greedy choice after every fed position
and, when asked, the log-probabilities the confidence rule reads. :func:`decide` then applies the accept rule
(:mod:`.accept`): greedy trials on the host values already read, sampling trials by speculative rejection
sampling on the device. Verification (:mod:`.verify`) and writing (:mod:`.write`) both come here, so "the target
judges proposed tokens" is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .accept import Accepted, accept
from .attention import StepAttention
from .grammar import constrain
from .runner import ModelRunner
from .sampling import greedy, processed_logprobs, raw_logprobs

if TYPE_CHECKING:
    from .generation import Generation
    from .runtimes import Runtime


@dataclass(kw_only=True)
class Trial:
    """One generation's tokens for the target to judge, after ``gen.ids + before``.

    ``bonus``: the last proposal is fed too, so the target's own next token after all of them comes out of the
    same pass (a speculation round); a verification feeds the step but its last token (the next step starts by
    feeding it). ``logq``: each proposal's log-probability under the distribution the draft drew it from (device;
    needed when the generation samples)."""

    gen: Generation
    proposed: list[int]
    before: list[int] = field(default_factory=list)
    bonus: bool = False
    logq: torch.Tensor | None = None

    @property
    def sequence(self) -> list[int]:
        return [*self.gen.ids, *self.before]

    @property
    def fed(self) -> list[int]:
        """What the pass feeds after the catch-up: the last token of the sequence, then the proposals."""
        last = self.sequence[-1]
        return [last, *self.proposed] if self.bonus else [last, *self.proposed[:-1]]

    @property
    def rows(self) -> int:
        """Logits rows the trial reads: one per proposal, and one more with ``bonus``."""
        return len(self.proposed) + int(self.bonus)


@dataclass
class Judgement:
    """What the target's pass says of each trial (row ``i`` of each table is ``trials[i]``)."""

    trials: list[Trial]
    logits: list[torch.Tensor]  # per trial [rows, V], on the device (valid until the target's next pass)
    choices: torch.Tensor  # [n, r] the target's greedy choice after each fed position (host)
    device_choices: torch.Tensor  # the same, on the device
    logp: torch.Tensor | None  # [n, k] float64: each proposal's raw log-probability (host; with scores)
    top: torch.Tensor | None  # [n, k] float64: the raw log-probability of the target's first choice there
    # per trial with a grammar, the masks [rows, words] its logits rows were constrained by (.grammar; host)
    bitmasks: list[torch.Tensor | None] = field(default_factory=list)

    def subset(self, indices: Sequence[int]) -> Judgement:
        """The judgement of the trials ``indices`` alone."""
        pick = list(indices)
        on_device = torch.as_tensor(pick, device=self.device_choices.device)
        return Judgement(
            trials=[self.trials[i] for i in pick],
            logits=[self.logits[i] for i in pick],
            choices=self.choices[pick],
            device_choices=self.device_choices.index_select(0, on_device),
            logp=self.logp[pick] if self.logp is not None else None,
            top=self.top[pick] if self.top is not None else None,
            bitmasks=[self.bitmasks[i] for i in pick],
        )


def judge(
    runtime: Runtime, trials: Sequence[Trial], *, scores: bool = False, record: StepAttention | None = None
) -> Judgement:
    """One target pass over every trial (each slot catching up from its cache's valid part first); one host read."""
    target = runtime.local_target
    slots = max(t.gen.slot for t in trials) + 1
    fed: list[list[int]] = [[] for _ in range(slots)]
    starts: list[int | None] = [None] * slots
    offsets = []
    for trial in trials:
        sequence, slot = trial.sequence, trial.gen.slot
        valid = target.cache.valid[slot]
        catch_up = sequence[valid : len(sequence) - 1]
        assert record is None or not catch_up, "a recorded pass reads each step at row 0 of its slot"
        fed[slot], starts[slot] = [*catch_up, *trial.fed], valid
        offsets.append(len(catch_up))
    out = target.forward(fed, starts, record=record)
    assert out is not None
    width = max(t.rows for t in trials)
    logits = [out[t.gen.slot, offset : offset + t.rows] for t, offset in zip(trials, offsets, strict=True)]
    bitmasks = [_bitmask(t) for t in trials]
    logits = [x if mask is None else constrain(x, mask) for x, mask in zip(logits, bitmasks, strict=True)]
    window = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[0])) for x in logits])  # [n, r, V]
    controls = trials[0].gen.controls  # (one set per batch: part of its key)
    seen = _seen_rows(target, trials, width) if controls.penalised else None
    choices = greedy(window, controls, seen)  # [n, r]
    parts = [choices.to(torch.float64)]
    if scores:
        k = max(len(t.proposed) for t in trials)
        proposed = torch.tensor([_pad(t.proposed, k) for t in trials], device=window.device)
        raw = raw_logprobs(window[:, :k])
        parts += [raw.gather(-1, proposed[..., None]).squeeze(-1).double(), raw.max(dim=-1).values.double()]
    table = torch.stack([_cols(p, width) for p in parts]).cpu()  # the one host read (token ids exact in float64)
    k = max(len(t.proposed) for t in trials)
    return Judgement(
        trials=list(trials),
        logits=logits,
        choices=table[0].long(),
        device_choices=choices,
        logp=table[1, :, :k] if scores else None,
        top=table[2, :, :k] if scores else None,
        bitmasks=bitmasks,
    )


def _bitmask(trial: Trial) -> torch.Tensor | None:
    """The grammar's masks of the trial's logits rows (None without a grammar): what the target may choose at each."""
    grammar = trial.gen.grammar
    return None if grammar is None else grammar.bitmask_along(trial.before, trial.proposed, trial.rows)


def decide(
    runtime: Runtime, judgement: Judgement, passed: Sequence[torch.Tensor | None] | None = None
) -> list[Accepted]:
    """The accept rule for every trial: how many proposals the target keeps, and its own token after them.

    ``passed[i]`` (bool ``[k_i]``) marks trial ``i``'s proposals the verification rule already passed. Greedy
    trials are decided on the host values the judge read; sampling trials by speculative rejection sampling
    against the draft's distribution, both sides processed with the same penalty and filters."""
    trials = judgement.trials
    results: list[Accepted | None] = [None] * len(trials)
    for sampled in (False, True):
        chosen = [i for i, t in enumerate(trials) if t.gen.sampling == sampled]
        if not chosen:
            continue
        k = max(max(len(trials[i].proposed) for i in chosen), 1)
        lengths = [len(trials[i].proposed) for i in chosen]
        rows = [trials[i].rows for i in chosen]
        marks = None
        if passed is not None and any(passed[i] is not None for i in chosen):
            marks = torch.zeros(len(chosen), k, dtype=torch.bool)
            for j, i in enumerate(chosen):
                mark = passed[i]
                if mark is not None:
                    marks[j, : mark.shape[0]] = mark.cpu()
        if not sampled:
            proposed = torch.tensor([_pad(trials[i].proposed, k) for i in chosen])
            decided = accept(proposed, lengths, rows, choices=judgement.choices[chosen], passed=marks)
        else:
            decided = _sample(runtime, judgement, chosen, k=k, lengths=lengths, rows=rows, passed=marks)
        for i, result in zip(chosen, decided, strict=True):
            results[i] = result
    return [r for r in results if r is not None]


def _sample(
    runtime: Runtime,
    judgement: Judgement,
    chosen: list[int],
    *,
    k: int,
    lengths: list[int],
    rows: list[int],
    passed: torch.Tensor | None,
) -> list[Accepted]:
    trials = [judgement.trials[i] for i in chosen]
    width = max(rows)
    device = judgement.logits[chosen[0]].device
    window = torch.stack([torch.nn.functional.pad(judgement.logits[i], (0, 0, 0, width - judgement.logits[i].shape[0]))
                          for i in chosen])  # fmt: skip
    controls = trials[0].gen.controls
    seen = _seen_rows(runtime.local_target, trials, width) if controls.penalised else None
    temperatures = torch.tensor([[t.gen.params.temperature] for t in trials], dtype=torch.float64, device=device)
    logp = processed_logprobs(window, temperatures, controls, seen)  # [m, r, V]
    logq = torch.stack([_pad_tensor(t.logq, k, device) for t in trials])
    uniforms = torch.stack([_pad_tensor(t.gen.uniform(len(t.proposed) + 1), k + 1, device) for t in trials])
    proposed = torch.tensor([_pad(t.proposed, k) for t in trials], device=device)

    def draft_logq_at(which: list[int], firsts: list[int]) -> torch.Tensor:
        """The draft's processed distribution at each trial's first rejection, computed again in one pass."""
        draft = runtime.draft
        slots = max(trials[b].gen.slot for b in which) + 1
        fed: list[list[int]] = [[] for _ in range(slots)]
        starts: list[int | None] = [None] * slots
        for b, first in zip(which, firsts, strict=True):
            trial = trials[b]
            fed[trial.gen.slot] = [trial.fed[first]]
            starts[trial.gen.slot] = len(trial.sequence) - 1 + first
        out = draft.forward(fed, starts, leaders=True)
        assert out is not None
        found = []
        for b, first in zip(which, firsts, strict=True):
            trial = trials[b]
            draft_logits = out[trial.gen.slot, 0]
            mask = judgement.bitmasks[chosen[b]]
            if mask is not None:  # the distribution the draft drew from was the constrained one
                draft_logits = constrain(draft_logits, mask[first])
            draft_seen = trial.gen.seen(draft, [*trial.before, *trial.fed[1 : first + 1]])
            t = temperatures[b, 0].to(draft_logits.device)
            found.append(processed_logprobs(draft_logits, t, controls, draft_seen))
        return torch.stack(found)

    return accept(
        proposed,
        lengths,
        rows,
        choices=judgement.device_choices[chosen].to(device),
        sampled=[True] * len(trials),
        logp=logp,
        logq=logq,
        uniforms=uniforms,
        passed=passed,
        draft_logq_at=draft_logq_at,
    )


def _seen_rows(target: ModelRunner, trials: Sequence[Trial], width: int) -> torch.Tensor:
    """Seen-token masks ``[n, width, V]`` of each trial's judged rows (row ``j`` has seen ``fed[: j + 1]``)."""
    masks = []
    for trial in trials:
        fed = trial.fed[: trial.rows]
        rows = trial.gen.seen_rows(target, trial.before, fed, target.device)
        assert rows is not None
        masks.append(torch.nn.functional.pad(rows, (0, 0, 0, width - rows.shape[0])))
    return torch.stack(masks)


def _pad(tokens: Sequence[int], k: int) -> list[int]:
    return [*tokens, *([0] * (k - len(tokens)))]


def _pad_tensor(values: torch.Tensor | None, k: int, device: torch.device) -> torch.Tensor:
    """``values`` (or nothing) cut or padded with zeros to ``k``, on ``device``."""
    if values is None:
        return torch.zeros(k, device=device, dtype=torch.float64)
    values = values.reshape(-1)[:k].to(device, torch.float64)
    return torch.nn.functional.pad(values, (0, k - values.shape[0]))


def _cols(table: torch.Tensor, width: int) -> torch.Tensor:
    """``table [n, c]`` cut or padded to ``width`` columns."""
    if table.shape[1] >= width:
        return table[:, :width]
    return torch.nn.functional.pad(table, (0, width - table.shape[1]))
