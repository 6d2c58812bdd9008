"""Concurrent calls on one pair share batched passes: a scheduler runs every generation of the pair in one worker.

Calls submit their generation (:class:`Ticket`) from whatever thread they run in (a ``batch()`` thread pool,
asyncio's workers, LangGraph branches) and read their steps back from the ticket. One worker thread per pair runs
the :class:`Batch` es: in turn, each takes one step for all its generations together (the loop's
:func:`~.decoding.step`). Between steps, waiting calls join (their prompt prefilled into a free slot of the
batch's runtime) and finished, cancelled, failed or overdue ones leave, freeing their slots without touching the
others (vLLM's scheduler does the same between iterations).

Generations that cannot share a pass run in batches of their own, in turn with the others: those whose draft
candidates, sampling filters (``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``), draft-scored
``top_logprobs``, grounding scorer, cache kind or cache size tier differ (:func:`batch_key`). Everything else
(temperature, seed, stops, ``max_tokens``, thresholds, tools, schema checks, log-probabilities) is per row.

The worker starts with the first call and ends when no generation is left, so an idle pair holds no thread.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from contextlib import nullcontext

import torch

from .events import StepEvent
from .generation import Generation
from .runtimes import Runtime, RuntimePool, Shape

StepResults = Sequence[tuple[Generation, "StepEvent | BaseException"]]

AHEAD = 2
"""Steps a generation may have computed that its caller has not taken yet. The batch runs one step ahead of each
caller, so a caller's own work between steps (chunks, callbacks, traces) overlaps the next step instead of making the
batch wait; a caller that stops reading holds its generation there (memory stays bounded)."""


class Batch:
    """Generations decoding together on one runtime: they share every pass, and join and leave between steps."""

    def __init__(self, runtime: Runtime, key: Hashable) -> None:
        self.runtime = runtime
        self.key = key
        self.running: list[Generation] = []  # in slot order
        self.cap = 1 << 30  # the most generations it may hold (the smallest max_batch_size among them)

    def join(self, gen: Generation) -> None:
        """Give ``gen`` a slot and write its prompt (but its last token, which its first pass feeds) into the caches."""
        slot = self.runtime.take_slot()
        try:
            prompt = gen.ids[:-1]
            for runner in self.runtime.runners:  # (a served target keeps nothing between requests)
                runner.prefill(slot, prompt, 0)
        except BaseException:
            self.runtime.release(slot)
            raise
        gen.slot = slot
        self.running = sorted([*self.running, gen], key=lambda g: g.slot)
        self.cap = min(self.cap, gen.options.max_batch_size)

    def leave(self, gen: Generation) -> None:
        self.runtime.release(gen.slot)
        self.running = [g for g in self.running if g is not gen]
        self.cap = min((g.options.max_batch_size for g in self.running), default=1 << 30)


class Ticket:
    """One call's place in the scheduler: its generation goes in, its steps (or its error) come out."""

    def __init__(self, gen: Generation, key: Hashable, shape: Shape) -> None:
        self.gen, self.key, self.shape = gen, key, shape
        self.cancelled = False
        self.pending = 0  # steps put and not taken yet (changed under the scheduler's lock)
        self.scheduler: Scheduler | None = None
        self._out: queue.SimpleQueue[StepEvent | BaseException] = queue.SimpleQueue()

    def put(self, item: StepEvent | BaseException) -> None:
        if self.scheduler is not None:
            with self.scheduler.changed:
                self.pending += 1
        self._out.put(item)

    def get(self) -> StepEvent | BaseException:
        item = self._out.get()
        if self.scheduler is not None:
            with self.scheduler.changed:
                self.pending -= 1
                self.scheduler.changed.notify()
        return item

    @property
    def ready(self) -> bool:
        """Whether its generation may take another step now (its caller is at most ``AHEAD`` steps behind)."""
        return self.pending < AHEAD

    def cancel(self) -> None:
        """The caller stopped reading: the generation leaves its batch at the next step boundary."""
        self.cancelled = True
        if self.scheduler is not None:
            with self.scheduler.changed:
                self.scheduler.changed.notify()


def batch_key(gen: Generation, shape: Shape) -> Hashable:
    """What generations must share to run in one pass (see the module's docstring)."""
    params = gen.params
    top = (params.top_logprobs or 0) if params.logprobs and params.signal_source == "draft" else 0
    return (shape, gen.controls, top, gen.grounding)


