"""The verify and write phases of a step against a served target: the draft proposes here, a server judges and
writes.

The loop (:func:`~.decoding.step`) runs these in place of :func:`~.verify.verify` and :func:`~.write.write` when the
pair's target is served (``Runtime.served``, :func:`~.loading.load_served_pair`). What decides is the local
engine's own code: a step the server judged goes through :func:`~.verify.step_rule` (the score against the
threshold in force) and :func:`~.verify.judged_verdict`, and a rejected one through :func:`~.accept.accept`
(:meth:`~.served.ServedJudgement.accepted`: the tokens it keeps, the per-token rule's included, and the target's
token there), so the same answers give the same verdicts as a local target's pass.

Per step and generation:

1. **verify**: one ``judge`` request (:meth:`~.served.ServedTarget.judge`: the committed ids and the step, ``echo``,
   ``logprobs=1``, ``max_tokens=1``) gives each step token's log-probability and the target's first choice there.
   A generation whose draft scores its own steps (``signal_source="draft"``) asks only when its step is rejected.
2. **write**, for a rejected step: its kept prefix and the target's token there, then ``write`` requests
   (:meth:`~.served.ServedTarget.write`, greedy) that stop at any text that may end a step
   (``OutputText.step_patterns``) or at end-of-sequence; the engine's own step rule (``OutputText.step_end``) cuts
   the step, and asks for more when the server stopped short of its end (a delimiter inside a tool call).

The generations of a batch send their requests at once, through the target's one connection pool, and each
request is bounded by the call's own deadline as well as by the target's timeout. A request that fails ends its
own call with the :class:`~.served.ServedError` (it names the server), never the others of the batch.

What a served target cannot do exactly is refused before a call starts (:func:`check_served_params`): sampling
(speculative rejection sampling needs the target's whole distribution at a rejected token, and the server returns
its top entry alone), a repetition penalty (the server scores the prompt without one), log-probabilities of the
output (not gathered from a server yet), and a decision that reads the target's attention (a server returns none).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from .params import SpecGuardParams
from .served import ServedError, ServedJudgement, ServedProtocolError, ServedTarget
from .verify import Verdict, judged_verdict, passed_by_rule, scored_by_draft, to_judge
from .write import Rejected, Written

if TYPE_CHECKING:
    from .generation import Generation
    from .propose import Proposal
    from .runtimes import Runtime

T = TypeVar("T")


def check_served_params(params: SpecGuardParams, url: str) -> None:
    """Refuse decoding options a target served at ``url`` cannot honour exactly (a ``ValueError`` that says why and
    what to do instead)."""
    where = f"with a served target ({url})"
    if params.temperature > 0:
        raise ValueError(
            f"temperature={params.temperature:g} is not supported {where}: exact speculative sampling needs the "
            "target's whole distribution at a rejected token, and the server returns only its top entry "
            "(logprobs=1); use temperature=0 (greedy, exact)"
        )
    if params.repetition_penalty != 1:
        raise ValueError(
            f"repetition_penalty={params.repetition_penalty:g} is not supported {where}: the server scores the "
            "step's tokens without the penalty, so its verdicts would not be the penalised target's; leave it at 1"
        )
    if params.logprobs:
        raise ValueError(
            f"logprobs=True is not supported {where} yet: the output's log-probabilities are not gathered from the "
            "server's answers; leave logprobs off"
        )
    if params.uses_grounding and params.signal_source == "target":
        raise ValueError(
            f"decision={params.decision!r} reads the target's attention grounding, which is not available {where} "
            "(the server returns no attention): use decision='confidence' (the default), or signal_source='draft' "
            "with confidence_method 'mean' or 'min' to ground on the local draft's attention"
        )


def verify_served(runtime: Runtime, gens: list[Generation], proposals: dict[int, Proposal]) -> dict[int, Verdict]:
    """Each generation's verdict on its proposal, by slot, the target's part from one ``judge`` request each."""
    served = _served(runtime)
    verdicts = scored_by_draft(runtime, gens, proposals)
    judged = to_judge(gens, verdicts)

    def judge(gen: Generation) -> ServedJudgement:
        return served.judge(gen.ids, proposals[gen.slot].tokens, timeout=time_left(gen))

    answers = concurrently(judged, judge)
    for gen, answer in zip(judged, answers, strict=True):
        if answer is None:  # its request failed, or its time ran out: the call ends (gen.halted)
            continue
        proposal = proposals[gen.slot]
        if gen.params.signal_source == "draft":
            verdict = verdicts[gen.slot]
            verdict.target_forwards += 1
        else:
            k = len(proposal.tokens)
            verdict = judged_verdict(gen, proposal, answer.logp, answer.top_logp, answer.choices[:k], math.nan)
            verdicts[gen.slot] = verdict
        if not verdict.accepted:
            _keep(gen, proposal, verdict, answer)
    return verdicts


def _keep(gen: Generation, proposal: Proposal, verdict: Verdict, answer: ServedJudgement) -> None:
    """How much of a rejected step the target keeps, and its own token after that (None: it keeps all of it)."""
    passed = passed_by_rule(gen, proposal, verdict, answer.logp, answer.top_logp)
    kept = answer.accepted(passed, bonus=False)
    if passed is None:  # (tokens passed by the threshold say nothing of how often the draft is the target)
        verdict.agreement_seen = (kept.kept, kept.kept < len(proposal.tokens))
    verdict.kept, verdict.next_token = kept.kept, kept.token


def write_served(runtime: Runtime, steps: list[Rejected]) -> dict[int, Written]:
    """Each rejected step as the server writes it on from the first disagreement, by slot."""
    served = _served(runtime)
    by_slot = {s.gen.slot: s for s in steps}
    written = concurrently([s.gen for s in steps], lambda gen: _write(served, by_slot[gen.slot]))
    return {s.gen.slot: w for s, w in zip(steps, written, strict=True) if w is not None}


def _write(served: ServedTarget, step: Rejected) -> Written:
    gen = step.gen
    tokens = step.proposed[: step.kept]
    written = Written(tokens=tokens)
    if step.next_token is None:  # the target agrees with the whole step
        return written
    tokens.append(step.next_token)
    end = gen.out.step_end(tokens, step.kept)
    stop_ids = sorted(gen.pair.eos_token_ids)
    while end is None and len(tokens) < gen.limit and not gen.overdue():
        answer = served.write(
            [*gen.ids, *tokens],
            gen.limit - len(tokens),
            stop=gen.out.step_patterns,
            stop_token_ids=stop_ids,
            timeout=time_left(gen),
        )
        written.target_forwards += 1
        if not answer.tokens:  # (a server that writes nothing would be asked again and again)
            raise ServedProtocolError(
                served.url, f"wrote no tokens (finish_reason {answer.finish_reason!r}) where a step goes on"
            )
        end = gen.out.step_end([*tokens, *answer.tokens], len(tokens))
        tokens.extend(answer.tokens)
    written.tokens = tokens[:end] if end is not None else tokens[: gen.limit]
    return written


def concurrently(gens: Sequence[Generation], request: Callable[[Generation], T]) -> list[T | None]:
    """``request(gen)`` for every generation, all at once (they share the target's connection pool), in order; None
    for a generation past its deadline or whose request failed, which is then halted with its error (its call
    alone)."""

    def run(gen: Generation) -> T | None:
        if gen.overdue():
            return None
        try:
            return request(gen)
        except ServedError as error:
            if not gen.overdue():  # (past its deadline, the call's own TimeoutError says why)
                gen.fail(error)
            return None

    if len(gens) <= 1:
        return [run(gen) for gen in gens]
    with ThreadPoolExecutor(max_workers=len(gens), thread_name_prefix="specguard-served") as pool:
        return list(pool.map(run, gens))


def time_left(gen: Generation) -> float | None:
    """Seconds until the call's deadline (None: it has none)."""
    return None if gen.deadline is None else max(gen.deadline - time.monotonic(), 0.0)


def _served(runtime: Runtime) -> ServedTarget:
    assert runtime.served is not None, "the served phases run only with a served target"
    return runtime.served
