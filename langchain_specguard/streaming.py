"""Streaming: one call's path from verified steps to chunks to the final message, and the bridge to asyncio.

:func:`call_chunks` is the path every entry point reads: each verified step becomes a message chunk
(:func:`step_chunk`; :class:`ShownContent` keeps tool-call text and incomplete markers out of the content),
and the last chunk (:func:`last_chunk`) is derived from the final message (:func:`final_message`: content,
reasoning, tool calls, usage, the step summary), so ``invoke``'s message, the sum of the chunks
(:func:`aggregate`), equals it. The decoding blocks, so async callers run it in a worker thread one step per
hop (:func:`iterate_in_thread`) and feed the steps to the same sync chunk generator (:func:`drive`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.messages import AIMessage, AIMessageChunk, message_chunk_to_message
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.utils import LC_ID_PREFIX

from .binding import ToolSetup
from .callbacks import StepReporter
from .engine import ModelPair, SpecGuardParams, StepEvent, summarize, token_bytes


@dataclass(frozen=True)
class PreparedCall:
    """One call, prepared: the loaded pair, the prompt's token ids, the decoding parameters, stops and tools."""

    pair: ModelPair
    prompt: list[int]
    params: SpecGuardParams
    stops: list[str]
    setup: ToolSetup
    step_details: bool = False  # return_step_details: the step events go into the final message too


def call_chunks(
    call: PreparedCall, events: Iterable[StepEvent], message_id: str | None
) -> Generator[ChatGenerationChunk, None, None]:
    """The call's chunks: one per step as it is verified, then the last chunk, derived from the final message.

    Every path reads this generator, so the chunks of ``stream``, the chunks that ``invoke`` hands to
    streaming callbacks and the message ``invoke`` returns (their sum, :func:`aggregate`) cannot differ.
    """
    steps: list[StepEvent] = []
    shown = ShownContent(call.setup)
    for event in events:
        steps.append(event)
        yield step_chunk(shown.add(event.text), call.pair, event, message_id)
    yield last_chunk(final_message(call, steps), shown, message_id)


def reported_chunks(
    call: PreparedCall, steps: Iterator[StepEvent], reporter: StepReporter, run: CallbackManagerForLLMRun | None
) -> Iterator[ChatGenerationChunk]:
    """``_stream``: the call's chunks, each step reported to the run before its chunk, the summary with the last.

    A consumer that stops early closes ``steps`` now (the generation leaves its batch), not at GC.
    """
    events = reporter.steps(steps)
    try:
        for chunk in call_chunks(call, events, run_message_id(run)):
            if is_last(chunk):
                reporter.summary(chunk.message.response_metadata["specguard"])
            yield chunk
    finally:
        close_now(events)


async def areported_chunks(
    call: PreparedCall, steps: Iterator[StepEvent], reporter: StepReporter, run: AsyncCallbackManagerForLLMRun | None
) -> AsyncGenerator[ChatGenerationChunk, None]:
    """``_astream``: the same chunks, the decoding in a worker thread one step per hop, so the event loop stays free."""
    events = reporter.asteps(iterate_in_thread(steps))
    message_id = run_message_id(run)
    async with contextlib.aclosing(drive(lambda arrived: call_chunks(call, arrived, message_id), events)) as chunks:
        async for chunk in chunks:
            if is_last(chunk):
                await reporter.asummary(chunk.message.response_metadata["specguard"])
            yield chunk


def collect(chunks: Iterator[ChatGenerationChunk], run_manager: CallbackManagerForLLMRun | None) -> ChatResult:
    """``_generate``: the chunks summed (:func:`aggregate`), each that carries something handed to the streaming
    callbacks (``on_llm_new_token``) as it comes."""
    kept: list[ChatGenerationChunk] = []
    for chunk in chunks:
        if run_manager is not None and carries_something(chunk):
            run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
        kept.append(chunk)
    return aggregate(kept)


async def acollect(
    chunks: AsyncIterator[ChatGenerationChunk], run_manager: AsyncCallbackManagerForLLMRun | None
) -> ChatResult:
    """The async twin of :func:`collect`."""
    kept: list[ChatGenerationChunk] = []
    async for chunk in chunks:
        if run_manager is not None and carries_something(chunk):
            await run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
        kept.append(chunk)
    return aggregate(kept)


def final_message(call: PreparedCall, steps: list[StepEvent]) -> AIMessage:
    """The message of a call that produced ``steps``: its content, reasoning, tool calls, usage and summary."""
    metadata = final_metadata(call, steps)
    text = "".join(s.text for s in steps)
    setup = call.setup
    reasoning, answer = setup.thought.split(text) if setup.thought is not None else ("", text)
    content, calls = setup.read_answer(answer)
    if calls.get("tool_calls") and metadata["finish_reason"] == "stop":
        metadata["finish_reason"] = "tool_calls"
    return AIMessage(
        content=content,
        additional_kwargs={"reasoning_content": reasoning} if reasoning else {},
        response_metadata=metadata,
        usage_metadata=usage(call.prompt, steps),
        **calls,
    )


