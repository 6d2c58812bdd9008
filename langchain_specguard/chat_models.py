"""``ChatSpecGuard``: a LangChain chat model over the SpecGuard engine.

The engine (``langchain_specguard.engine``) does the decoding; this layer renders messages with the
tokenizer's chat template, turns verified steps into message chunks, and reports every step's
verification as a ``specguard_step`` custom event so LangSmith traces and ``astream_events`` show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from operator import itemgetter
from typing import Any, Literal, TypeVar

from jinja2.exceptions import TemplateError
from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    convert_to_openai_messages,
    message_chunk_to_message,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import ToolCall, invalid_tool_call, tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableLambda,
    RunnableMap,
    RunnablePassthrough,
    ensure_config,
)
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.utils.utils import LC_ID_PREFIX
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, model_validator
from transformers import PreTrainedModel

from .callbacks import (
    NO_REPORTER,
    STEP_EVENT,
    SUMMARY_EVENT,
    RunCatcher,
    StepReporter,
    TraceSteps,
    langsmith_params,
)
from .engine.decoding import StepEvent, generate_steps, score_layers, summarize, threshold_calibrator
from .engine.loading import ModelPair, context_window, load_embedded_pair, load_pair
from .engine.params import PARAM_FIELDS, SpecGuardParams
from .engine.steps import json_region
from .engine.text import token_bytes
from .reasoning import (
    DEFAULT_MARKERS,
    ThoughtSpec,
    model_thinks,
    opens_thought,
    reasoning_of,
    template_kwargs,
    without_reasoning,
)
from .tools import (
    HERMES_MARKERS,
    ToolCallStyle,
    fallback_tool_prompt,
    inert,
    parse_tool_calls,
    step_validator,
    tools_by_name,
    validate_tool_call,
)

__all__ = ["STEP_EVENT", "SUMMARY_EVENT", "ChatSpecGuard"]

EMBEDDED_DRAFT_LAYERS = 15
MESSAGE_ROLES = ("system", "user", "assistant", "tool", "function")
"""Roles a message may have (``ChatMessage.role``); ``developer`` is read as ``system``."""
_DONE = object()


class ChatSpecGuard(BaseChatModel, SpecGuardParams):
    """Chat model that decodes with SpecGuard step-level speculative decoding on local HF models.

    A small draft proposes each reasoning step, the step is verified with attention grounding and
    log-probability confidence, and the target rewrites rejected steps. With no model given it runs
    the embedded Gemma 3 270M (PyPI ``embedded`` extra) with a self-speculative draft, offline.

    Example:
        .. code-block:: python

            from langchain_specguard import ChatSpecGuard

            llm = ChatSpecGuard(target_model="Qwen/Qwen2.5-7B-Instruct",
                                draft_model="Qwen/Qwen2.5-0.5B-Instruct",
                                acceptance_threshold=0.5)
            llm.invoke("What is 17 * 3? Think step by step.")
    """

    target_model: Any = Field(
        default=None,
        alias="model",
        description="Hub id, local path or loaded PreTrainedModel of the target (also accepted as `model`); "
        "None = embedded Gemma 3 270M.",
    )
    draft_model: Any = Field(default=None, description="Hub id, local path or model object of the draft.")
    draft_layers: int | None = Field(
        default=None, ge=1, description="Draft with the target's first k layers (self-speculative) instead."
    )
    tokenizer: Any = Field(default=None, description="Tokenizer id/path/object; default: the target's.")
    gguf_file: str | None = Field(default=None, description="GGUF file name inside target_model's directory.")
    device: str | None = Field(default=None, description="'cuda', 'cuda:1', 'cpu'...; None = CUDA if available.")
    torch_dtype: str | None = Field(
        default=None, description="'bfloat16', 'float32'...; None = bf16 on GPU, fp32 on CPU."
    )
    device_map: str | dict[str, Any] | None = Field(
        default=None, description="Passed to accelerate for a target sharded over devices, e.g. 'auto'."
    )
    trust_remote_code: bool = False
    chat_template: str | None = Field(default=None, description="Jinja chat template overriding the tokenizer's.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="Extra variables for the chat template, e.g. {'enable_thinking': False} for Qwen3 (also a "
        "per-call argument, merged over this).",
    )
    reasoning: bool | None = Field(
        default=None,
        description="Reasoning models' think blocks (reasoning_markers, default <think>...</think>). True: the model "
        "thinks (the template gets enable_thinking=True) and the thinking goes to "
        "additional_kwargs['reasoning_content'] (a 'reasoning' content block), not content. False: the template "
        "gets enable_thinking=False, and any thinking stays in content as written. None: the template's default, "
        "and the thinking is separated as with True when the tokenizer or template knows the opening marker.",
    )
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    return_step_details: bool = Field(
        default=False,
        description="Also put the list of step events in response_metadata['specguard']['steps'] "
        "(on the last chunk when streaming), so the record survives without callbacks.",
    )
    trace_steps: TraceSteps = Field(
        default="events",
        description="'events': each step is a specguard_step custom event (and an event on the traced run); "
        "'runs': each step is also a child run named specguard_step, so LangSmith shows a tree.",
    )
    tool_call_format: Literal["auto", "hermes", "json"] = Field(
        default="auto",
        description="How the model writes tool calls: 'hermes' (<tool_call>{...}</tool_call>, Qwen/Hermes and "
        'the fallback prompt) or \'json\' (the answer opens with {"name": ..., "parameters": ...} calls, Llama 3). '
        "'auto': 'json' for templates that take tools but never mention <tool_call>, else 'hermes'.",
    )
    # what LangChain code passes to every chat model; a local model has no endpoint, key or retries
    timeout: float | None = Field(
        default=None, gt=0, description="Seconds a call may run; past it the call raises TimeoutError between steps."
    )
    max_retries: int = Field(
        default=0, ge=0, description="Accepted for interface compatibility: local generation is never retried."
    )
    api_key: SecretStr | None = Field(default=None, description="Accepted for interface compatibility: unused.")
    streaming: bool = Field(
        default=False,
        description="Accepted for interface compatibility: invoke always reports each verified step to streaming "
        "callbacks (on_llm_new_token) as it is committed.",
    )
    tool_prompt: Literal["auto", "template", "fallback"] = Field(
        default="auto",
        description="How bound tools reach the prompt: 'template' passes them to apply_chat_template(tools=...); "
        "'fallback' adds a system block describing them and the <tool_call> format, and renders past tool "
        "calls and results as text. 'auto': 'template' when the chat template mentions tools.",
    )

    _pair: ModelPair | None = PrivateAttr(default=None)
    _load_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _generate_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_fields(cls, values: Any) -> Any:
        """A misspelt option (``acceptence_threshold``, ``max_new_tokens``) is an error, not silently dropped."""
        if isinstance(values, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            unknown = sorted(str(k) for k in values if k not in known)
            if unknown:
                raise ValueError(f"unknown option(s) {unknown} for ChatSpecGuard; the options are {sorted(known)}")
        return values

    @model_validator(mode="after")
    def _check_pair_spec(self) -> ChatSpecGuard:
        if self.draft_model is not None and self.draft_layers is not None:
            raise ValueError("give either draft_model or draft_layers, not both")
        if self.target_model is not None and self.draft_model is None and self.draft_layers is None:
            raise ValueError("a target_model needs a draft: set draft_model=... or draft_layers=k")
        if self.target_model is None and self.draft_model is not None:
            raise ValueError(
                "draft_model was given without target_model: name the target too (the embedded default model "
                "drafts with its own first layers, set with draft_layers)"
            )
        self._check_score_layers()
        template_kwargs(self.chat_template_kwargs)
        if self.stop is not None and any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop sequences must be non-empty strings")
        return self

    # ------------------------------------------------------------------------------------------
    # LangChain plumbing

    @property
    def _llm_type(self) -> str:
        return "specguard"

    @property
    def model_name(self) -> str:
        if self.target_model is None:
            return "gemma-3-270m-q4_k_m.gguf"
        if isinstance(self.target_model, str):
            return self.target_model
        return str(getattr(self.target_model, "name_or_path", "") or type(self.target_model).__name__)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Everything that can change the output (LangChain's cache key is built from this)."""
        return {
            "model_name": self.model_name,
            "target": _identity(self.target_model),
            "draft": _identity(self.draft_model),
            "draft_layers": self.draft_layers,
            "tokenizer": _identity(self.tokenizer),
            "gguf_file": self.gguf_file,
            "torch_dtype": self.torch_dtype,
            "device": self.device,
            "chat_template": self.chat_template,
            "chat_template_kwargs": self.chat_template_kwargs,
            "reasoning": self.reasoning,
            "tool_call_format": self.tool_call_format,
            "tool_prompt": self.tool_prompt,
            "return_step_details": self.return_step_details,
            "stop": self.stop,
            **self.engine_params().model_dump(),
        }

    # ------------------------------------------------------------------------------------------
    # token counting and profile (trim_messages, SummarizationMiddleware...)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the pair's own tokenizer (no download, no GPT-2 stand-in)."""
        ids: list[int] = self.load().tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Prompt tokens of ``messages`` as this model would see them: chat template, tools and all."""
        return len(self.render_prompt(messages, _openai_tools(tools) if tools else None))

    @model_validator(mode="after")
    def _share_loaded_pair(self) -> ChatSpecGuard:
        _register(self._loading_key(), self)
        return self

    @model_validator(mode="after")
    def _fill_profile(self) -> ChatSpecGuard:
        if self.profile is None:
            self.profile = _profile(_context_window_of(self.target_model))
        return self

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "specguard"
        params["ls_model_name"] = kwargs.get("model", self.model_name)
        config = self.engine_params(**{k: v for k, v in kwargs.items() if k in PARAM_FIELDS}).model_dump()
        return langsmith_params(params, self.model_name, self._draft_name, {**config, "trace_steps": self.trace_steps})

    @property
    def _draft_name(self) -> str:
        if isinstance(self.draft_model, str):
            return self.draft_model
        if self.draft_model is not None:
            return str(getattr(self.draft_model, "name_or_path", "") or type(self.draft_model).__name__)
        return f"{self.model_name} (first {self.draft_layers or EMBEDDED_DRAFT_LAYERS} layers)"

    # ------------------------------------------------------------------------------------------
    # models, prompt, params

    def load(self) -> ModelPair:
        """The loaded pair (thread-safe, lazy).

        Instances that load the same models with the same loading options (``target_model``,
        ``draft_model``/``draft_layers``, ``tokenizer``, ``gguf_file``, ``device``, ``torch_dtype``,
        ``device_map``, ``trust_remote_code``) share one loaded pair in the process, as the copies that
        ``bind``, ``with_config`` and ``configurable_fields`` make do; decoding options stay per instance.
        The pair is freed when no instance holds it any more.
        """
        if self._pair is not None:
            return self._pair
        with self._load_lock:
            if self._pair is None:
                pair = _shared_pair(self._loading_key(), self._load_pair)
                self._pair = pair
                if self.profile is not None and self.profile.get("max_input_tokens") is None:
                    self.profile = {**self.profile, "max_input_tokens": pair.context_window}
                self._check_score_layers()
        return self._pair

    def _loading_key(self) -> tuple[Any, ...]:
        return (
            _identity(self.target_model),
            _identity(self.draft_model),
            self.draft_layers,
            _identity(self.tokenizer),
            self.gguf_file,
            self.device,
            self.torch_dtype,
            repr(self.device_map),
            self.trust_remote_code,
        )

    def _load_pair(self) -> ModelPair:
        if self.target_model is None:
            return load_embedded_pair(
                draft_layers=self.draft_layers or EMBEDDED_DRAFT_LAYERS, device=self.device, dtype=self.torch_dtype
            )
        return load_pair(
            self.target_model,
            self.draft_model,
            draft_layers=self.draft_layers,
            tokenizer=self.tokenizer,
            device=self.device,
            dtype=self.torch_dtype,
            device_map=self.device_map,
            gguf_file=self.gguf_file,
            trust_remote_code=self.trust_remote_code,
        )

    def engine_params(self, **overrides: Any) -> SpecGuardParams:
        """This model's decoding parameters with per-call overrides, validated."""
        unknown = sorted(set(overrides) - set(PARAM_FIELDS))
        if unknown:
            raise TypeError(
                f"unexpected keyword argument(s) {unknown}; "
                f"per-call options are the decoding fields {list(PARAM_FIELDS)}"
            )
        values = {name: getattr(self, name) for name in PARAM_FIELDS}
        values.update(overrides)
        return SpecGuardParams(**values)

    def _check_score_layers(self) -> None:
        """``score_layers`` against the model that computes the signals, as soon as that model is known."""
        if self.score_layers is None:
            return
        model = self.target_model if self.signal_source == "target" else self.draft_model
        if self._pair is not None:
            model = self._pair.target if self.signal_source == "target" else self._pair.draft
        if isinstance(model, PreTrainedModel):
            score_layers(model, self.score_layers)

    @property
    def template(self) -> str | None:
        """The chat template in force: ``chat_template`` if given, else the tokenizer's (never modified)."""
        return self.chat_template or self.load().tokenizer.chat_template

    def template_takes_tools(self) -> bool:
        """Whether bound tools go through the chat template (else the documented fallback prompt)."""
        if self.tool_prompt != "auto":
            return self.tool_prompt == "template"
        return "tools" in str(self.template or "")

    def tool_style(self) -> ToolCallStyle:
        """The tool-call format this model's output is parsed in (see ``tool_call_format``)."""
        if self.tool_call_format != "auto":
            return self.tool_call_format
        template = str(self.template or "")
        if self.template_takes_tools() and HERMES_MARKERS[0] not in template:
            return "json"
        return "hermes"

    def render_prompt(
        self,
        messages: Sequence[BaseMessage],
        tools: Sequence[dict[str, Any]] | None = None,
        prefix: str = "",
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of ``messages`` through the tokenizer's chat template, ready for the assistant turn.

        ``tools`` (OpenAI format) go to ``apply_chat_template(tools=...)`` when the template takes
        them; otherwise a system block describes them (:func:`~langchain_specguard.tools.fallback_tool_prompt`)
        and past tool calls and ``ToolMessage`` results are written into the turns as
        ``<tool_call>``/``<tool_response>`` text, so templates that know only ``content`` keep them.
        ``prefix`` is appended after the generation prompt (the start of the answer; a think block the
        generation prompt opened is closed before it). ``chat_template_kwargs`` are template variables for
        this call, over the instance's (``reasoning`` sets ``enable_thinking`` under both). The reasoning of
        past assistant messages reaches templates that read ``reasoning_content``, and no others.
        """
        markers = self.reasoning_markers or DEFAULT_MARKERS
        variables = self._template_variables(self.reasoning, chat_template_kwargs)
        return self._render(messages, tools, prefix, variables, markers, self._thinks(self.reasoning, markers))[0]

    def _thinks(self, reasoning: bool | None, markers: tuple[str, str]) -> bool:
        """Whether outputs are split into reasoning and answer (see ``reasoning``)."""
        if reasoning is None:
            return model_thinks(self.load().tokenizer, self.template, markers[0])
        return reasoning

    def _template_variables(self, reasoning: bool | None, per_call: Mapping[str, Any] | None) -> dict[str, Any]:
        thinking = {"enable_thinking": reasoning} if reasoning is not None else None
        return template_kwargs(thinking, self.chat_template_kwargs, per_call)

    def _render(
        self,
        messages: Sequence[BaseMessage],
        tools: Sequence[dict[str, Any]] | None,
        prefix: str,
        variables: dict[str, Any],
        markers: tuple[str, str],
        thinks: bool,
    ) -> tuple[list[int], ThoughtSpec | None]:
        """The prompt's token ids, and (when ``thinks``) how the output splits into reasoning and answer."""
        if not messages:
            raise ValueError("messages is empty: give at least one message")
        for message in messages:
            if not isinstance(message, BaseMessage):
                raise TypeError(f"messages must be LangChain BaseMessage objects, got {type(message).__name__}")
        pair = self.load()
        tokenizer = pair.tokenizer
        template = self.template
        if template is None:
            raise ValueError(
                f"the tokenizer of {self.model_name!r} has no chat template: pass chat_template='...' (a Jinja "
                "template) to ChatSpecGuard"
            )
        rendered = _template_messages(messages)
        if "reasoning_content" not in template:  # past thinking reaches only templates that render it
            rendered = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in rendered]
        native = self.template_takes_tools()
        rendered = _render_tool_turns(rendered, native)
        data = _message_strings(rendered)  # what came from messages: text, never control tokens
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
                raise ValueError(f"the chat template of {self.model_name!r} rejected the messages: {exc}") from exc
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
        controls = sorted({*_control_tokens(tokenizer), *protected}, key=len, reverse=True)
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

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> _Call:
        if isinstance(stop, str):  # would otherwise stop at each of its characters
            raise TypeError(f"stop must be a list of strings, e.g. stop=[{stop!r}], not a str")
        if stop is not None and not isinstance(stop, (list, tuple)):
            raise TypeError(f"stop must be a list of strings, got {type(stop).__name__}")
        kwargs = dict(kwargs)
        tools: list[dict[str, Any]] | None = kwargs.pop("tools", None)
        tool_choice = kwargs.pop("tool_choice", None)
        parallel = _tool_flag("parallel_tool_calls", kwargs.pop("parallel_tool_calls", None))
        _tool_flag("strict", kwargs.pop("strict", None))  # calls are always schema-checked (see bind_tools)
        kwargs.pop("ls_structured_output_format", None)
        reasoning = kwargs.pop("reasoning", self.reasoning)
        if reasoning is not None and not isinstance(reasoning, bool):
            raise TypeError(f"reasoning must be True, False or None, got {reasoning!r}")
        variables = self._template_variables(reasoning, kwargs.pop("chat_template_kwargs", None))
        stops = [*(self.stop or []), *(stop or [])]
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop sequences must be non-empty strings, got {stops!r}")
        pair = self.load()
        setup = _ToolSetup()
        if tools is not None or tool_choice is not None:  # per-call tools get the checks bind_tools makes
            formatted = _openai_tools(tools or [])
            tool_choice = _checked_tool_choice(tool_choice, formatted)
            tools = formatted
        if tools and tool_choice != "none":
            setup = self._tool_setup(tools, tool_choice)
            setup.single_call = parallel is False
            if setup.markers is not None:
                kwargs.setdefault("tool_call_markers", setup.markers)
            elif kwargs.get("tool_call_markers", self.tool_call_markers) is None:
                kwargs.setdefault("json_tool_calls", True)  # each JSON call is a checked step, as marker calls are
            else:
                setup.validate = None  # JSON-style output read between the caller's own markers: checked at the end
        params = self.engine_params(**kwargs)
        markers = params.reasoning_markers or DEFAULT_MARKERS
        thinks = self._thinks(reasoning, markers)
        params = params.model_copy(update={"reasoning_markers": markers if thinks else None})
        prompt, thought = self._render(messages, setup.tools, setup.prefix, variables, markers, thinks)
        return _Call(pair, prompt, params, stops, replace(setup, thought=thought))

    def _tool_setup(self, tools: list[dict[str, Any]], tool_choice: Any) -> _ToolSetup:
        """Format, step markers, validator and forced answer start for one call with tools bound."""
        style = self.tool_style()
        markers = HERMES_MARKERS if style == "hermes" else None
        name = _forced_tool_name(tool_choice)
        prefix = ""
        if style == "hermes" and (name or tool_choice in ("any", "required", True)):
            # forcing a call: the answer starts inside a <tool_call> block (and names the tool)
            prefix = HERMES_MARKERS[0] + "\n" + (f'{{"name": {json.dumps(name)}, "arguments": ' if name else "")
        elif style == "json" and name:
            prefix = f'{{"name": {json.dumps(name)}, "parameters": '
        elif style == "json" and tool_choice in ("any", "required", True):
            prefix = '{"name": "'  # the answer is a call; the model names the tool
        validate = step_validator(tools, style)
        return _ToolSetup(tools=tools, style=style, markers=markers, validate=validate, prefix=prefix)

    def _locked_steps(self, call: _Call) -> Iterator[StepEvent]:
        """Steps of one generation; the models run one step at a time per instance.

        The lock is held while a step is computed, never across a ``yield``: a caller that pauses a
        stream (or a callback that calls the model again) would otherwise block every other call on
        the instance, its own thread included, forever. Each generation owns its caches and sampling
        generator, so interleaved generations give the same output as sequential ones; the price is
        that memory grows with the number of generations in flight (one KV cache pair each).
        """
        setup = call.setup
        thinking = setup.thought is not None and setup.thought.opened
        steps = generate_steps(
            call.pair, call.prompt, call.params, call.stops, setup.validate, setup.prefix, setup.single_call, thinking
        )
        started = time.monotonic()
        try:
            while True:
                if self.timeout is not None and time.monotonic() - started > self.timeout:
                    raise TimeoutError(f"the call ran past its timeout of {self.timeout} s")
                with self._generate_lock:
                    event = next(steps, None)
                if event is None:
                    return
                yield event
        finally:
            getattr(steps, "close", lambda: None)()  # a generator: runs its cleanup now, not at GC

    # ------------------------------------------------------------------------------------------
    # tools

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (LangChain tools, pydantic models, TypedDicts, functions or OpenAI dicts).

        ``tool_choice``: None/"auto" lets the model decide; "none" hides the tools; "any"/"required"/
        True forces some call; a tool name (or ``{"type": "function", "function": {"name": ...}}``)
        forces that tool. A call is forced by starting the answer inside the call (``<tool_call>``
        and, for a named tool, its name), which the model then completes.

        ``parallel_tool_calls=False``: at most one call per answer. The answer ends with its first
        complete call; where calls are not steps (``tool_call_format="json"``, whose answer may be a
        list of calls) any call after the first goes to ``invalid_tool_calls``, never run.
        ``strict``: calls are always checked against their tool's JSON schema (a draft call that breaks
        it is rejected and written by the target; a final call that breaks it is an ``invalid_tool_call``),
        so ``strict=True`` is what happens anyway and ``False`` does not turn the check off.
        Other keywords must be decoding fields (``temperature=0.2``), checked here.
        """
        formatted = _openai_tools(tools)
        tool_choice = _checked_tool_choice(tool_choice, formatted)
        flags = {"parallel_tool_calls": parallel_tool_calls, "strict": strict}
        for name, value in flags.items():
            _tool_flag(name, value)
        unknown = sorted(set(kwargs) - set(PARAM_FIELDS) - {"stop", "ls_structured_output_format"})
        if unknown:
            raise TypeError(
                f"unexpected keyword argument(s) {unknown} for bind_tools; it takes tool_choice, parallel_tool_calls, "
                f"strict, stop and the decoding fields {list(PARAM_FIELDS)}"
            )
        self.engine_params(**{k: v for k, v in kwargs.items() if k in PARAM_FIELDS})  # bad values fail here
        bound = {name: value for name, value in flags.items() if value is not None}
        return super().bind(tools=formatted, tool_choice=tool_choice, **bound, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Structured output through a forced call of the schema's own tool (pydantic, TypedDict or JSON schema).

        Every ``method`` answers the same way: the schema is bound as the only tool and the answer starts
        inside a call that names it, so the model writes the arguments, which are checked against the
        schema step by step. The parsed object is validated once more; when the model wrote no usable
        call, the error says why (``parsing_error`` with ``include_raw=True``, else an
        ``OutputParserException``), never a silent ``None``. ``json_mode`` needs a schema here too.
        """
        if method not in ("function_calling", "json_schema", "json_mode"):
            raise ValueError(f"unknown method {method!r}; use 'function_calling', 'json_schema' or 'json_mode'")
        if schema is None:
            raise ValueError("with_structured_output needs a schema (pydantic model, TypedDict or JSON schema)")
        strict = kwargs.pop("strict", None)
        if kwargs:
            raise ValueError(f"unsupported arguments {sorted(kwargs)}")
        name = _openai_tools([schema])[0]["function"]["name"]
        llm = self.bind_tools(
            [schema],
            tool_choice=name,
            parallel_tool_calls=False,  # the answer is one call: generation ends with it
            strict=strict,
            ls_structured_output_format={"kwargs": {"method": method}, "schema": schema},
        )
        parser = RunnableLambda(_structured_parser(schema, name), name="specguard_structured_output")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")

    def calibrate(self, inputs: Sequence[LanguageModelInput], **kwargs: Any) -> float:
        """Run ``inputs`` with ``acceptance_threshold="auto"`` and return the threshold they settle on.

        "auto" learns from the target's verification of every step (``engine/calibration.py``); this
        feeds it prompts like the ones you will send, up front. What it learns stays with the loaded
        pair, so every "auto" call of this pair starts from it; to fix it instead, pass the returned
        value as ``acceptance_threshold``. ``kwargs`` are per-call options for these runs.
        """
        if isinstance(inputs, (str, BaseMessage)) or not inputs:
            raise ValueError("calibrate needs a non-empty list of inputs (prompts or message lists)")
        options = {**kwargs, "acceptance_threshold": "auto"}
        for item in inputs:
            self.invoke(item, **options)
        calibrator = threshold_calibrator(self.load(), self.engine_params(**options))
        assert calibrator is not None
        return calibrator.threshold()

    def _message_fields(self, text: str, setup: _ToolSetup) -> tuple[str, dict[str, Any]]:
        """Content and tool-call fields of the final message for ``text`` (the generated answer).

        A call that parses but does not fit the bound tools (unknown name, arguments against the schema),
        whoever wrote it, is an ``invalid_tool_call`` with the reason, never a call an agent would run.
        """
        if setup.tools is None:
            return text, {}
        parsed = parse_tool_calls(setup.prefix + text, setup.style)
        schemas = tools_by_name(setup.tools)
        calls: list[ToolCall] = []
        invalid = list(parsed.invalid_tool_calls)
        for call in parsed.tool_calls:
            reason = validate_tool_call(call, schemas)
            if reason is None and setup.single_call and calls:
                reason = "parallel_tool_calls=False allows one call per answer: this one was not made"
            if reason is None:
                calls.append(call)
            else:
                invalid.append(
                    invalid_tool_call(name=call["name"], args=json.dumps(call["args"]), id=call.get("id"), error=reason)
                )
        # an invalid call's arguments are kept as a JSON string, never an object: see tools.inert_args
        return parsed.content, {"tool_calls": calls, "invalid_tool_calls": [inert(bad) for bad in invalid]}

    def _final_metadata(self, pair: ModelPair, prompt: list[int], steps: list[StepEvent]) -> dict[str, Any]:
        seconds = sum(s.seconds for s in steps)
        summary = summarize(steps, seconds, len(prompt))
        if self.return_step_details:
            summary["steps"] = [s.to_dict() for s in steps]
        metadata = {
            "model_name": pair.name,
            "model_provider": "specguard",
            "finish_reason": (steps[-1].finish_reason if steps else None) or "length",
            "specguard": summary,
        }
        if steps and steps[0].logprobs is not None:
            metadata["logprobs"] = {"content": [e for s in steps for e in _openai_logprobs(pair.tokenizer, s)]}
        return metadata

    @staticmethod
    def _usage(prompt: list[int], steps: list[StepEvent]) -> UsageMetadata:
        out = sum(s.num_tokens for s in steps)
        usage: UsageMetadata = {"input_tokens": len(prompt), "output_tokens": out, "total_tokens": len(prompt) + out}
        thinking = sum(s.num_tokens for s in steps if s.kind == "reasoning")
        if thinking:
            usage["output_token_details"] = {"reasoning": thinking}
        return usage

    # ------------------------------------------------------------------------------------------
    # one step-to-chunk path: ``_stream`` is it, ``_generate`` aggregates it, async drives the same generator

    def _chunks(
        self, call: _Call, events: Iterable[StepEvent], message_id: str | None
    ) -> Generator[ChatGenerationChunk, None, None]:
        """The call's chunks: one per step as it is verified, then the last chunk, derived from the final message.

        Every path reads this generator, so the chunks of ``stream``, the chunks that ``invoke`` hands to
        streaming callbacks and the message ``invoke`` returns (their sum, :func:`_aggregate`) cannot differ.
        """
        steps: list[StepEvent] = []
        shown = _ShownContent(call.setup)
        for event in events:
            steps.append(event)
            yield _step_chunk(shown.add(event.text), call.pair, event, message_id)
        yield _last_chunk(self._final_message(call, steps), shown, message_id)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        emitter = self._reporter(run_manager)
        call = self._prepare(messages, stop, kwargs)
        events = emitter.steps(self._locked_steps(call))
        try:
            for chunk in self._chunks(call, events, _message_id(run_manager)):
                if _is_last(chunk):
                    emitter.summary(chunk.message.response_metadata["specguard"])
                yield chunk
        finally:
            _close(events)  # a stream stopped early releases the generation lock now, not at GC

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks: list[ChatGenerationChunk] = []
        for chunk in self._stream(messages, stop, run_manager, **kwargs):
            if run_manager is not None and _carries_something(chunk):
                run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
            chunks.append(chunk)
        return _aggregate(chunks)

    # async: the decoding runs in a worker thread, one step per hop, so the event loop stays free

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        emitter = self._reporter(run_manager)
        call = await asyncio.to_thread(self._prepare, messages, stop, kwargs)
        message_id = _message_id(run_manager)
        events = emitter.asteps(_iterate_in_thread(self._locked_steps(call)))
        async with contextlib.aclosing(_drive(lambda steps: self._chunks(call, steps, message_id), events)) as chunks:
            async for chunk in chunks:
                if _is_last(chunk):
                    await emitter.asummary(chunk.message.response_metadata["specguard"])
                yield chunk

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks: list[ChatGenerationChunk] = []
        async for chunk in self._astream(messages, stop, run_manager, **kwargs):
            if run_manager is not None and _carries_something(chunk):
                await run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
            chunks.append(chunk)
        return _aggregate(chunks)

    def _final_message(self, call: _Call, steps: list[StepEvent]) -> AIMessage:
        metadata = self._final_metadata(call.pair, call.prompt, steps)
        text = "".join(s.text for s in steps)
        setup = call.setup
        reasoning, answer = setup.thought.split(text) if setup.thought is not None else ("", text)
        content, calls = self._message_fields(answer, setup)
        if calls.get("tool_calls") and metadata["finish_reason"] == "stop":
            metadata["finish_reason"] = "tool_calls"
        return AIMessage(
            content=content,
            additional_kwargs={"reasoning_content": reasoning} if reasoning else {},
            response_metadata=metadata,
            usage_metadata=self._usage(call.prompt, steps),
            **calls,
        )

    # ------------------------------------------------------------------------------------------
    # step events while streaming
    #
    # langchain-core's ``stream``/``astream`` open the chat-model run but do not hand its run manager
    # to ``_stream``/``_astream``. To attribute step events to that run, these overrides configure
    # the callback manager once themselves (so LangChain reuses the same handler objects, tracer
    # included), add a handler that learns the run id at ``on_chat_model_start``, and leave the
    # emitter in a context variable that ``_stream``/``_astream`` read when they start.

    def _should_stream(
        self,
        *,
        async_api: bool,
        run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> bool:
        if run_manager is not None:
            # invoke/ainvoke: _generate/_agenerate hold the run manager, emit the step events and
            # report each step to streaming handlers through on_llm_new_token themselves.
            return False
        return super()._should_stream(async_api=async_api, **kwargs)

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        config, emitter = self._streaming_config(config, CallbackManager)
        token = _STREAM_EMITTER.set(emitter)
        try:
            yield from super().stream(input, config, stop=stop, **kwargs)
        finally:
            with contextlib.suppress(ValueError):  # resumed from another context: nothing to restore
                _STREAM_EMITTER.reset(token)

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        config, emitter = self._streaming_config(config, AsyncCallbackManager)
        token = _STREAM_EMITTER.set(emitter)
        try:
            async for chunk in super().astream(input, config, stop=stop, **kwargs):
                yield chunk
        finally:
            with contextlib.suppress(ValueError):
                _STREAM_EMITTER.reset(token)

    def _reporter(self, run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None) -> StepReporter:
        if run_manager is not None:
            return StepReporter.for_run(run_manager, self.trace_steps)
        return _STREAM_EMITTER.get() or NO_REPORTER

    def _streaming_config(
        self, config: RunnableConfig | None, manager_class: type[CallbackManager] | type[AsyncCallbackManager]
    ) -> tuple[RunnableConfig, StepReporter]:
        config = ensure_config(config)
        manager = manager_class.configure(
            config.get("callbacks"),
            self.callbacks,
            self.verbose,
            config.get("tags"),
            self.tags,
            config.get("metadata"),
            self.metadata,
        )
        catcher = RunCatcher()
        manager.add_handler(catcher, inherit=False)
        reporter = StepReporter(
            manager.handlers,
            catcher,
            manager.tags,
            manager.metadata,
            self.trace_steps,
            manager.inheritable_tags,
            manager.inheritable_metadata,
        )
        return {**config, "callbacks": manager}, reporter


@dataclass
class _ToolSetup:
    """Everything one call needs to know about its bound tools (empty when none are bound), and its think block."""

    tools: list[dict[str, Any]] | None = None
    style: ToolCallStyle = "hermes"
    markers: tuple[str, str] | None = None
    validate: Callable[[str], str | None] | None = None
    prefix: str = ""
    single_call: bool = False  # parallel_tool_calls=False: the answer ends with its first call
    thought: ThoughtSpec | None = None  # set when the output is split into reasoning and answer


@dataclass
class _Call:
    """One call, prepared: the loaded pair, the prompt's token ids, the decoding parameters, stops and tools."""

    pair: ModelPair
    prompt: list[int]
    params: SpecGuardParams
    stops: list[str]
    setup: _ToolSetup


@dataclass
class _ShownContent:
    """Streams the message content step by step, holding tool-call text back.

    The content shown so far is always a prefix of the final ``AIMessage.content`` that
    ``invoke`` returns: text inside an open or finished ``<tool_call>`` block (or an answer that may
    be a bare-JSON call) is held, and the calls arrive as ``tool_call_chunks`` in the last chunk.
    A reasoning model's thinking goes out as ``reasoning_content`` instead of content, under the same
    rule (:meth:`~langchain_specguard.reasoning.ThoughtSpec.split` holds back a marker still incomplete).
    """

    setup: _ToolSetup
    text: str = ""
    sent: str = ""
    reasoning: str = ""  # the reasoning sent so far

    def add(self, step_text: str) -> AIMessageChunk:
        """The chunk for one more step of text: what it adds to the reasoning and to the content shown."""
        self.text += step_text
        thought = self.setup.thought
        reasoning, answer = thought.split(self.text, final=False) if thought is not None else ("", self.text)
        thinking = _growth(self.reasoning, reasoning)
        self.reasoning += thinking
        visible = answer if self.setup.tools is None else _visible_content(self.setup.prefix + answer, self.setup.style)
        delta = _growth(self.sent, visible)
        self.sent += delta
        return AIMessageChunk(content=delta, additional_kwargs={"reasoning_content": thinking} if thinking else {})


def _growth(shown: str, now: str) -> str:
    """What ``now`` adds to ``shown``; nothing if it does not extend it (shown text is never taken back)."""
    return now[len(shown) :] if now.startswith(shown) else ""


def _message_id(run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None) -> str | None:
    """The id of the run's message, which its chunks and the final message share (LangGraph's
    ``stream_mode="messages"`` recognises the final message by it). Without a run manager (``stream``),
    langchain-core gives the chunks the run's id itself."""
    return f"{LC_ID_PREFIX}-{run_manager.run_id}" if run_manager is not None else None


def _step_chunk(
    delta: AIMessageChunk, pair: ModelPair, event: StepEvent, message_id: str | None
) -> ChatGenerationChunk:
    """A step's message chunk; with ``logprobs`` it carries the step's entries, which chunk addition
    concatenates into the final message's list."""
    if event.logprobs is not None:
        delta.response_metadata = {"logprobs": {"content": _openai_logprobs(pair.tokenizer, event)}}
    delta.id = message_id
    return ChatGenerationChunk(message=delta)


def _last_chunk(final: AIMessage, shown: _ShownContent, message_id: str | None) -> ChatGenerationChunk:
    """The closing chunk of ``final``: usage, summary, any content or reasoning held back, the tool calls.

    Valid calls go out as ``tool_call_chunks`` whose arguments are their JSON; invalid calls too, with the
    arguments ``final`` gives them (a JSON string, :func:`~langchain_specguard.tools.inert_args`), which
    chunk addition reads as no object, so a sum of chunks keeps them invalid. Chunk addition cannot carry
    an invalid call's ``error``: this chunk keeps the errors in its own ``invalid_tool_calls``, where
    :func:`_aggregate` finds them.
    """
    rest = _growth(shown.sent, str(final.content))
    thinking = _growth(shown.reasoning, str(final.additional_kwargs.get("reasoning_content", "")))
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


def _is_last(chunk: ChatGenerationChunk) -> bool:
    return getattr(chunk.message, "chunk_position", None) == "last"


def _carries_something(chunk: ChatGenerationChunk) -> bool:
    """Whether a chunk is worth a streaming callback: a step that adds text, reasoning or log-probabilities
    (a step of held-back tool-call text adds nothing), and always the last chunk."""
    message = chunk.message
    return bool(message.content or message.additional_kwargs or message.response_metadata) or _is_last(chunk)


def _aggregate(chunks: Sequence[ChatGenerationChunk]) -> ChatResult:
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


def _openai_logprobs(tokenizer: Any, event: StepEvent) -> list[dict[str, Any]]:
    """The step's token log-probabilities in ChatOpenAI's shape: ``token``, ``bytes``, ``logprob``, ``top_logprobs``."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(tokenizer, token)
        return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw), "logprob": logprob}

    return [
        {**entry(item.token, item.logprob), "top_logprobs": [entry(t, lp) for t, lp in item.top]}
        for item in event.logprobs or []
    ]


def _tool_flag(name: str, value: Any) -> bool | None:
    """``parallel_tool_calls``/``strict`` checked: a bool or None, never silently a truthy string."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be True, False or None, got {value!r}")
    return value


