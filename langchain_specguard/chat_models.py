"""``ChatSpecGuard``: a LangChain chat model over the SpecGuard engine.

The engine (``langchain_specguard.engine``) does the decoding. Around this class: where the pair comes from
and how instances share it (:mod:`.pairs`), what the chat template decides and how messages become the
prompt (:mod:`.prompts`), how tools bind (:mod:`.binding`), the path from verified steps to chunks to the
final message (:mod:`.streaming`), and how steps reach callbacks and traces as ``specguard_step`` custom
events (:mod:`.callbacks`). The class holds the options, prepares a call, runs it, and is LangChain's plumbing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from pydantic import AliasChoices, ConfigDict, Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from transformers import PreTrainedModel

from .binding import JSON_STEP_DELIMITERS, ToolRequest, openai_tools, structured_output, tool_binding
from .callbacks import TracedChatModel, langsmith_params
from .engine import (
    PARAM_FIELDS,
    CallOptions,
    ModelPair,
    SpecGuardParams,
    StepEvent,
    ThresholdCalibrator,
    check_served_params,
    generate_steps,
    score_layers,
    threshold_calibrator,
)
from .engine.served import API_KEY_ENV
from .pairs import PairSource, model_profile
from .prompts import PromptRequest, TemplateProfile, template_variables
from .streaming import PreparedCall, acollect, areported_chunks, close_now, collect, reported_chunks
from .tools import ToolFormat

__all__ = ["ChatSpecGuard"]

LEARNT_AT_LOADING = ("max_input_tokens", "max_output_tokens", "reasoning_output")
"""The profile's keys that loading can tell when construction could not (see ``ChatSpecGuard._loaded``)."""


