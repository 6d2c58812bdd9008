"""Prompt rendering and tokenization: messages through the chat template, message text kept as data.

:func:`render` turns LangChain messages into the prompt's token ids with the tokenizer's chat template
(tools through the template or the fallback prompt, past tool calls and results, past reasoning), and
:func:`tokenize_prompt` makes sure that no text that came from a message becomes a control token.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from jinja2.exceptions import TemplateError
from langchain_core.messages import BaseMessage, convert_to_openai_messages

from .reasoning import ThoughtSpec, opens_thought, reasoning_of, without_reasoning
from .tools import fallback_tool_prompt, render_tool_turns

MESSAGE_ROLES = ("system", "user", "assistant", "tool", "function")
"""Roles a message may have (``ChatMessage.role``); ``developer`` is read as ``system``."""


def render(
    tokenizer: Any,
    template: str | None,
    model_name: str,
    messages: Sequence[BaseMessage],
    tools: Sequence[Mapping[str, Any]] | None,
    native: bool,
    prefix: str,
    variables: dict[str, Any],
    markers: tuple[str, str],
    thinks: bool,
) -> tuple[list[int], ThoughtSpec | None]:
    """The prompt's token ids, and (when ``thinks``) how the output splits into reasoning and answer.

    ``native``: the tools go through the template (``apply_chat_template(tools=...)``); else through the
    fallback prompt, with past calls and results written into the turns.
    """
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
    rendered = template_messages(messages)
    if "reasoning_content" not in template:  # past thinking reaches only templates that render it
        rendered = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in rendered]
    rendered = render_tool_turns(rendered, native)
    data = message_strings(rendered)  # what came from messages: text, never control tokens
    extra: dict[str, Any] = dict(variables)
    if tools and native:
        extra["tools"] = list(tools)
    elif tools:
        block = fallback_tool_prompt(tools)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": f"{rendered[0]['content']}\n\n{block}".lstrip()}
        else:
            rendered.insert(0, {"role": "system", "content": block})

    def render(conversation: list[dict[str, Any]], generation: bool = True) -> str:
        try:
            text = tokenizer.apply_chat_template(
                conversation, chat_template=template, add_generation_prompt=generation, tokenize=False, **extra
            )
        except TemplateError as exc:  # e.g. raise_exception("roles must alternate user/assistant")
            raise ValueError(f"the chat template of {model_name!r} rejected the messages: {exc}") from exc
        assert isinstance(text, str)
        return text

    prompt = render(rendered)
    thought = None
    if thinks:
        opened = opens_thought(prompt, render(rendered, generation=False), markers)
        if opened and prefix:  # a forced start (a tool call) goes after the thinking, which it skips
            prefix, opened = f"{markers[1]}\n\n{prefix}", False
        thought = ThoughtSpec(markers, opened)
    # the think markers are control text too where they are tokens of their own (Qwen3, R1 distills)
    protected = [m for m in markers if m in tokenizer.get_added_vocab()]
    ids = tokenize_prompt(tokenizer, prompt + prefix, data, protected)
    controls = sorted({*control_tokens(tokenizer), *protected}, key=len, reverse=True)
    if any(marker in piece for piece in data for marker in controls):
        # safety net for templates that transform message text: the control tokens must be exactly those
        # of the same conversation with the look-alikes removed (the template's own)
        clean_text = render(_without(rendered, controls)) + prefix
        clean = tokenizer(clean_text, add_special_tokens=False)["input_ids"]
        ids_of = {tokenizer.convert_tokens_to_ids(m) for m in controls}
        if Counter(t for t in ids if t in ids_of) != Counter(t for t in clean if t in ids_of):
            raise ValueError(
                "a message holds control-token text that the chat template turned into real control tokens; "
                f"remove {sorted(m for m in controls if any(m in piece for piece in data))} from the messages"
            )
    if not ids:
        raise ValueError("the chat template rendered the messages to an empty prompt")
    return ids, thought


def template_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """OpenAI-style ``{"role", "content"}`` dicts for the chat template, text only, roles checked.

    Chat templates render whatever role they are given (or fold unknown ones into a user turn), so
    a typo such as ``ChatMessage(role="robot")`` would silently reach the model; it is an error
    here instead. ``developer`` (OpenAI's newer name for ``system``) becomes ``system``, which is
    the role local chat templates know. An assistant message's reasoning (``reasoning_content``, or v1
    ``reasoning`` blocks) becomes the ``reasoning_content`` key that templates such as Qwen3's read.
    """
    for message in messages:
        parts = message.content if isinstance(message.content, list) else []
        who = getattr(message, "role", None) or {"human": "user", "ai": "assistant"}.get(message.type, message.type)
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
    for original in messages:
        thought = reasoning_of(original)
        for openai_message in convert_to_openai_messages([without_reasoning(original)], text_format="string"):
            assert isinstance(openai_message, dict)
            if thought and openai_message.get("role") == "assistant":
                openai_message["reasoning_content"] = thought
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
        content = message.get("content")
        if content is None:
            message["content"] = ""
        elif not isinstance(content, str):
            kinds = sorted({str(part.get("type", "?")) for part in content if isinstance(part, dict)})
            raise ValueError(f"a {role} message has content parts of type {kinds}: this model reads text only")
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


def message_strings(messages: list[dict[str, Any]]) -> list[str]:
    """Every string the rendered prompt takes from the messages, in rendering order.

    Past reasoning (for templates that read ``reasoning_content``), message contents, and for templates
    that render tool calls themselves each call's name and each string in its arguments (as JSON writes
    them inside a string).
    """
    strings: list[str] = []
    for message in messages:
        strings.append(str(message.get("reasoning_content") or ""))  # templates render past thinking first
        strings.append(str(message.get("content") or ""))
        for call in message.get("tool_calls") or []:
            function = call.get("function", {})
            strings.append(str(function.get("name") or ""))
            strings += [json.dumps(v, ensure_ascii=False)[1:-1] for v in _strings_in(function.get("arguments"))]
    return [s for s in strings if s]


def _strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings_in(item)


def control_tokens(tokenizer: Any) -> list[str]:
    """The special tokens' texts, longest first."""
    found = {str(t) for t in tokenizer.all_special_tokens}
    found |= {tok.content for tok in tokenizer.added_tokens_decoder.values() if tok.special}
    return sorted((t for t in found if t), key=len, reverse=True)