def _visible_content(text: str, style: ToolCallStyle) -> str:
    """Content of a partial answer that is certain not to belong to a tool call.

    An end that could still grow into an opening marker (``ab<tool_``) is held back too, so what is
    streamed is always a prefix of the final content.
    """
    if style == "json":  # the calls open the answer: what follows them is content once they are over
        region = json_region(text)
        return "" if region.growing else text[region.content :]
    content = parse_tool_calls(text, "hermes").content
    opening = HERMES_MARKERS[0]
    for size in range(min(len(opening) - 1, len(content)), 0, -1):
        if content.endswith(opening[:size]):
            return content[:-size]
    return content


@dataclass
class _SharedPair:
    """A loaded pair and how many live instances have its loading options (loaded or not yet)."""

    instances: int = 0
    pair: ModelPair | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_PAIRS: dict[tuple[Any, ...], _SharedPair] = {}
_PAIRS_LOCK = threading.Lock()


def _register(key: tuple[Any, ...], instance: Any) -> None:
    """Count ``instance`` as a holder of ``key``'s pair until it is garbage-collected."""
    with _PAIRS_LOCK:
        _PAIRS.setdefault(key, _SharedPair()).instances += 1
    weakref.finalize(instance, _release, key)


def _release(key: tuple[Any, ...]) -> None:
    with _PAIRS_LOCK:
        entry = _PAIRS.get(key)
        if entry is not None:
            entry.instances -= 1
            if entry.instances <= 0:
                del _PAIRS[key]  # the last instance is gone: the pair (weights, caches, graphs) can be freed