class ChatSpecGuard(TracedChatModel, PairSource, SpecGuardParams):
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
    tool_call_format: Literal["auto", "hermes", "json"] = Field(
        default="auto",
        description="How the model writes tool calls: 'hermes' (<tool_call>{...}</tool_call>, Qwen/Hermes and "
        'the fallback prompt) or \'json\' (the answer opens with {"name": ..., "parameters": ...} calls, Llama 3). '
        "'auto': 'json' for templates that take tools but never mention <tool_call>, else 'hermes'.",
    )
    # what LangChain code passes to every chat model (max_retries is a loading option: PairSource)
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

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _check_spellings(cls, values: Any) -> Any:
        """A misspelt option (``acceptence_threshold``, ``max_new_tokens``) is an error, not silently dropped; so are
        two spellings of one option (``model`` beside ``target_model``), of which only one would be kept."""
        if isinstance(values, dict):
            spellings = [_spellings(name, field) for name, field in cls.model_fields.items()]
            known = {spelling for names in spellings for spelling in names}
            unknown = sorted(str(k) for k in values if k not in known)
            if unknown:
                raise ValueError(f"unknown option(s) {unknown} for ChatSpecGuard; the options are {sorted(known)}")
            for names in spellings:
                given = [name for name in names if name in values]
                if len(given) > 1:
                    raise ValueError(f"{' and '.join(map(repr, given))} are two spellings of one option: give one")
        return values

    @classmethod
    def from_model_id(
        cls, model_id: str, draft_model: Any = None, *, draft_layers: int | None = None, **kwargs: Any
    ) -> ChatSpecGuard:
        """A model of a Hub id or local path, as ``HuggingFacePipeline.from_model_id`` takes it (``init_chat_model``
        takes only LangChain's built-in providers): the draft is ``draft_model`` (an id, a path, a model or a
        pipeline), or the target's first ``draft_layers`` layers; ``kwargs`` are the other options
        (``max_tokens=...``, ``torch_dtype=...``)."""
        given = sorted({"target_model", "model"} & kwargs.keys())
        if given:
            raise ValueError(f"from_model_id names the target model already ({model_id!r}): drop {given}")
        options = {"target_model": model_id, "draft_model": draft_model, "draft_layers": draft_layers, **kwargs}
        return cls(**options)

    @model_validator(mode="after")
    def _check_options(self) -> ChatSpecGuard:
        self._check_score_layers()
        if self.target_url is not None:  # what a served target cannot do fails here, not at the first call
            check_served_params(self.engine_params(), self.target_url)
            if self.api_key is not None:
                raise ValueError(f"a served target's API key is read from an environment variable ({API_KEY_ENV} "
                                 "by default, see target_server_options), never passed as api_key")  # fmt: skip
        template_variables(None, self.chat_template_kwargs)
        if self.stop is not None and any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop sequences must be non-empty strings")
        return self

    @model_validator(mode="after")
    def _hold_and_profile(self) -> ChatSpecGuard:
        """A valid instance holds its pair from now on (see :class:`~.pairs.PairSource`); its profile says what is
        known before loading."""
        if self.profile is None:
            self.profile = model_profile(
                self.known_context_window(), self.reasoning, served=self.target_url is not None
            )
        return self._hold()

    # ------------------------------------------------------------------------------------------
    # LangChain plumbing

    @property
    def _llm_type(self) -> str:
        return "specguard"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Everything that can change the output (LangChain's cache key is built from this)."""
        return {
            **self.loading_identity(),
            "chat_template": self.chat_template,
            "chat_template_kwargs": self.chat_template_kwargs,
            "reasoning": self.reasoning,
            "tool_call_format": self.tool_call_format,
            "tool_prompt": self.tool_prompt,
            "return_step_details": self.return_step_details,
            "stop": self.stop,
            **self.engine_params().model_dump(),
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        asked = stop if stop is not None else kwargs.get("stop")
        if asked is None or isinstance(asked, (list, tuple)):  # else _prepare refuses it, naming the problem
            stops = [*(self.stop or []), *(asked or [])]  # what the call stops at (see _prepare)
            if stops:
                params["ls_stop"] = stops
        params["ls_provider"] = "specguard"
        params["ls_model_name"] = kwargs.get("model", self.model_name)
        config = self.engine_params(**{k: v for k, v in kwargs.items() if k in PARAM_FIELDS}).model_dump()
        return langsmith_params(params, self.model_name, self.draft_name, {**config, "trace_steps": self.trace_steps})

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the pair's own tokenizer (no GPT-2 stand-in; no weights load for it)."""
        ids: list[int] = self.pair_tokenizer()(text, add_special_tokens=False)["input_ids"]
        return ids

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Prompt tokens of ``messages`` as this model would see them: chat template, tools and all (the tokenizer
        alone loads for it, not the weights)."""
        return len(self.render_prompt(messages, openai_tools(tools) if tools else None))

    # ------------------------------------------------------------------------------------------
    # models, prompt, params

    def _loaded(self, pair: ModelPair) -> None:
        """The profile gets what loading tells (the window of a model whose config did not say, whether the chat
        template thinks), where it was not known."""
        if self.profile is not None:
            thinks = self.template_profile().thinks(self.reasoning, self.reasoning_markers)
            learnt = model_profile(self.known_context_window(), thinks, served=self.target_url is not None)
            profile = self.profile.copy()
            for key in LEARNT_AT_LOADING:
                if profile.get(key) is None and learnt.get(key) is not None:
                    profile[key] = learnt[key]  # type: ignore[literal-required]
            if profile != self.profile:
                self.profile = profile
        self._check_score_layers()

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
        loaded = self._pairs().pair
        if loaded is not None:
            model = loaded.target if self.signal_source == "target" else loaded.draft
        if isinstance(model, PreTrainedModel):
            score_layers(model, self.score_layers)

    def template_profile(self) -> TemplateProfile:
        """What the chat template decides for this model (its tokenizer is read alone while the pair is not loaded)."""
        return TemplateProfile.of(
            self.pair_tokenizer(),
            self.model_name,
            chat_template=self.chat_template,
            tool_prompt=self.tool_prompt,
            tool_call_format=self.tool_call_format,
            seen_format=self.packaged_tool_format(),
            tool_call_markers=self.tool_call_markers,
        )

    def tool_format(self) -> ToolFormat:
        """The :class:`~langchain_specguard.tools.ToolFormat` the model's calls are written and read in (see
        ``tool_call_format``)."""
        return self.template_profile().tool_format

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
        profile, markers = self.template_profile(), self.reasoning_markers
        variables = template_variables(self.reasoning, self.chat_template_kwargs, chat_template_kwargs)
        return profile.render(
            messages, PromptRequest(tools, prefix, variables, markers, profile.thinks(self.reasoning, markers))
        )[0]

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> PreparedCall:
        if isinstance(stop, str):  # would otherwise stop at each of its characters
            raise TypeError(f"stop must be a list of strings, e.g. stop=[{stop!r}], not a str")
        if stop is not None and not isinstance(stop, (list, tuple)):
            raise TypeError(f"stop must be a list of strings, got {type(stop).__name__}")
        kwargs = dict(kwargs)
        asked = ToolRequest.take(kwargs)
        reasoning = kwargs.pop("reasoning", self.reasoning)
        if reasoning is not None and not isinstance(reasoning, bool):
            raise TypeError(f"reasoning must be True, False or None, got {reasoning!r}")
        variables = template_variables(reasoning, self.chat_template_kwargs, kwargs.pop("chat_template_kwargs", None))
        stops = [*(self.stop or []), *(stop or [])]
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop sequences must be non-empty strings, got {stops!r}")
        pair, profile = self.load(), self.template_profile()
        setup = asked.setup(profile.tool_format, self.tool_call_markers, kwargs)
        if setup.grammar is not None:  # a JSON answer's steps end at its items too (see JSON_STEP_DELIMITERS)
            kwargs.setdefault("step_delimiters", [*self.step_delimiters, *JSON_STEP_DELIMITERS])
        params = self.engine_params(**kwargs)
        markers = params.reasoning_markers
        request = PromptRequest(setup.tools, setup.prefix, variables, markers, profile.thinks(reasoning, markers))
        params = params.model_copy(update={"reasoning_markers": request.thought_markers})
        prompt, thought = profile.render(messages, request)
        return PreparedCall(pair, prompt, params, stops, replace(setup, thought=thought), self.return_step_details)

    def _steps(self, call: PreparedCall, calibrator: ThresholdCalibrator | None = None) -> Iterator[StepEvent]:
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
            grammar=setup.grammar,
        )
        steps = generate_steps(call.pair, call.prompt, call.params, options)
        try:
            yield from steps
        finally:
            close_now(steps)  # leaves its batch now, not at GC

    # ------------------------------------------------------------------------------------------
    # one step-to-chunk path (streaming.call_chunks): ``_stream`` is it, ``_generate`` aggregates it, async drives it

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        call = self._prepare(messages, stop, kwargs)
        yield from reported_chunks(call, self._steps(call), self.step_reporter(run_manager), run_manager)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return collect(self._stream(messages, stop, run_manager, **kwargs), run_manager)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        call = await asyncio.to_thread(self._prepare, messages, stop, kwargs)  # the event loop stays free
        chunks = areported_chunks(call, self._steps(call), self.step_reporter(run_manager), run_manager)
        async with contextlib.aclosing(chunks):  # a consumer that stops early leaves the batch now
            async for chunk in chunks:
                yield chunk

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await acollect(self._astream(messages, stop, run_manager, **kwargs), run_manager)

    # ------------------------------------------------------------------------------------------
    # tools and structured output

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
        flags = {"parallel_tool_calls": parallel_tool_calls, "strict": strict}
        options = tool_binding(tools, tool_choice, flags, kwargs, PARAM_FIELDS)
        self.engine_params(**{k: v for k, v in kwargs.items() if k in PARAM_FIELDS})  # bad values fail here
        return super().bind(**options)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None,
        *,
        include_raw: bool = False,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Structured output (a pydantic model, ``pydantic.v1`` model, TypedDict or JSON schema).

        ``method="json_schema"``: native, as ChatOpenAI's and ChatOllama's: decoding is constrained to the schema (every
        token the draft proposes and every token the target writes is masked by its grammar; needs the
        ``structured`` extra), so the answer always parses; a stream yields the object growing field by field.
        ``"json_mode"``: the same, to the schema when one is given, else to any JSON object (returned as a dict).
        Objects that do not say ``additionalProperties`` are closed to the keys they name. A schema the grammar
        library cannot compile is refused here, naming the problem.
        ``"function_calling"`` (the default): the schema is bound as the only tool and the answer starts inside a
        call that names it, so the model writes the arguments, which are checked against the schema step by step.
        Either way a pydantic model gives an instance of itself, anything else a dict; when the model wrote no usable
        answer (a budget that ran out mid-object, no call), the error says why (``parsing_error`` with
        ``include_raw=True``, else an ``OutputParserException``), never a silent ``None``.
        """
        strict = kwargs.pop("strict", None)
        if kwargs:
            raise ValueError(f"unsupported arguments {sorted(kwargs)}")
        return structured_output(self, schema, include_raw=include_raw, method=method, strict=strict)

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


def _spellings(name: str, field: FieldInfo) -> list[str]:
    """The names an option is accepted under: its own, its alias, its validation aliases."""
    choices = field.validation_alias.choices if isinstance(field.validation_alias, AliasChoices) else []
    names = [name, field.alias, field.validation_alias, *choices]
    return list(dict.fromkeys(n for n in names if isinstance(n, str)))
