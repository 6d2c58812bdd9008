"""Prompt rendering and tokenization: messages through the chat template, message text kept as data.

A :class:`TemplateProfile` holds what a model's chat template decides (the template in force, tools through
it or the fallback prompt, the tool-call format, the output syntax). :func:`render` turns LangChain messages
and a call's :class:`PromptRequest` into the prompt's token ids with that template (tools, past tool calls
and results, past reasoning), and :func:`tokenize_prompt` makes sure that no text that came from a message
becomes a control token.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jinja2
from jinja2 import nodes
from jinja2.exceptions import TemplateError
from langchain_core.messages import AIMessage, BaseMessage, ToolCall, ToolMessage, convert_to_openai_messages
from langchain_core.messages.tool import tool_call

from .reasoning import (
    DEFAULT_MARKERS,
    ThoughtSpec,
    model_thinks,
    opens_thought,
    reasoning_of,
    template_kwargs,
)
from .tools import FORMATS, HERMES, HERMES_MARKERS, OUTPUT_SYNTAX, RESPONSE_MARKERS, ToolCallStyle, ToolFormat

MESSAGE_ROLES = ("system", "user", "assistant", "tool", "function")
"""Roles a message may have (``ChatMessage.role``); ``developer`` is read as ``system``."""


@dataclass(frozen=True)
class TemplateProfile:
    """What a model's chat template decides, once per loaded tokenizer: the template in force, whether bound
    tools go through it, how the model writes tool calls, and which texts of the output syntax are control text.
    """

    tokenizer: Any
    template: str | None  # the chat_template option, else the tokenizer's (which is never modified)
    model_name: str
    native_tools: bool = False  # tools go to apply_chat_template(tools=...); else the fallback prompt
    tool_format: ToolFormat = HERMES
    syntax: tuple[str, ...] = ()  # tool-call and result markers: kept plain text in messages

    @classmethod
    def of(
        cls,
        tokenizer: Any,
        model_name: str,
        *,
        chat_template: str | None = None,
        tool_prompt: Literal["auto", "template", "fallback"] = "auto",
        tool_call_format: Literal["auto", "hermes", "json"] = "auto",
        seen_format: ToolCallStyle | None = None,
        tool_call_markers: tuple[str, str] | None = None,
    ) -> TemplateProfile:
        """The decisions for ``tokenizer`` under the chat model's options (see their field descriptions).

        ``tool_prompt="auto"``: tools go through the template when it mentions them. ``tool_call_format="auto"``:
        the format a packaged model was seen to write (``seen_format``), else JSON for a template that takes
        tools and never mentions ``<tool_call>``, else Hermes.
        """
        template = chat_template or tokenizer.chat_template
        text = str(template or "")
        native = tool_prompt == "template" if tool_prompt != "auto" else "tools" in text
        style: ToolCallStyle = "hermes"
        if tool_call_format != "auto":
            style = tool_call_format
        elif seen_format is not None:
            style = seen_format
        elif native and HERMES_MARKERS[0] not in text:
            style = "json"
        syntax = (*OUTPUT_SYNTAX, *(tool_call_markers or ()))
        return cls(tokenizer, template, model_name, native, FORMATS[style], syntax)

    def thinks(self, reasoning: bool | None, markers: tuple[str, str] | None = None) -> bool:
        """Whether outputs are split into reasoning and answer (``reasoning``; None: when the tokenizer or the
        template knows the opening marker of ``markers``, the think block's, None for the defaults)."""
        if reasoning is None:
            return model_thinks(self.tokenizer, self.template, (markers or DEFAULT_MARKERS)[0])
        return reasoning

    def render(self, messages: Sequence[BaseMessage], request: PromptRequest) -> tuple[list[int], ThoughtSpec | None]:
        """:func:`render` with this profile."""
        return render(self, messages, request)


@dataclass(frozen=True)
class PromptRequest:
    """One call's inputs to the chat template besides the messages."""

    tools: Sequence[Mapping[str, Any]] | None = None  # OpenAI format
    prefix: str = ""  # the start of the answer, after the generation prompt (a forced tool call)
    variables: Mapping[str, Any] = field(default_factory=dict)  # template variables (template_variables)
    markers: tuple[str, str] | None = None  # the think block's (None: the defaults), control text in any case
    thinks: bool = False  # split the output into reasoning and answer

    @property
    def think_markers(self) -> tuple[str, str]:
        return self.markers or DEFAULT_MARKERS

    @property
    def thought_markers(self) -> tuple[str, str] | None:
        """The markers the engine splits the output at (the ``reasoning_markers`` it gets): None unless it thinks."""
        return self.think_markers if self.thinks else None


def template_variables(reasoning: bool | None, *layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """A call's chat-template variables: ``enable_thinking`` from ``reasoning`` (when set), under ``layers`` (the
    instance's ``chat_template_kwargs``, then the call's), checked against ``apply_chat_template``'s arguments."""
    thinking = {"enable_thinking": reasoning} if reasoning is not None else None
    return template_kwargs(thinking, *layers)


def render(
    profile: TemplateProfile, messages: Sequence[BaseMessage], request: PromptRequest = PromptRequest()
) -> tuple[list[int], ThoughtSpec | None]:
    """The prompt's token ids, and (when ``request.thinks``) how the output splits into reasoning and answer.

    Tools go through the template when ``profile.native_tools`` (``apply_chat_template(tools=...)``); else
    through the fallback prompt of the profile's tool format, with past calls (in that format) and results
    written into the turns. Text that came from the messages never becomes a control token
    (:func:`message_pieces`): neither a special token nor one of the texts the output syntax uses (the think
    markers and ``profile.syntax``: tool-call and result markers) where the tokenizer has it as a token of
    its own without marking it special (``<think>``, ``<tool_call>`` in Qwen).
    """
    tokenizer, template, model_name = profile.tokenizer, profile.template, profile.model_name
    tools, native, tool_format, markers = (
        request.tools,
        profile.native_tools,
        profile.tool_format,
        request.think_markers,
    )
    prefix = request.prefix
    if not messages:
        raise ValueError("messages is empty: give at least one message")
    for message in messages:
        if not isinstance(message, BaseMessage):
            raise TypeError(f"messages must be LangChain BaseMessage objects, got {type(message).__name__}")
    if template is None:
        raise ValueError(
            f"the tokenizer of {model_name!r} has no chat template: pass chat_template='...' (a Jinja "
            "template) to ChatSpecGuard"
        )
    _check_self_contained(template, model_name)
    converted = template_messages(messages)
    if "reasoning_content" not in template:  # past thinking reaches only templates that render it
        converted = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in converted]
    extra: dict[str, Any] = dict(request.variables)
    if tools and native:
        extra["tools"] = list(tools)

    def text_of(conversation: list[dict[str, Any]], generation: bool = True) -> str:
        conversation = render_tool_turns(conversation, native, tool_format)
        if tools and not native:
            block = tool_format.fallback_prompt(tools)
            if conversation and conversation[0]["role"] == "system":
                first = conversation[0]
                conversation = [{**first, "content": f"{first['content']}\n\n{block}".lstrip()}, *conversation[1:]]
            else:
                conversation = [{"role": "system", "content": block}, *conversation]
        try:
            text = tokenizer.apply_chat_template(
                conversation, chat_template=template, add_generation_prompt=generation, tokenize=False, **extra
            )
        except TemplateError as exc:  # e.g. raise_exception("roles must alternate user/assistant")
            raise ValueError(f"the chat template of {model_name!r} rejected the messages: {exc}") from exc
        assert isinstance(text, str)
        return text

    prompt = text_of(converted)
    thought = None
    if request.thinks:
        opened = opens_thought(prompt, text_of(converted, generation=False), markers)
        if opened and prefix:  # a forced start (a tool call) goes after the thinking, which it skips
            prefix, opened = f"{markers[1]}\n\n{prefix}", False
        thought = ThoughtSpec(markers, opened)
    # the output syntax's markers are control text too where they are tokens of their own (Qwen, R1 distills)
    added = tokenizer.get_added_vocab()
    protected = sorted({m for m in (*markers, *profile.syntax) if m in added}, key=len, reverse=True)
    controls = sorted({*control_tokens(tokenizer), *protected}, key=len, reverse=True)
    pieces = message_pieces(prompt, converted, controls, text_of)
    ids = tokenize_prompt(tokenizer, [*pieces, (prefix, False)], protected)
    if not ids:
        raise ValueError("the chat template rendered the messages to an empty prompt")
    return ids, thought


@functools.lru_cache(maxsize=64)
def _loads_templates(template: str) -> list[str]:
    """The statements of ``template`` that load other templates (``include``, ``import``, ``extends``)."""
    try:
        tree = jinja2.Environment().parse(template)
    except TemplateError:
        return []  # a syntax error: apply_chat_template reports it (a ValueError here)
    names = {
        nodes.Include: "include",
        nodes.Import: "import",
        nodes.FromImport: "from-import",
        nodes.Extends: "extends",
    }
    return sorted({names[type(node)] for node in tree.find_all(tuple(names))})


def _check_self_contained(template: str, model_name: str) -> None:
    """Chat templates render without a loader: one that includes, imports or extends another is refused."""
    statements = _loads_templates(template)
    if statements:
        raise ValueError(
            f"the chat template of {model_name!r} loads other templates ({', '.join(statements)}), which chat "
            "templates cannot: give a self-contained template"
        )


def message_pieces(
    prompt: str,
    messages: list[dict[str, Any]],
    controls: Sequence[str],
    text_of: Callable[[list[dict[str, Any]]], str],
) -> list[tuple[str, bool]]:
    """``prompt`` cut into ``(text, from_a_message)`` pieces, message text that holds control text located by
    construction.

    Every string of ``messages`` (contents, reasoning, tool names, argument keys and values, ids...) that
    holds the text of a control token is replaced by a sentinel of its own, the conversation is rendered
    again (``text_of``), and the sentinels' places in that rendering are where the template put those
    strings: the template's own text lies between them. The real ``prompt`` must be that rendering with each
    sentinel replaced by its string as written, trimmed or escaped into JSON (what templates do to message
    text); anything else (a template that transforms or branches on such text) is refused, naming the
    control texts. Message strings without control text stay in the template's pieces, tokenized as usual.
    """
    masked, originals = _masked(messages, controls, prompt)
    if not originals:
        return [(prompt, False)]
    skeleton = text_of(masked)
    parts = re.split("(" + "|".join(re.escape(sentinel) for sentinel in originals) + ")", skeleton)
    pieces: list[tuple[str, bool]] = []
    position = 0
    for k, part in enumerate(parts):
        if k % 2 == 0:  # the template's own text
            located = prompt.startswith(part, position)
            form = part
        else:  # a message's string, in one of the forms templates write it
            following = parts[k + 1]
            form = next(
                (
                    f
                    for f in _forms(originals[part])
                    if prompt.startswith(f, position) and prompt.startswith(following, position + len(f))
                ),
                "",
            )
            located = bool(form)
        if not located:
            break
        pieces.append((form, k % 2 == 1))
        position += len(form)
    else:
        if position == len(prompt):
            return pieces
    found = sorted({c for text in originals.values() for c in controls if c in text})
    raise ValueError(
        f"a message holds control-token text {found} that the chat template transforms, so it cannot be kept "
        "as plain text; remove it from the messages"
    )


def _forms(text: str) -> list[str]:
    """How templates write a message string: as is, trimmed, or escaped inside a JSON string (``tojson``)."""
    forms = [text, text.strip(), text.lstrip(), text.rstrip()]
    forms += [json.dumps(text, ensure_ascii=False)[1:-1], json.dumps(text)[1:-1]]
    return [f for i, f in enumerate(forms) if f and f not in forms[:i]]


def _masked(value: Any, controls: Sequence[str], prompt: str) -> tuple[Any, dict[str, str]]:
    """``value`` (messages) with every string that holds control text replaced by a unique sentinel, and the
    strings by sentinel. Sentinels are digits and punctuation that JSON, trimming and case filters leave as
    they are, with a random part that appears nowhere in ``prompt``."""
    nonce = str(secrets.randbelow(10**16))
    while nonce in prompt:
        nonce = str(secrets.randbelow(10**16))
    originals: dict[str, str] = {}

    def mask(item: Any) -> Any:
        if isinstance(item, str):  # roles are checked names, never control text
            if not any(c in item for c in controls):
                return item
            sentinel = f"#%{nonce}:{len(originals)}%#"
            originals[sentinel] = item
            return sentinel
        if isinstance(item, dict):
            return {mask(k): mask(v) for k, v in item.items()}
        if isinstance(item, list):
            return [mask(v) for v in item]
        return item

    return mask(value), originals


CALL_BLOCKS = ("tool_call", "tool_call_chunk", "invalid_tool_call")
"""The standard content blocks that hold an assistant's tool calls (``output_version="v1"`` writes them)."""


def _role_name(message: BaseMessage) -> str:
    return getattr(message, "role", None) or {"human": "user", "ai": "assistant"}.get(message.type, message.type)


def read_blocks(message: BaseMessage) -> BaseMessage:
    """``message`` with its content blocks read into what a chat template renders: text and tool calls.

    A message's content may be a list of blocks in LangChain's standard form (what ``output_version="v1"``
    writes: ``text``, ``reasoning``, ``tool_call``, ``tool_call_chunk``, ``invalid_tool_call``) or in a
    provider's own form, which ``content_blocks`` translates where it knows the provider. Text blocks become
    the text; an assistant's reasoning is left to :func:`~.reasoning.reasoning_of`; its tool calls join
    ``tool_calls`` (a block whose id is already there is the same call), so a v1 answer sent back renders as
    its v0 twin does. A call that cannot be read (an ``invalid_tool_call``, a ``tool_call_chunk`` whose
    arguments are not a JSON object) is left out, as v0 leaves ``invalid_tool_calls`` out: it was never run.
    A provider's own block stays for LangChain's OpenAI conversion, which reads those it knows (Anthropic's
    ``tool_use`` and ``tool_result``, ...); what is left that is not text is refused by :func:`template_messages`.
    Any other standard block (image, audio, file, video, plain-text file, server tool blocks) is an error naming
    its type, since the models read text alone.
    """
    if not isinstance(message.content, list):
        return message
    who = _role_name(message)
    assistant = isinstance(message, AIMessage)
    content: list[Any] = []
    calls: list[ToolCall] = list(message.tool_calls) if isinstance(message, AIMessage) else []
    known = {call.get("id") for call in calls}
    for block in message.content_blocks:
        kind = block["type"]
        if block["type"] == "text":
            content.append({"type": "text", "text": block["text"]})
        elif block["type"] == "non_standard":
            content.append(block["value"])
        elif assistant and kind == "reasoning":
            continue
        elif assistant and kind in CALL_BLOCKS:
            call = _readable_call(block)
            if call is not None and (call["id"] is None or call["id"] not in known):
                calls.append(call)
                known.add(call["id"])
        else:
            raise ValueError(_unreadable(kind, who))
    update: dict[str, Any] = {"content": content}
    if assistant:
        update["tool_calls"] = calls
    return message.model_copy(update=update)


def _unreadable(kind: str, who: str) -> str:
    if kind == "reasoning" or kind in CALL_BLOCKS:
        return f"a {who} message has a {kind!r} content block: only an AIMessage carries reasoning and tool calls"
    return (
        f"a {who} message has a content block of type {kind!r}: this model reads text only "
        "(the blocks it reads are text, reasoning, tool_call, tool_call_chunk and invalid_tool_call)"
    )


def _readable_call(block: Mapping[str, Any]) -> ToolCall | None:
    """A tool-call block as a call, or None for one that holds no readable call."""
    if block["type"] == "invalid_tool_call" or not isinstance(block.get("name"), str):
        return None
    args = block.get("args")
    if block["type"] == "tool_call_chunk":
        try:
            args = json.loads(args) if isinstance(args, str) and args.strip() else {}
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return tool_call(name=block["name"], args=args, id=block.get("id"))


def template_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """OpenAI-style ``{"role", "content"}`` dicts for the chat template, text only, roles checked.

    Chat templates render whatever role they are given (or fold unknown ones into a user turn), so
    a typo such as ``ChatMessage(role="robot")`` would silently reach the model; it is an error
    here instead. ``developer`` (OpenAI's newer name for ``system``) becomes ``system``, which is
    the role local chat templates know. Content blocks are read by :func:`read_blocks`. An assistant
    message's reasoning (``reasoning_content``, or v1 ``reasoning`` blocks) becomes the
    ``reasoning_content`` key that templates such as Qwen3's read. A ``ToolMessage`` must answer a call of the
    latest ``AIMessage`` before it (:func:`_check_answers_a_call`), and a failed one (``status="error"``) reads as
    an error (:func:`failed_tool_result`).
    """
    for message in messages:
        parts = message.content if isinstance(message.content, list) else []
        who = _role_name(message)
        for part in parts:
            if isinstance(part, dict) and "type" not in part:
                raise ValueError(
                    f"a {who} message has a content part without a 'type' key ({sorted(part)}): "
                    "content parts must be strings or dicts such as {'type': 'text', 'text': '...'}"
                )
            if isinstance(part, dict) and part["type"] == "text" and not isinstance(part.get("text"), str):
                raise TypeError(
                    f"a {who} message has a text part whose 'text' is {type(part.get('text')).__name__}, not str"
                )
    converted: list[dict[str, Any]] = []
    open_calls: list[str | None] | None = None  # the ids of the latest AIMessage's calls (None: no AIMessage yet)
    for original in messages:
        thought = reasoning_of(original)
        openai_messages = convert_to_openai_messages([read_blocks(original)], text_format="string")
        if isinstance(original, AIMessage):
            open_calls = _call_ids(original, openai_messages)
        elif isinstance(original, ToolMessage):
            _check_answers_a_call(original, open_calls)
        for openai_message in openai_messages:
            assert isinstance(openai_message, dict)
            if thought and openai_message.get("role") == "assistant":
                openai_message["reasoning_content"] = thought
            if isinstance(original, ToolMessage) and original.status == "error":
                openai_message["content"] = failed_tool_result(openai_message.get("content"))
            converted.append(openai_message)
    rendered: list[dict[str, Any]] = []
    for message in converted:  # type: ignore[assignment]
        assert isinstance(message, dict)
        role = message.get("role")
        if role == "developer":
            message["role"] = role = "system"
        if role not in MESSAGE_ROLES:
            raise ValueError(
                f"unknown message role {role!r}: the roles are {list(MESSAGE_ROLES)} ('developer' is read as 'system')"
            )
        for call in message.get("tool_calls") or []:  # arguments as the structure templates render (HF convention)
            function = call.get("function", {})
            arguments = function.get("arguments", "{}")
            with contextlib.suppress(ValueError):  # unreadable: keep the raw string, shown, never run
                arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            call["function"] = {**function, "arguments": arguments}
        content = message.get("content")
        if content is None:
            message["content"] = ""
        elif not isinstance(content, str):  # a provider's block that LangChain's conversion did not make text
            kind = next(str(part.get("type", "?")) for part in content if part.get("type") != "text")
            raise ValueError(_unreadable(kind, role))
        else:
            try:
                content.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(
                    f"a {role} message is not valid text: {exc.reason} at character {exc.start} "
                    f"({content[exc.start : exc.end]!r}); lone surrogates cannot be encoded"
                ) from None
        rendered.append(message)
    return rendered


TOOL_ERROR_PREFIX = "Error: "
"""What a failed tool's result (``ToolMessage(status="error")``) starts with in the prompt, unless it says so already:
chat templates have no field for a tool's status, and LangChain's own tool errors read ``Error: ...``."""


def failed_tool_result(content: Any) -> Any:
    """A failed tool's result as the model reads it: marked as an error, once (text that already opens with
    "error", as LangChain's ``ToolNode`` writes its errors, is left as it is)."""
    if not isinstance(content, str) or content.lstrip().lower().startswith("error"):
        return content
    return f"{TOOL_ERROR_PREFIX}{content}"


def _call_ids(message: AIMessage, rendered: Sequence[Any]) -> list[str | None]:
    """The ids of the calls an assistant message made: those the template gets (``rendered``: its OpenAI form, with
    the calls of its content blocks, v1 or a provider's ``tool_use``), and its invalid ones, which the template
    never shows (a result may tell the model why such a call failed)."""
    shown = [call.get("id") for m in rendered if isinstance(m, dict) for call in m.get("tool_calls") or []]
    invalid = [call.get("id") for call in message.invalid_tool_calls]
    invalid += [b.get("id") for b in message.content_blocks if b["type"] == "invalid_tool_call"]
    return list(dict.fromkeys([*shown, *invalid]))


def _check_answers_a_call(message: ToolMessage, open_calls: list[str | None] | None) -> None:
    """Refuse a tool result that answers no call of the latest assistant message, as OpenAI's API does: the model
    would read the result of a call it never made."""
    if open_calls is not None and message.tool_call_id in open_calls:
        return
    if open_calls is None:
        where = "no AIMessage comes before it"
    elif not any(open_calls):
        where = "the latest AIMessage before it made no tool calls"
    else:
        where = f"the latest AIMessage before it called {[i for i in open_calls if i]}"
    raise ValueError(
        f"a ToolMessage answers tool_call_id {message.tool_call_id!r}, but {where}: each ToolMessage must answer a "
        "tool call of the latest AIMessage before it (as OpenAI's API requires)"
    )


def control_tokens(tokenizer: Any) -> list[str]:
    """The special tokens' texts, longest first."""
    found = {str(t) for t in tokenizer.all_special_tokens}
    found |= {tok.content for tok in tokenizer.added_tokens_decoder.values() if tok.special}
    return sorted((t for t in found if t), key=len, reverse=True)


def tokenize_prompt(tokenizer: Any, pieces: Sequence[tuple[str, bool]], protected: Sequence[str] = ()) -> list[int]:
    """Token ids of a prompt given as ``(text, from_a_message)`` pieces, in order.

    The template's own text is tokenized as usual, its markers (``<|im_start|>``, ``<start_of_turn>``...)
    becoming special tokens; text from a message, a tool result or tool arguments is data: tokenized with
    special-token parsing off, so a look-alike of a marker becomes plain text tokens. ``protected`` are
    more such texts that are tokens of their own without being special (``<think>`` in Qwen3): special-token
    parsing does not split those, so each is tokenized in two parts. Consecutive template pieces are
    tokenized together, so a prompt without data pieces gets the tokenizer's own ids.
    """
    ids: list[int] = []
    template = ""
    for text, data in pieces:
        if not data:
            template += text
            continue
        ids += tokenizer(template, add_special_tokens=False)["input_ids"] if template else []
        ids += _data_ids(tokenizer, text, protected)
        template = ""
    ids += tokenizer(template, add_special_tokens=False)["input_ids"] if template else []
    return ids


def _data_ids(tokenizer: Any, text: str, protected: Sequence[str]) -> list[int]:
    """Token ids of message text holding control-token look-alikes, none of which becomes a control token."""
    alternatives = "|".join(re.escape(p) for p in sorted(protected, key=len, reverse=True))
    pieces = re.split(f"({alternatives})", text) if protected else [text]
    parts: list[str] = []
    for i, piece in enumerate(pieces):  # odd pieces are protected texts: split so that no added token matches
        parts += [piece[:1], piece[1:]] if i % 2 else [piece]
    ids: list[int] = []
    for part in filter(None, parts):
        ids += tokenizer(part, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def render_tool_turns(messages: list[dict[str, Any]], native: bool, tool_format: ToolFormat) -> list[dict[str, Any]]:
    """Past tool calls (their arguments already parsed) and results in the shape the chat template can render.

    Templates that take tools get HF's convention (``tool_calls[].function.arguments`` as a dict,
    ``role: tool`` results). The others get the calls written into the assistant's content as the model
    writes them (:meth:`~.tools.ToolFormat.render_calls`: ``<tool_call>`` blocks in the Hermes format) and
    each result as a user turn holding a ``<tool_response>`` block, so a template that only prints
    ``content`` (Gemma's, plain ChatML) still shows them to the model.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        calls = message.get("tool_calls") or []
        if message["role"] == "assistant" and calls:
            structured = [
                {"name": call.get("function", {}).get("name"), "arguments": call.get("function", {}).get("arguments")}
                for call in calls
            ]
            if native:
                message = {
                    **message,
                    "tool_calls": [
                        {"type": "function", "id": c.get("id"), "function": s}
                        for c, s in zip(calls, structured, strict=True)
                    ],
                }
            else:
                text = tool_format.render_calls(message.get("content") or "", structured)
                message = {**{k: v for k, v in message.items() if k != "tool_calls"}, "content": text}
        elif message["role"] == "tool" and not native:
            opening, closing = RESPONSE_MARKERS
            message = {"role": "user", "content": f"{opening}\n{message.get('content', '')}\n{closing}"}
        out.append(message)
    return out