def _shared_pair(key: tuple[Any, ...], load: Callable[[], ModelPair]) -> ModelPair:
    """The process's pair for ``key``, loaded once while any instance with these loading options lives."""
    with _PAIRS_LOCK:
        entry = _PAIRS.setdefault(key, _SharedPair())
    with entry.lock:  # one load per key at a time; other keys load in parallel
        if entry.pair is None:
            entry.pair = load()
        return entry.pair


EMBEDDED_CONTEXT_WINDOW = 32768
"""Gemma 3 270M's context window (the embedded default); checked against the loaded model in the tests."""


def _identity(value: Any) -> Any:
    """A model, tokenizer or path as it enters the cache key: the path, or the object's class, origin and id."""
    if value is None or isinstance(value, (str, int)):
        return value
    return f"{type(value).__name__}:{getattr(value, 'name_or_path', '')}:{id(value)}"


def _context_window_of(spec: Any) -> int | None:
    """The target's context window when it is known without loading weights (object, local config, embedded)."""
    if spec is None:
        return EMBEDDED_CONTEXT_WINDOW
    if isinstance(spec, PreTrainedModel):
        return context_window(spec)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(spec), local_files_only=True)
    except (OSError, ValueError):
        return None  # not local: filled in when the model loads
    window = config.get_text_config().max_position_embeddings if hasattr(config, "get_text_config") else None
    return int(window) if isinstance(window, int) else None


