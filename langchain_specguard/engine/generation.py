"""One generation's state: the committed sequence, the output text, its sampling generator, its agreement rate,
and the slot it holds in the batch it decodes in.

The loop (:mod:`.decoding`) owns it: the committed ids, the step index, what the caches keep
(``Runtime.rewind``), the calibrator and the agreement rate change there alone, from what the phases
return (``Proposal``, ``Verdict``, ``Written``). The phases (:mod:`.propose`, :mod:`.verify`, :mod:`.write`)
read it and write only the device state of the runners they run (a pass records how far it fed) and the
step's log-probability record; :mod:`.write`'s speculation rounds are a loop of their own and feed the
agreement rate after each round, because the next round's length depends on it.

Everything a generation's text depends on is its own: its parameters and options, its generator (seeded
per call, its draws made per step in amounts that depend on this generation alone), its agreement rate and
calibrator. So a call decodes the same text alone or beside others.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .calibration import ThresholdCalibrator
from .grammar import GrammarState
from .loading import ModelPair
from .logprobs import StepLogprobs
from .options import CallOptions
from .params import SpecGuardParams
from .runner import ModelRunner
from .sampling import Controls, seen_rows
from .scoring import GroundingScorer
from .text import OutputText

MAX_SPECULATION = 32
"""Most draft tokens one speculation round proposes."""


@dataclass
class AgreementRate:
    """How often the draft's next token is the target's, over every comparison of this generation.

    Each verification or speculation round shows ``a`` agreeing tokens and then, unless the whole run
    agreed, one disagreement: the Laplace-smoothed share of agreements is the per-token rate ``alpha``.
    ``cost`` is one draft decode iteration over one target pass (from the models' sizes) and ``token_cost``
    what each token past the first adds to a target pass, over a one-token pass, so :meth:`speculation_length`
    maximises expected tokens per round over its cost: ``(1 - alpha^(g+1)) / (1 - alpha)`` tokens for
    ``1 + g * (cost + token_cost)``. On a GPU a pass of a few tokens costs what one does (``token_cost`` 0);
    on a CPU each one adds compute (``RuntimePool.token_cost``), and a long round that a GPU would win loses.
    """

    cost: float
    token_cost: float = 0.0
    agreed: int = 1
    disagreed: int = 1

    def observe(self, agreed: int, disagreed: bool) -> None:
        self.agreed += agreed
        self.disagreed += int(disagreed)

    @property
    def rate(self) -> float:
        return self.agreed / (self.agreed + self.disagreed)

    def speculation_length(self, room: int) -> int:
        """Draft tokens per round (0: the target decodes alone), for at most ``room`` of them."""
        alpha, best, best_value = self.rate, 0, 1.0
        for gamma in range(1, min(room, MAX_SPECULATION) + 1):
            value = (1 - alpha ** (gamma + 1)) / (1 - alpha) / (1 + gamma * (self.cost + self.token_cost))
            if value > best_value:
                best, best_value = gamma, value
        return best


def seeded_generator(device: torch.device, params: SpecGuardParams) -> torch.Generator:
    """Seeded by ``seed``; greedy calls without one use seed 0, so the same call gives the same text."""
    rng = torch.Generator(device=device)
    if params.seed is not None:
        rng.manual_seed(params.seed)
    elif params.temperature == 0:
        rng.manual_seed(0)
    else:
        rng.seed()
    return rng


@dataclass
class Generation:
    """Everything one call's decoding needs: the loop updates it, the phases read it."""

    pair: ModelPair
    params: SpecGuardParams
    options: CallOptions
    out: OutputText
    ids: list[int]  # prompt + committed output
    budget: int
    rng: torch.Generator
    grounding: GroundingScorer | None  # whose step attention is recorded and scored; None: not read
    agreement: AgreementRate
    calibrator: ThresholdCalibrator | None = None  # with acceptance_threshold="auto"
    deadline: float | None = None  # time.monotonic() past which the call stops
    slot: int = -1  # its place in the batch's runners
    index: int = 0  # the next step's index
    limit: int = 0  # the most tokens the current step may take
    halted: bool = False  # past its deadline (or failed) mid-step: the phases leave it alone, the loop reports why
    error: BaseException | None = None  # why it halted, when not its deadline
    logprobs: StepLogprobs | None = None  # the current step's, when the call reports log-probabilities
    grammar: GrammarState | None = None  # what the output must match (CallOptions.grammar), at the committed output
    controls: Controls = field(init=False)
    _seen: dict[tuple[torch.device, int], tuple[torch.Tensor, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.controls = Controls.of(self.params)

    def begin_step(self) -> None:
        """Get ready for the next step: its rules, its token limit, its log-probability record."""
        self.out.begin_step()
        self.logprobs = StepLogprobs(self.params.top_logprobs or 0) if self.params.logprobs else None
        self.limit = min(self.params.step_cap, self.budget - len(self.out.generated))

    def overdue(self) -> bool:
        """Past the call's deadline (then halted: the phases skip it for the rest of the step)."""
        if self.deadline is not None and not self.halted and time.monotonic() > self.deadline:
            self.halted = True
        return self.halted

    def fail(self, error: BaseException) -> None:
        """Halt with ``error`` (e.g. the caller's own step check raised): the loop reports it to this call alone."""
        self.error, self.halted = error, True

    def uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.rng, device=self.rng.device)

    @property
    def sampling(self) -> bool:
        return self.params.temperature > 0

    def threshold(self) -> float:
        """The acceptance threshold in force for the next step."""
        if self.calibrator is not None:
            return self.calibrator.threshold()
        assert not isinstance(self.params.acceptance_threshold, str)
        return self.params.acceptance_threshold

    def seen(self, runner: ModelRunner, extra: Sequence[int] = ()) -> torch.Tensor | None:
        """Mask ``[V]`` of the tokens in ``ids`` and ``extra`` on ``runner``'s device, or None without a
        repetition penalty. The mask of the committed ids is kept and extended as they grow (one small
        copy per step, none per token)."""
        if not self.controls.penalised:
            return None
        key = (runner.device, runner.vocab)
        mask, count = self._seen.get(key) or (torch.zeros(runner.vocab, dtype=torch.bool, device=runner.device), 0)
        if count < len(self.ids):
            mask.index_fill_(0, _known(self.ids[count:], runner), True)
        self._seen[key] = (mask, len(self.ids))
        if not extra:
            return mask
        return mask.clone().index_fill_(0, _known(extra, runner), True)

    def seen_rows(
        self, runner: ModelRunner, extra: Sequence[int], fed: Sequence[int], device: torch.device
    ) -> torch.Tensor | None:
        """Seen-token masks ``[len(fed), V]`` for the rows of a pass of ``runner`` that fed ``fed`` after
        ``ids + extra`` (row ``j`` has also seen ``fed[: j + 1]``), or None without a repetition penalty."""
        before = self.seen(runner, extra)
        return None if before is None else seen_rows(before, torch.tensor(list(fed), device=device))


def _known(tokens: Sequence[int], runner: ModelRunner) -> torch.Tensor:
    """``tokens`` that ``runner``'s model has rows for (a draft has none for rows only the target writes)."""
    return torch.tensor([t for t in tokens if t < runner.vocab], dtype=torch.long, device=runner.device)
