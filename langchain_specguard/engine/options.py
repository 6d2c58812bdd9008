"""What one call brings besides its decoding parameters: its stops, checks, answer prefix and limits.

:class:`~.params.SpecGuardParams` says how to decode (the same for every call of a configured model);
:class:`CallOptions` says what this call's output must respect. Both travel with the call into the batched
loop, which runs generations of different calls side by side, so each generation carries its own and a new
per-call option is a field here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .calibration import ThresholdCalibrator
    from .grammar import Grammar
    from .scoring import GroundingScorer


@dataclass(frozen=True, kw_only=True)
class CallOptions:
    """One call's own inputs to the engine (keyword-only; every field has a neutral default).

    - ``stop``: stop sequences; the output ends before the first one and never contains it.
    - ``validate_step``: the text of a finished draft tool call in, a rejection reason or None out. A broken
      call loses the candidate vote to any call that fits, and a kept broken call is rejected whatever its
      score, so the target writes that step instead (``reason="schema"``).
    - ``prefix``: assistant text already rendered at the end of the prompt (e.g. a forced ``<tool_call>``): it
      counts when deciding whether a call is open, and is not part of the output.
    - ``single_call``: the output ends (``finish_reason`` "stop") with the step that closes its first tool call.
    - ``thinking``: the prompt already opened the think block (a reasoning model's generation prompt ends with
      ``<think>``), so the output starts inside it.
    - ``calibrator``: with ``acceptance_threshold="auto"``, where the threshold is learned; by default one of the
      generation's own. Pass one to learn across prompts on purpose (``ChatSpecGuard.calibrate``).
    - ``grounding``: a grounding scorer of your own (a subclass studying another attention signal); by default
      the one the parameters describe, none when the decision does not read grounding.
    - ``timeout``: seconds the call may run; past it the call raises ``TimeoutError`` within one draft chunk or
      one target pass (the checks sit between them, where they cost nothing).
    - ``max_batch_size``: the most generations this call shares its passes with (itself included); calls beyond
      it wait for a place.
    - ``grammar``: what the output must match (a JSON schema, :class:`~.grammar.Grammar`): every token the draft
      proposes and every token the target chooses is masked by it, so the output stays inside it (it ends when the
      grammar is complete, or at ``max_tokens`` or a stop sequence). Needs a local target and no open think block.
    """

    stop: tuple[str, ...] = ()
    validate_step: Callable[[str], str | None] | None = None
    prefix: str = ""
    single_call: bool = False
    thinking: bool = False
    calibrator: ThresholdCalibrator | None = None
    grounding: GroundingScorer | None = None
    timeout: float | None = None
    max_batch_size: int = 16
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            raise TypeError(f"stop must be a sequence of strings, e.g. ({self.stop!r},), not a str")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop sequences must be non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {self.max_batch_size!r}")