def final_metadata(call: PreparedCall, steps: list[StepEvent]) -> dict[str, Any]:
    """The final message's ``response_metadata``: the model, why it finished, the step summary, log-probabilities."""
    summary = summarize(steps, sum(s.seconds for s in steps), len(call.prompt))
    if call.step_details:
        summary["step_events"] = [s.to_dict() for s in steps]  # beside the count "steps": one type each
    metadata = {
        "model_name": call.pair.name,
        "model_provider": "specguard",
        "finish_reason": (steps[-1].finish_reason if steps else None) or "length",
        "specguard": summary,
    }
    if steps and steps[0].logprobs is not None:
        metadata["logprobs"] = {"content": [e for s in steps for e in openai_logprobs(call.pair.tokenizer, s)]}
    return metadata


def usage(prompt: list[int], steps: list[StepEvent]) -> UsageMetadata:
    """Prompt and output tokens, the reasoning steps' tokens among the output's details."""
    out = sum(s.num_tokens for s in steps)
    # (a cast: mypy at python_version 3.10 reads langchain-core's NotRequired detail keys as required)
    counts = cast(UsageMetadata, {"input_tokens": len(prompt), "output_tokens": out, "total_tokens": len(prompt) + out})
    thinking = sum(s.num_tokens for s in steps if s.kind == "reasoning")
    if thinking:
        counts["output_token_details"] = {"reasoning": thinking}
    return counts


@dataclass
class ShownContent:
    """Streams the message content step by step, holding tool-call text back.

    The content shown so far is always a prefix of the final ``AIMessage.content`` that
    ``invoke`` returns: text inside an open or finished ``<tool_call>`` block (or an answer that may
    be a bare-JSON call) is held, and the calls arrive as ``tool_call_chunks`` in the last chunk.
    A reasoning model's thinking goes out as ``reasoning_content`` instead of content, under the same
    rule (:meth:`~langchain_specguard.reasoning.ThoughtSpec.split` holds back a marker still incomplete).
    """

    setup: ToolSetup
    text: str = ""
    sent: str = ""
    reasoning: str = ""  # the reasoning sent so far

    def add(self, step_text: str) -> AIMessageChunk:
        """The chunk for one more step of text: what it adds to the reasoning and to the content shown."""
        self.text += step_text
        thought = self.setup.thought
        reasoning, answer = thought.split(self.text, final=False) if thought is not None else ("", self.text)
        thinking = growth(self.reasoning, reasoning)
        self.reasoning += thinking
        visible = answer if self.setup.tools is None else self.setup.format.visible(self.setup.prefix + answer)
        delta = growth(self.sent, visible)
        self.sent += delta
        return AIMessageChunk(content=delta, additional_kwargs={"reasoning_content": thinking} if thinking else {})


def growth(shown: str, now: str) -> str:
    """What ``now`` adds to ``shown``; nothing if it does not extend it (shown text is never taken back)."""
    return now[len(shown) :] if now.startswith(shown) else ""


def run_message_id(run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None) -> str | None:
    """The id of the run's message, which its chunks and the final message share (LangGraph's
    ``stream_mode="messages"`` recognises the final message by it). Without a run manager (``stream``),
    langchain-core gives the chunks the run's id itself."""
    return f"{LC_ID_PREFIX}-{run_manager.run_id}" if run_manager is not None else None


def step_chunk(delta: AIMessageChunk, pair: ModelPair, event: StepEvent, message_id: str | None) -> ChatGenerationChunk:
    """A step's message chunk; with ``logprobs`` it carries the step's entries, which chunk addition
    concatenates into the final message's list."""
    if event.logprobs is not None:
        delta.response_metadata = {"logprobs": {"content": openai_logprobs(pair.tokenizer, event)}}
    delta.id = message_id
    return ChatGenerationChunk(message=delta)


def last_chunk(final: AIMessage, shown: ShownContent, message_id: str | None) -> ChatGenerationChunk:
    """The closing chunk of ``final``: usage, summary, any content or reasoning held back, the tool calls.

    Valid calls go out as ``tool_call_chunks`` whose arguments are their JSON; invalid calls too, with the
    arguments ``final`` gives them (a JSON string, :func:`~langchain_specguard.tools.inert_args`), which
    chunk addition reads as no object, so a sum of chunks keeps them invalid. Chunk addition cannot carry
    an invalid call's ``error``: this chunk keeps the errors in its own ``invalid_tool_calls``, where
    :func:`aggregate` finds them.
    """
    rest = growth(shown.sent, str(final.content))
    thinking = growth(shown.reasoning, str(final.additional_kwargs.get("reasoning_content", "")))
    chunks = [
        tool_call_chunk(name=call["name"], args=json.dumps(call["args"]), id=call["id"], index=i)
        for i, call in enumerate(final.tool_calls)
    ]
    chunks += [
        tool_call_chunk(name=bad.get("name"), args=bad.get("args"), id=bad.get("id"), index=len(chunks) + i)
        for i, bad in enumerate(final.invalid_tool_calls)
    ]
    # the steps' chunks carried the log-probabilities: chunks add up to the final message
    metadata = {k: v for k, v in final.response_metadata.items() if k != "logprobs"}
    message = AIMessageChunk(
        content=rest,
        additional_kwargs={"reasoning_content": thinking} if thinking else {},
        response_metadata=metadata,
        usage_metadata=final.usage_metadata,
        tool_call_chunks=chunks,
        chunk_position="last",
        id=message_id,
    )
    message.invalid_tool_calls = list(final.invalid_tool_calls)  # with their errors (parsed from chunks: none)
    return ChatGenerationChunk(message=message)