def _profile(max_input_tokens: int | None) -> ModelProfile:
    """What profile-driven LangChain code (e.g. SummarizationMiddleware) needs to know about this model."""
    return ModelProfile(
        max_input_tokens=max_input_tokens,  # type: ignore[typeddict-item]
        open_weights=True,
        text_inputs=True,
        image_inputs=False,
        audio_inputs=False,
        video_inputs=False,
        pdf_inputs=False,
        text_outputs=True,
        tool_calling=True,
        tool_choice=True,
        tool_call_streaming=True,
        structured_output=True,
    )


TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""What OpenAI accepts as a function name; anything else (markup, quotes) could leak into the prompt."""


def _openai_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    formatted = [convert_to_openai_tool(tool) for tool in tools]
    for tool in formatted:
        name = tool["function"]["name"]
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise ValueError(
                f"tool name {name!r} is not allowed: tool names are 1 to 64 letters, digits, '_' or '-' "
                "(the OpenAI function-name rule)"
            )
    return formatted


def _checked_tool_choice(tool_choice: Any, tools: list[dict[str, Any]]) -> Any:
    """``tool_choice`` checked against the tools it applies to (False means no preference)."""
    names = [tool["function"]["name"] for tool in tools]
    if isinstance(tool_choice, dict) and not isinstance(tool_choice.get("function", {}), dict):
        raise ValueError(
            f"tool_choice {tool_choice!r} is malformed: use {{'type': 'function', 'function': {{'name': ...}}}}"
        )
    forced = _forced_tool_name(tool_choice)
    if forced is not None and forced not in names:
        raise ValueError(f"tool_choice names {forced!r}, which is not among the bound tools {names}")
    if tool_choice not in (None, "auto", "none", "any", "required", True, False) and forced is None:
        raise ValueError(f"unsupported tool_choice {tool_choice!r}")
    if tool_choice in ("any", "required", True) and not names:
        raise ValueError(f"tool_choice={tool_choice!r} forces a tool call, but no tools are bound")
    return None if tool_choice is False else tool_choice


def _structured_parser(schema: Any, name: str) -> Callable[[AIMessage], Any]:
    """The parser of a structured answer: the named call's arguments, validated into ``schema``."""
    model_class = schema if isinstance(schema, type) and issubclass(schema, BaseModel) else None

    def parse(message: AIMessage) -> Any:
        calls = [c for c in message.tool_calls if c["name"] == name]
        if not calls:
            reasons = [str(c.get("error")) for c in message.invalid_tool_calls if c.get("error")]
            why = "; ".join(reasons) or "it wrote no call"
            raise OutputParserException(
                f"the model wrote no valid {name!r} call: {why}", llm_output=str(message.content)
            )
        args = calls[0]["args"]
        if model_class is None:
            return args
        try:
            return model_class.model_validate(args)
        except ValidationError as exc:
            raise OutputParserException(f"the {name!r} call does not fit the schema: {exc}") from exc

    return parse


