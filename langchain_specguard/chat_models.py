"""``ChatSpecGuard``: a LangChain chat model over the SpecGuard engine.

The engine (``langchain_specguard.engine``) does the decoding; this layer renders messages with the
tokenizer's chat template (:mod:`.prompts`), turns verified steps into message chunks (:mod:`.streaming`),
and reports every step's verification as a ``specguard_step`` custom event so LangSmith traces and
``astream_events`` show it. Loaded pairs are shared between instances (:mod:`.pairs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from operator import itemgetter
from typing import Any, Literal, cast

import torch
from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import ToolCall, invalid_tool_call
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableLambda,
    RunnableMap,
    RunnablePassthrough,
    ensure_config,
)
from langchain_core.tools import BaseTool
from pydantic import AliasChoices, ConfigDict, Field, PrivateAttr, SecretStr, model_validator
from transformers import Pipeline, PreTrainedModel

from .binding import (
    ToolSetup,
    checked_tool_choice,
    forced_tool_name,
    json_object,
    openai_tools,
    structured_parser,
    tool_flag,
)
from .callbacks import (
    NO_REPORTER,
    STEP_EVENT,
    SUMMARY_EVENT,
    RunCatcher,
    StepReporter,
    TraceSteps,
    langsmith_params,
)
from .engine import (
    PACKAGED_PAIRS,
    PARAM_FIELDS,
    CallOptions,
    ModelPair,
    SpecGuardParams,
    StepEvent,
    ThresholdCalibrator,
    generate_steps,
    load_embedded_pair,
    load_packaged_pair,
    load_pair,
    resolve_dtype,
    score_layers,
    summarize,
    threshold_calibrator,
)
from .pairs import Holding, context_window_of, identity, model_profile, shared_pair
from .prompts import render
from .reasoning import DEFAULT_MARKERS, ThoughtSpec, model_thinks, template_kwargs
from .streaming import (
    STREAM_EMITTER,
    ShownContent,
    aggregate,
    carries_something,
    close_now,
    drive,
    is_last,
    iterate_in_thread,
    last_chunk,
    openai_logprobs,
    run_message_id,
    step_chunk,
)
from .tools import (
    FORMATS,
    HERMES_MARKERS,
    OUTPUT_SYNTAX,
    ToolCallStyle,
    ToolFormat,
    inert,
    tools_by_name,
    validate_tool_call,
)

__all__ = ["STEP_EVENT", "SUMMARY_EVENT", "ChatSpecGuard"]


EMBEDDED_DRAFT_LAYERS = 15


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

    pair: Literal["qwen2.5-coder"] | None = Field(
        default=None,
        description="A target/draft pair installed from PyPI, loaded offline: 'qwen2.5-coder' (Qwen2.5-Coder-1.5B-"
        "Instruct with its 0.5B sibling as the draft; the 'qwen-coder' extra). Instead of target_model/draft_model.",
    )
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
    torch_dtype: str | torch.dtype | None = Field(
        default=None,
        validation_alias=AliasChoices("torch_dtype", "dtype"),
        description="torch.bfloat16 or 'bfloat16', 'float32'... (also accepted as `dtype`); None or 'auto' = bf16 on "
        "GPU, fp32 on CPU.",
    )
    model_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="More from_pretrained arguments for the target, e.g. {'quantization_config': BitsAndBytesConfig("
        "load_in_4bit=True)} or {'attn_implementation': 'sdpa'}.",
    )
    draft_model_kwargs: dict[str, Any] | None = Field(
        default=None, description="More from_pretrained arguments for the draft (model_kwargs are the target's only)."
    )
    draft_tokenizer: Any = Field(
        default=None, description="The draft's tokenizer id/path/object, checked against the target's vocabulary."
    )
    draft_gguf_file: str | None = Field(default=None, description="GGUF file name inside draft_model's directory.")
    max_memory: dict[Any, str] | None = Field(
        default=None, description="With device_map: the most memory per device, e.g. {0: '20GiB', 'cpu': '64GiB'}."
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
        default=None,
        gt=0,
        description="Seconds a call may run; past it the call raises TimeoutError, within one draft chunk or one "
        "target pass of the deadline.",
    )
    max_batch_size: int = Field(
        default=16,
        ge=1,
        le=256,
        description="The most concurrent calls that share the model's passes (threads, batch/abatch, asyncio, "
        "LangGraph branches); more wait for a place. Each call's text is what it would be alone.",
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
    _pair_key: tuple[Any, ...] | None = PrivateAttr(default=None)  # the loading key _pair was loaded for
    _holding: Holding | None = PrivateAttr(default=None)  # this instance counted as a holder of its key's pair
    _load_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_fields(cls, values: Any) -> Any:
        """A misspelt option (``acceptence_threshold``, ``max_new_tokens``) is an error, not silently dropped."""
        if isinstance(values, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias} | {"dtype"}
            unknown = sorted(str(k) for k in values if k not in known)
            if unknown:
                raise ValueError(f"unknown option(s) {unknown} for ChatSpecGuard; the options are {sorted(known)}")
        return values

    @model_validator(mode="before")
    @classmethod
    def _from_pipelines(cls, values: Any) -> Any:
        """A transformers ``Pipeline`` (or langchain-huggingface's ``HuggingFacePipeline``, which holds one) as
        ``target_model``/``model`` or ``draft_model`` stands for its model; the target's pipeline also gives the
        tokenizer unless one is given."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        for key in ("target_model", "model", "draft_model"):
            pipe = _pipeline_of(values.get(key))
            if pipe is not None:
                values[key] = pipe.model
                if key != "draft_model" and values.get("tokenizer") is None:
                    values["tokenizer"] = pipe.tokenizer
        return values

    @classmethod
    def from_model_id(
        cls, model_id: str, draft_model: Any = None, *, draft_layers: int | None = None, **kwargs: Any
    ) -> ChatSpecGuard:
        """A model of a Hub id or local path, as ``HuggingFacePipeline.from_model_id`` takes it (``init_chat_model``
        takes only LangChain's built-in providers): the draft is ``draft_model`` (an id, a path, a model or a
        pipeline), or the target's first ``draft_layers`` layers; ``kwargs`` are the other options
        (``max_tokens=...``, ``torch_dtype=...``)."""
        options = {"target_model": model_id, "draft_model": draft_model, "draft_layers": draft_layers, **kwargs}
        return cls(**options)

    @model_validator(mode="after")
    def _check_pair_spec(self) -> ChatSpecGuard:
        if self.pair is not None:
            given = [name for name in ("target_model", "draft_model", "draft_layers", "gguf_file", "draft_gguf_file")
                     if getattr(self, name) is not None]  # fmt: skip
            if given:
                raise ValueError(f"pair={self.pair!r} names both models already: drop {given}")
        resolve_dtype(self.torch_dtype, "cpu")  # a misspelt dtype fails here, not at the first call
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
        if self.pair is not None:
            return PACKAGED_PAIRS[self.pair].target.filename
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
            "pair": self.pair,
            "target": identity(self.target_model),
            "draft": identity(self.draft_model),
            "draft_layers": self.draft_layers,
            "tokenizer": identity(self.tokenizer),
            "gguf_file": self.gguf_file,
            "torch_dtype": str(self.torch_dtype) if self.torch_dtype is not None else None,
            "device": self.device,
            "model_kwargs": repr(self.model_kwargs),
            "draft_model_kwargs": repr(self.draft_model_kwargs),
            "draft_tokenizer": identity(self.draft_tokenizer),
            "draft_gguf_file": self.draft_gguf_file,
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
        return len(self.render_prompt(messages, openai_tools(tools) if tools else None))

    @model_validator(mode="after")
    def _share_loaded_pair(self) -> ChatSpecGuard:
        self._hold()
        return self

    def _hold(self) -> tuple[Any, ...]:
        """Count this instance as a holder of its loading key's pair (again, if its loading options changed).

        Constructed instances hold their key from validation on; copies, which skip validation, from the
        copy on (:meth:`__copy__`, :meth:`__deepcopy__`, :meth:`model_copy`), and anything else at the latest
        when it loads, so no pair is left in the registry without a holder, or dropped while one lives.
        """
        key = self._loading_key()
        held = self._holding
        if held is not None and held.of(self) and held.key == key:
            return key
        self._holding = Holding(key, self)
        if held is not None and held.of(self):
            held.release()
        return key

    def __copy__(self) -> ChatSpecGuard:
        copied = super().__copy__()
        copied._load_lock = threading.Lock()
        copied._hold()
        return copied

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> ChatSpecGuard:
        """A deep copy of the options; the loaded pair and any model or tokenizer object given are shared (the
        registry holds them for the copy too), never copied, and the copy's locks are its own."""
        memo = {} if memo is None else memo
        shared = [self._pair, self._pair_key, self.target_model, self.draft_model, self.tokenizer]
        memo.update({id(value): value for value in shared if value is not None and not isinstance(value, str)})
        memo[id(self._holding)] = None
        memo[id(self._load_lock)] = threading.Lock()
        copied = super().__deepcopy__(memo)
        copied._hold()
        return copied

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> ChatSpecGuard:
        """A copy (see :meth:`__copy__`); with ``update``, a copy whose loading options changed gets its own pair."""
        copied = super().model_copy(update=update, deep=deep)
        copied._hold()
        return copied

    @model_validator(mode="after")
    def _fill_profile(self) -> ChatSpecGuard:
        if self.profile is None:
            window = PACKAGED_PAIRS[self.pair].context_window if self.pair is not None else None
            self.profile = model_profile(window or context_window_of(self.target_model))
        return self

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "specguard"
        params["ls_model_name"] = kwargs.get("model", self.model_name)
        config = self.engine_params(**{k: v for k, v in kwargs.items() if k in PARAM_FIELDS}).model_dump()
        return langsmith_params(params, self.model_name, self.draft_name, {**config, "trace_steps": self.trace_steps})

    @property
    def draft_name(self) -> str:
        """The draft as traces name it: its id or path, the packaged draft, or the target's first layers."""
        if self.pair is not None:
            return PACKAGED_PAIRS[self.pair].draft.filename
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
        key = self._hold()
        pair = self._pair
        if pair is not None and self._pair_key == key:
            return pair
        with self._load_lock:
            if self._pair is None or self._pair_key != key:
                pair = shared_pair(key, self._load_pair)
                self._pair, self._pair_key = pair, key
                if self.profile is not None and self.profile.get("max_input_tokens") is None:
                    self.profile = {**self.profile, "max_input_tokens": pair.context_window}
                self._check_score_layers()
            pair = self._pair
        return pair

    def _loading_key(self) -> tuple[Any, ...]:
        return (
            self.pair,
            identity(self.target_model),
            identity(self.draft_model),
            self.draft_layers,
            identity(self.tokenizer),
            self.gguf_file,
            self.device,
            str(self.torch_dtype),
            repr(self.device_map),
            self.trust_remote_code,
            repr(self.model_kwargs),
            repr(self.draft_model_kwargs),
            identity(self.draft_tokenizer),
            self.draft_gguf_file,
            repr(self.max_memory),
        )

    def _load_pair(self) -> ModelPair:
        if self.pair is not None:
            return load_packaged_pair(self.pair, device=self.device, dtype=self.torch_dtype, tokenizer=self.tokenizer)
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
            draft_tokenizer=self.draft_tokenizer,
            draft_gguf_file=self.draft_gguf_file,
            max_memory=self.max_memory,
            model_kwargs=self.model_kwargs,
            draft_model_kwargs=self.draft_model_kwargs,
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
        packaged = PACKAGED_PAIRS[self.pair].tool_call_format if self.pair is not None else None
        if packaged is not None:
            return packaged  # what the packaged model was seen to write
        template = str(self.template or "")
        if self.template_takes_tools() and HERMES_MARKERS[0] not in template:
            return "json"
        return "hermes"

    def tool_format(self) -> ToolFormat:
        """The :class:`~langchain_specguard.tools.ToolFormat` of :meth:`tool_style`: how calls are written and read."""
        return FORMATS[self.tool_style()]

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
        tokenizer = self.load().tokenizer
        native, fmt = self.template_takes_tools(), self.tool_format()
        syntax = [*OUTPUT_SYNTAX, *(self.tool_call_markers or ())]
        template, name = self.template, self.model_name
        return render(
            tokenizer, template, name, messages, tools, native, prefix, variables, markers, thinks, fmt, syntax
        )

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> _Call:
        if isinstance(stop, str):  # would otherwise stop at each of its characters
            raise TypeError(f"stop must be a list of strings, e.g. stop=[{stop!r}], not a str")
        if stop is not None and not isinstance(stop, (list, tuple)):
            raise TypeError(f"stop must be a list of strings, got {type(stop).__name__}")
        kwargs = dict(kwargs)
        tools: list[dict[str, Any]] | None = kwargs.pop("tools", None)
        tool_choice = kwargs.pop("tool_choice", None)
        parallel = tool_flag("parallel_tool_calls", kwargs.pop("parallel_tool_calls", None))
        tool_flag("strict", kwargs.pop("strict", None))  # calls are always schema-checked (see bind_tools)
        kwargs.pop("ls_structured_output_format", None)
        reasoning = kwargs.pop("reasoning", self.reasoning)
        if reasoning is not None and not isinstance(reasoning, bool):
            raise TypeError(f"reasoning must be True, False or None, got {reasoning!r}")
        variables = self._template_variables(reasoning, kwargs.pop("chat_template_kwargs", None))
        stops = [*(self.stop or []), *(stop or [])]
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop sequences must be non-empty strings, got {stops!r}")
        pair = self.load()
        setup = ToolSetup()
        if tools is not None or tool_choice is not None:  # per-call tools get the checks bind_tools makes
            formatted = openai_tools(tools or [])
            tool_choice = checked_tool_choice(tool_choice, formatted)
            tools = formatted
        if tools and tool_choice != "none":
            setup = self._tool_setup(tools, tool_choice)
            setup.single_call = parallel is False
            # the format's step syntax, in the engine's terms: each call one step, checked against the tools
            options, checked = setup.format.step_options(kwargs.get("tool_call_markers", self.tool_call_markers))
            for field_name, value in options.items():
                kwargs.setdefault(field_name, value)
            if not checked:
                setup.validate = None
        params = self.engine_params(**kwargs)
        markers = params.reasoning_markers or DEFAULT_MARKERS
        thinks = self._thinks(reasoning, markers)
        params = params.model_copy(update={"reasoning_markers": markers if thinks else None})
        prompt, thought = self._render(messages, setup.tools, setup.prefix, variables, markers, thinks)
        return _Call(pair, prompt, params, stops, replace(setup, thought=thought))

    def _tool_setup(self, tools: list[dict[str, Any]], tool_choice: Any) -> ToolSetup:
        """Format, validator and forced answer start for one call with tools bound."""
        fmt = self.tool_format()
        prefix = fmt.forced_prefix(forced_tool_name(tool_choice), tool_choice in ("any", "required", True))
        return ToolSetup(tools=tools, format=fmt, validate=fmt.validator(tools), prefix=prefix)

    def _steps(self, call: _Call, calibrator: ThresholdCalibrator | None = None) -> Iterator[StepEvent]:
        """Steps of one generation, as they are verified.

        The generation joins the pair's running batch: concurrent calls on this model, on its copies and on other
        instances sharing its pair (threads, ``batch``, asyncio, LangGraph branches) share their passes, and each
        call's text is what it would be alone. Closing the iterator (a stream stopped early, a cancelled task) takes
        the generation out of the batch at the next step boundary.
        """
        setup = call.setup
        options = CallOptions(
            stop=tuple(call.stops),
            validate_step=setup.validate,
            prefix=setup.prefix,
            single_call=setup.single_call,
            thinking=setup.thought is not None and setup.thought.opened,
            calibrator=calibrator,  # "auto" learns within the call, unless calibrate() passes one across prompts
            timeout=self.timeout,
            max_batch_size=self.max_batch_size,
        )
        steps = generate_steps(call.pair, call.prompt, call.params, options)
        try:
            yield from steps
        finally:
            close_now(steps)  # leaves its batch now, not at GC

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
        formatted = openai_tools(tools)
        tool_choice = checked_tool_choice(tool_choice, formatted)
        flags = {"parallel_tool_calls": parallel_tool_calls, "strict": strict}
        for name, value in flags.items():
            tool_flag(name, value)
        if "response_format" in kwargs:  # what create_agent passes for a ProviderStrategy (native structured output)
            raise TypeError(
                "bind_tools got response_format, but ChatSpecGuard has no native structured output (its profile "
                "says structured_output=False): give create_agent response_format=ToolStrategy(Schema) (what it "
                "picks from the profile for a plain Schema), or use with_structured_output(Schema)"
            )
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
        schema: dict[str, Any] | type | None,
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
        ``OutputParserException``), never a silent ``None``. ``json_mode`` without a schema returns the
        JSON object the answer is, as a dict (the prompt should ask for JSON, as with other chat models).
        """
        if method not in ("function_calling", "json_schema", "json_mode"):
            raise ValueError(f"unknown method {method!r}; use 'function_calling', 'json_schema' or 'json_mode'")
        strict = kwargs.pop("strict", None)
        if kwargs:
            raise ValueError(f"unsupported arguments {sorted(kwargs)}")
        llm: Runnable[LanguageModelInput, Any]
        if schema is None and method == "json_mode":
            llm = self.bind(ls_structured_output_format={"kwargs": {"method": method}, "schema": None})
            parser = RunnableLambda(json_object, name="specguard_structured_output")
        elif schema is None:
            raise ValueError(
                "with_structured_output needs a schema (pydantic model, TypedDict or JSON schema), except with "
                "method='json_mode'"
            )
        else:
            name = openai_tools([schema])[0]["function"]["name"]
            llm = self.bind_tools(
                [schema],
                tool_choice=name,
                parallel_tool_calls=False,  # the answer is one call: generation ends with it
                strict=strict,
                ls_structured_output_format={"kwargs": {"method": method}, "schema": schema},
            )
            parser = RunnableLambda(structured_parser(schema, name), name="specguard_structured_output")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")

    def calibrate(self, inputs: Sequence[LanguageModelInput], **kwargs: Any) -> float:
        """Run ``inputs`` with ``acceptance_threshold="auto"`` through one calibrator and return its threshold.

        "auto" learns from the target's verification of every step (``engine/calibration.py``), within one
        call by default; this learns across prompts like the ones you will send, up front, and returns the
        value to fix as ``acceptance_threshold`` (nothing is stored: later calls do not depend on this one).
        For the 'mean' and 'min' confidence methods; ``kwargs`` are per-call options for these runs.
        """
        if isinstance(inputs, (str, BaseMessage)) or not inputs:
            raise ValueError("calibrate needs a non-empty list of inputs (prompts or message lists)")
        options = {**kwargs, "acceptance_threshold": "auto"}
        calibrator = threshold_calibrator(self.engine_params(**options))
        assert calibrator is not None
        for item in inputs:
            for _ in self._steps(self._prepare(self._convert_input(item).to_messages(), None, options), calibrator):
                pass
        return calibrator.threshold()

    def _message_fields(self, text: str, setup: ToolSetup) -> tuple[str, dict[str, Any]]:
        """Content and tool-call fields of the final message for ``text`` (the generated answer).

        A call that parses but does not fit the bound tools (unknown name, arguments against the schema),
        whoever wrote it, is an ``invalid_tool_call`` with the reason, never a call an agent would run.
        """
        if setup.tools is None:
            return text, {}
        parsed = setup.format.parse(setup.prefix + text)
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
            summary["step_events"] = [s.to_dict() for s in steps]  # beside the count "steps": one type each
        metadata = {
            "model_name": pair.name,
            "model_provider": "specguard",
            "finish_reason": (steps[-1].finish_reason if steps else None) or "length",
            "specguard": summary,
        }
        if steps and steps[0].logprobs is not None:
            metadata["logprobs"] = {"content": [e for s in steps for e in openai_logprobs(pair.tokenizer, s)]}
        return metadata

    @staticmethod
    def _usage(prompt: list[int], steps: list[StepEvent]) -> UsageMetadata:
        out = sum(s.num_tokens for s in steps)
        # (a cast: mypy at python_version 3.10 reads langchain-core's NotRequired detail keys as required)
        usage = cast(
            UsageMetadata, {"input_tokens": len(prompt), "output_tokens": out, "total_tokens": len(prompt) + out}
        )
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
        streaming callbacks and the message ``invoke`` returns (their sum, :func:`aggregate`) cannot differ.
        """
        steps: list[StepEvent] = []
        shown = ShownContent(call.setup)
        for event in events:
            steps.append(event)
            yield step_chunk(shown.add(event.text), call.pair, event, message_id)
        yield last_chunk(self._final_message(call, steps), shown, message_id)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        emitter = self._reporter(run_manager)
        call = self._prepare(messages, stop, kwargs)
        events = emitter.steps(self._steps(call))
        try:
            for chunk in self._chunks(call, events, run_message_id(run_manager)):
                if is_last(chunk):
                    emitter.summary(chunk.message.response_metadata["specguard"])
                yield chunk
        finally:
            close_now(events)  # a stream stopped early releases the generation lock now, not at GC

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks: list[ChatGenerationChunk] = []
        for chunk in self._stream(messages, stop, run_manager, **kwargs):
            if run_manager is not None and carries_something(chunk):
                run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
            chunks.append(chunk)
        return aggregate(chunks)

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
        message_id = run_message_id(run_manager)
        events = emitter.asteps(iterate_in_thread(self._steps(call)))
        async with contextlib.aclosing(drive(lambda steps: self._chunks(call, steps, message_id), events)) as chunks:
            async for chunk in chunks:
                if is_last(chunk):
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
            if run_manager is not None and carries_something(chunk):
                await run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
            chunks.append(chunk)
        return aggregate(chunks)

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
        token = STREAM_EMITTER.set(emitter)
        try:
            yield from super().stream(input, config, stop=stop, **kwargs)
        finally:
            with contextlib.suppress(ValueError):  # resumed from another context: nothing to restore
                STREAM_EMITTER.reset(token)

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        config, emitter = self._streaming_config(config, AsyncCallbackManager)
        token = STREAM_EMITTER.set(emitter)
        try:
            async for chunk in super().astream(input, config, stop=stop, **kwargs):
                yield chunk
        finally:
            with contextlib.suppress(ValueError):
                STREAM_EMITTER.reset(token)

    def _reporter(self, run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None) -> StepReporter:
        if run_manager is not None:
            return StepReporter.for_run(run_manager, self.trace_steps)
        return STREAM_EMITTER.get() or NO_REPORTER

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


def _pipeline_of(value: Any) -> Pipeline | None:
    """The transformers pipeline ``value`` is or holds (``HuggingFacePipeline.pipeline``), if any."""
    for candidate in (value, getattr(value, "pipeline", None)):
        if isinstance(candidate, Pipeline):
            return candidate
    return None


@dataclass
class _Call:
    """One call, prepared: the loaded pair, the prompt's token ids, the decoding parameters, stops and tools."""

    pair: ModelPair
    prompt: list[int]
    params: SpecGuardParams
    stops: list[str]
    setup: ToolSetup