def _without(value: Any, markers: Sequence[str]) -> Any:
    """``value`` (messages, nested) with every marker text removed from its strings."""
    if isinstance(value, str):
        for marker in markers:
            value = value.replace(marker, "")
        return value
    if isinstance(value, dict):
        return {k: _without(v, markers) for k, v in value.items()}
    if isinstance(value, list):
        return [_without(v, markers) for v in value]
    return value


def tokenize_prompt(tokenizer: Any, text: str, data: Sequence[str], protected: Sequence[str] = ()) -> list[int]:
    """Token ids of a rendered prompt in which text that came from messages can never be a control token.

    The template's own markers (``<|im_start|>``, ``<start_of_turn>``...) are special tokens, but the same
    strings inside a message, a tool result or tool arguments are data: each piece of ``data`` that holds
    one is located in ``text`` (in order) and tokenized with special-token parsing off, so it becomes
    plain text tokens. ``protected`` are more such texts that are tokens of their own without being special
    (``<think>`` in Qwen3): special-token parsing does not split those, so each is tokenized in two parts.
    (A piece the template changed is not found here; :meth:`ChatSpecGuard.render_prompt` then refuses the
    prompt if it holds more control tokens than the template's own.)
    """
    specials = [*control_tokens(tokenizer), *protected]
    spans: list[tuple[int, int]] = []
    cursor = 0
    for piece in data:
        at = text.find(piece, cursor)
        if at < 0 and piece.strip() != piece:  # templates often trim message contents
            piece = piece.strip()
            at = text.find(piece, cursor) if piece else -1
        if at < 0:  # not in the prompt as written (omitted, or transformed: render_prompt checks those)
            continue
        if any(s in piece for s in specials):
            spans.append((at, at + len(piece)))
        cursor = at + len(piece)
    ids: list[int] = []
    position = 0
    for start, end in spans:
        ids += tokenizer(text[position:start], add_special_tokens=False)["input_ids"]
        ids += _data_ids(tokenizer, text[start:end], protected)
        position = end
    ids += tokenizer(text[position:], add_special_tokens=False)["input_ids"]
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