class Scheduler:
    """Every generation of one pair, batched, in one worker thread (started on demand, gone when idle)."""

    def __init__(
        self, pool: RuntimePool, device: torch.device, step: Callable[[Runtime, list[Generation]], StepResults]
    ) -> None:
        self.pool, self.device, self.step = pool, device, step
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # a caller took a step, cancelled, or arrived
        self.waiting: deque[Ticket] = deque()
        self.batches: dict[Hashable, Batch] = {}
        self.tickets: dict[int, Ticket] = {}  # by id of the generation
        self.worker: threading.Thread | None = None

    def submit(self, ticket: Ticket) -> None:
        ticket.scheduler = self
        with self.lock:
            self.waiting.append(ticket)
            self.changed.notify()
            if self.worker is None:
                self.worker = threading.Thread(target=self._run, name="specguard-batch", daemon=True)
                self.worker.start()

    def _run(self) -> None:
        device = torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()
        try:
            with torch.inference_mode(), device:
                while True:
                    joining = self._admit()
                    if joining is None:
                        return
                    for batch, ticket in joining:
                        self._join(batch, ticket)
                    stepped = [self._step(batch) for batch in list(self.batches.values())]
                    if not any(stepped) and not joining:
                        self._wait()
        except BaseException as error:  # the worker itself broke (a bug): no call may wait forever
            with self.lock:
                stranded = [*self.waiting, *self.tickets.values()]
                self.waiting.clear()
                self.tickets.clear()
                self.batches.clear()
                self.worker = None
            for ticket in stranded:
                ticket.put(error)
            raise

    def _admit(self) -> list[tuple[Batch, Ticket]] | None:
        """Waiting calls that join a batch now; None (and the worker ends) when nothing is left to do."""
        with self.lock:
            joining: list[tuple[Batch, Ticket]] = []
            staying: deque[Ticket] = deque()
            for ticket in self.waiting:
                if ticket.cancelled:
                    continue
                batch = self.batches.get(ticket.key)
                if batch is None:
                    batch = self.batches[ticket.key] = Batch(self.pool.take(ticket.shape), ticket.key)
                size = len(batch.running) + sum(b is batch for b, _ in joining)
                if size < min(batch.cap, ticket.gen.options.max_batch_size):
                    joining.append((batch, ticket))
                    batch.cap = min(batch.cap, ticket.gen.options.max_batch_size)
                else:
                    staying.append(ticket)
            self.waiting = staying
            if not joining and not any(b.running for b in self.batches.values()) and not self.waiting:
                for batch in self.batches.values():
                    self.pool.give(batch.runtime)
                self.batches.clear()
                self.worker = None
                return None
            return joining

    def _join(self, batch: Batch, ticket: Ticket) -> None:
        try:
            batch.join(ticket.gen)
        except Exception as error:  # its prompt could not be written (e.g. out of memory): that call alone fails
            ticket.put(error)
            return
        self.tickets[id(ticket.gen)] = ticket

    def _wait(self) -> None:
        """Nothing to step: wait until a caller takes a step, cancels or arrives (or a deadline may have passed)."""
        with self.changed:
            if self.waiting or any(self.tickets[id(g)].ready for b in self.batches.values() for g in b.running):
                return
            self.changed.wait(timeout=0.05)

    def _step(self, batch: Batch) -> bool:
        """One step of the batch's generations whose callers are ready for it; whether any step ran."""
        for gen in list(batch.running):  # leave between steps: cancelled, or past the deadline
            ticket = self.tickets[id(gen)]
            if ticket.cancelled or gen.overdue():
                if not ticket.cancelled:
                    ticket.put(overdue(gen))
                self._leave(batch, gen)
        ready = [g for g in batch.running if self.tickets[id(g)].ready]
        if ready:
            try:
                results = self.step(batch.runtime, ready)
            except Exception as error:  # a pass failed: every call of the batch gets the error, the runtime goes
                for gen in batch.running:
                    self.tickets.pop(id(gen)).put(error)
                with self.lock:
                    del self.batches[batch.key]
                return True
            for gen, result in results:
                self.tickets[id(gen)].put(result)
                if isinstance(result, BaseException) or result.finish_reason:
                    self._leave(batch, gen)
        if not batch.running:
            with self.lock:
                if not batch.running and self.batches.get(batch.key) is batch:
                    del self.batches[batch.key]
                    self.pool.give(batch.runtime)
        return bool(ready)

    def _leave(self, batch: Batch, gen: Generation) -> None:
        batch.leave(gen)
        self.tickets.pop(id(gen), None)


def overdue(gen: Generation) -> BaseException:
    """What a halted generation's call raises: its own error, or that its time ran out."""
    if gen.error is not None:
        return gen.error
    return TimeoutError(f"the call ran past its timeout of {gen.options.timeout} s")