def is_last(chunk: ChatGenerationChunk) -> bool:
    return getattr(chunk.message, "chunk_position", None) == "last"


def carries_something(chunk: ChatGenerationChunk) -> bool:
    """Whether a chunk is worth a streaming callback: a step that adds text, reasoning or log-probabilities
    (a step of held-back tool-call text adds nothing), and always the last chunk."""
    message = chunk.message
    return bool(message.content or message.additional_kwargs or message.response_metadata) or is_last(chunk)


def aggregate(chunks: Sequence[ChatGenerationChunk]) -> ChatResult:
    """``invoke``'s result: the sum of the call's chunks, as a message.

    The sum is langchain-core's chunk addition, the same a consumer of ``stream`` does, so ``invoke``
    equals the streamed chunks added up by construction. The one thing addition drops, the errors of
    invalid tool calls, comes from the last chunk, which holds them.
    """
    first, *others = [chunk.message for chunk in chunks]
    assert isinstance(first, AIMessageChunk)
    total = first + others if others else first
    message = message_chunk_to_message(total)
    assert isinstance(message, AIMessage)
    last = chunks[-1].message
    assert isinstance(last, AIMessageChunk)
    errors = {bad.get("id"): bad.get("error") for bad in last.invalid_tool_calls}
    message.invalid_tool_calls = [{**bad, "error": errors.get(bad.get("id"))} for bad in message.invalid_tool_calls]
    return ChatResult(generations=[ChatGeneration(message=message)])


def openai_logprobs(tokenizer: Any, event: StepEvent) -> list[dict[str, Any]]:
    """The step's token log-probabilities in ChatOpenAI's shape: ``token``, ``bytes``, ``logprob``, ``top_logprobs``."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(tokenizer, token)
        return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw), "logprob": logprob}

    return [
        {**entry(item.token, item.logprob), "top_logprobs": [entry(t, lp) for t, lp in item.top]}
        for item in event.logprobs or []
    ]


_T = TypeVar("_T")


_U = TypeVar("_U")


class Inbox(Iterator[_T]):
    """A step iterator fed from outside, one item at a time: what an async caller hands a sync generator."""

    def __init__(self) -> None:
        self._items: deque[_T] = deque()
        self._closed = False

    def put(self, item: _T) -> None:
        self._items.append(item)

    def close(self) -> None:
        self._closed = True

    def __next__(self) -> _T:
        if self._items:
            return self._items.popleft()
        if self._closed:
            raise StopIteration
        raise RuntimeError("the generator asked for an item that has not arrived: it must take one per output")


async def drive(
    generator: Callable[[Iterator[StepEvent]], Generator[_U, None, None]], events: AsyncIterator[StepEvent]
) -> AsyncGenerator[_U, None]:
    """Run a sync step-to-chunk ``generator`` over steps that arrive asynchronously.

    The generator takes one step per chunk it yields until the steps end, then yields the rest (the last
    chunk): each step is put in its inbox as it arrives and its chunk read at once, on the event loop (the
    generator only builds messages; the decoding stays in its worker thread, behind ``events``).
    """
    inbox: Inbox[StepEvent] = Inbox()
    produced = generator(inbox)
    try:
        async for event in events:
            inbox.put(event)
            yield next(produced)
        inbox.close()
        for item in produced:
            yield item
    finally:
        produced.close()
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


def close_now(iterator: Iterator[Any]) -> None:
    """Close a generator now (its ``finally`` blocks run: the generation leaves its batch), not at GC."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


_DONE = object()


def _next_or_done(iterator: Iterator[Any]) -> Any:
    return next(iterator, _DONE)


async def iterate_in_thread(iterator: Iterator[Any]) -> AsyncIterator[Any]:
    """Drive a blocking iterator from a worker thread, one item per hop.

    If the consumer stops early (cancellation, ``break``), the iterator is closed once its item in
    flight is done, so its ``finally`` blocks (leaving the batch) always run.
    """
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            pending = loop.run_in_executor(None, _next_or_done, iterator)
            item = await asyncio.shield(pending)  # cancelling us must not hide that the thread still runs
            pending = None
            if item is _DONE:
                return
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            if pending is not None and not pending.done():
                pending.add_done_callback(lambda _f: close())
            else:
                close()