def _forced_tool_name(tool_choice: Any) -> str | None:
    """The tool a ``tool_choice`` forces by name, if it names one."""
    if isinstance(tool_choice, dict):
        name = tool_choice.get("function", {}).get("name") or tool_choice.get("name")
        return str(name) if name else None
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "any", "required"):
        return tool_choice
    return None


def _render_tool_turns(messages: list[dict[str, Any]], native: bool) -> list[dict[str, Any]]:
    """Past tool calls and results in the shape the chat template can render.

    Templates that take tools get HF's convention (``tool_calls[].function.arguments`` as a dict,
    ``role: tool`` results). The others get the calls written into the assistant's content as
    ``<tool_call>`` blocks and each result as a user turn holding a ``<tool_response>`` block, so a
    template that only prints ``content`` (Gemma's, plain ChatML) still shows them to the model.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        calls = message.get("tool_calls") or []
        if message["role"] == "assistant" and calls:
            structured = []
            for call in calls:
                function = call.get("function", {})
                args = function.get("arguments", "{}")
                with contextlib.suppress(ValueError):  # unreadable: keep the raw string, shown, never run
                    args = json.loads(args) if isinstance(args, str) else args
                structured.append({"name": function.get("name"), "arguments": args})
            if native:
                message = {
                    **message,
                    "tool_calls": [
                        {"type": "function", "id": c.get("id"), "function": s}
                        for c, s in zip(calls, structured, strict=True)
                    ],
                }
            else:
                blocks = [
                    f"{HERMES_MARKERS[0]}\n{json.dumps(s, ensure_ascii=False)}\n{HERMES_MARKERS[1]}" for s in structured
                ]
                content = message.get("content") or ""  # verbatim: the model's own words, spaces included
                text = "\n".join([content, *blocks]) if content else "\n".join(blocks)
                message = {**{k: v for k, v in message.items() if k != "tool_calls"}, "content": text}
        elif message["role"] == "tool" and not native:
            message = {"role": "user", "content": f"<tool_response>\n{message.get('content', '')}\n</tool_response>"}
        out.append(message)
    return out


def _template_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
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


def _message_strings(messages: list[dict[str, Any]]) -> list[str]:
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


def _control_tokens(tokenizer: Any) -> list[str]:
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
    specials = [*_control_tokens(tokenizer), *protected]
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


_STREAM_EMITTER: ContextVar[StepReporter | None] = ContextVar("specguard_stream_emitter", default=None)
_T = TypeVar("_T")
_U = TypeVar("_U")


class _Inbox(Iterator[_T]):
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


async def _drive(
    generator: Callable[[Iterator[StepEvent]], Generator[_U, None, None]], events: AsyncIterator[StepEvent]
) -> AsyncGenerator[_U, None]:
    """Run a sync step-to-chunk ``generator`` over steps that arrive asynchronously.

    The generator takes one step per chunk it yields until the steps end, then yields the rest (the last
    chunk): each step is put in its inbox as it arrives and its chunk read at once, on the event loop (the
    generator only builds messages; the decoding stays in its worker thread, behind ``events``).
    """
    inbox: _Inbox[StepEvent] = _Inbox()
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


def _close(iterator: Iterator[Any]) -> None:
    """Close a generator now (its ``finally`` blocks run: the generation lock is released), not at GC."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def _next_or_done(iterator: Iterator[Any]) -> Any:
    return next(iterator, _DONE)


async def _iterate_in_thread(iterator: Iterator[Any]) -> AsyncIterator[Any]:
    """Drive a blocking iterator from a worker thread, one item per hop.

    If the consumer stops early (cancellation, ``break``), the iterator is closed once its item in
    flight is done, so its ``finally`` blocks (the generation lock) always run.
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
