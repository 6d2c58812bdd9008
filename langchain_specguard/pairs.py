"""Where a chat model's pair comes from, and the process's shared pairs.

A :class:`PairSource` is a chat model's loading options and what they tell before anything loads (names,
context window, profile, the loading key); a :class:`PairHandle` is one instance's hold on the loaded pair
and owns what copies of the instance get. Instances with the same loading options share one loaded pair:
the copies that ``bind``, ``with_config`` and ``configurable_fields`` make, and separate instances with the
same models and loading options, load the models once; the pair is freed with the last instance that holds
its key.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from langchain_core.language_models.model_profile import ModelProfile
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from transformers import Pipeline, PreTrainedModel, PreTrainedTokenizerBase, TextGenerationPipeline
from typing_extensions import Self

from .engine import (
    GEMMA_CHAT_TEMPLATE,
    PACKAGED_PAIRS,
    UNKNOWN_WINDOW,
    ModelPair,
    check_causal_lm,
    check_object_dtype,
    check_tokenizer_spec,
    config_values,
    config_window,
    declared_window,
    hub_options,
    load_embedded_pair,
    load_packaged_pair,
    load_pair,
    load_served_pair,
    resolve_dtype,
)
from .engine.loading import check_gguf_tokenizer, embedded_gguf_path, gguf_tokenizer, load_tokenizer
from .engine.packaged import assemble, cache_dir, check_tokenizer, packaged_tokenizer
from .engine.served import ServedConfig, ServedConnectionError, ServedTimeoutError

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _SharedPair:
    """A loaded pair and how many live instances have its loading options (loaded or not yet)."""

    instances: int = 0
    pair: ModelPair | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_PAIRS: dict[tuple[Any, ...], _SharedPair] = {}


_PAIRS_LOCK = threading.Lock()


class Holding:
    """``owner`` counted as a holder of ``key``'s pair until it is garbage-collected or :meth:`release` runs."""

    def __init__(self, key: tuple[Any, ...], owner: Any) -> None:
        self.key = key
        with _PAIRS_LOCK:
            _PAIRS.setdefault(key, _SharedPair()).instances += 1
        self._finalizer = weakref.finalize(owner, _release, key)

    def release(self) -> None:
        self._finalizer()  # runs _release once; later calls and the garbage collector do nothing


def _release(key: tuple[Any, ...]) -> None:
    with _PAIRS_LOCK:
        entry = _PAIRS.get(key)
        if entry is not None:
            entry.instances -= 1
            if entry.instances <= 0:
                del _PAIRS[key]  # the last instance is gone: the pair (weights, caches, graphs) can be freed


def shared_pair(key: tuple[Any, ...], load: Callable[[], ModelPair]) -> ModelPair:
    """The process's pair for ``key``, loaded once while any instance with these loading options lives."""
    with _PAIRS_LOCK:
        entry = _PAIRS.setdefault(key, _SharedPair())
    with entry.lock:  # one load per key at a time; other keys load in parallel
        if entry.pair is None:
            entry.pair = load()
        return entry.pair


RETRY_DELAYS = (0.5, 8.0)
"""Seconds before the first new try of a failed load, and the most between two: the wait doubles (as the OpenAI
client's backoff does)."""

NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
"""``OSError``s that trying again cannot mend: the path itself is wrong."""


def may_pass(error: BaseException) -> bool:
    """Whether a loading failure may pass when tried again: the network or a server (an ``OSError``: the Hub
    unreachable, a download cut, a timeout; a served target's connection error or timeout), never what the options
    or the files say (a missing path, damaged weights, a bad option: those raise the same error every time)."""
    if isinstance(error, (ServedConnectionError, ServedTimeoutError)):
        return True
    return isinstance(error, OSError) and not isinstance(error, NOT_TRANSIENT)


def with_retries(load: Callable[[], T], retries: int, what: str) -> T:
    """``load()``, tried again up to ``retries`` times while it fails in a way that :func:`may_pass`, waiting
    :data:`RETRY_DELAYS` between tries; the last failure is raised as it is."""
    for attempt in range(retries + 1):
        try:
            return load()
        except Exception as error:
            if attempt == retries or not may_pass(error):
                raise
            delay = min(RETRY_DELAYS[0] * 2**attempt, RETRY_DELAYS[1])
            logger.warning(
                "%s failed (%s: %s); trying again in %.1f s (%d of max_retries=%d)",
                what, type(error).__name__, error, delay, attempt + 1, retries,
            )  # fmt: skip
            time.sleep(delay)
    raise AssertionError("unreachable")


def own_copy(value: T) -> T:
    """A copy of an option for the loaders, which may change what they are given (accelerate converts
    ``max_memory``'s sizes in place): the instance's options, its loading key among them, stay as given."""
    return copy.copy(value)


EMBEDDED_CONTEXT_WINDOW = 32768
"""Gemma 3 270M's context window (the embedded default); checked against the loaded model in the tests."""


def identity(value: Any) -> Any:
    """A model, tokenizer or path as it enters the cache key: the path, or the object's class, origin and id."""
    if value is None or isinstance(value, (str, int)):
        return value
    return f"{type(value).__name__}:{getattr(value, 'name_or_path', '')}:{id(value)}"


def context_window_of(spec: Any, hub: Mapping[str, Any] | None = None) -> int | None:
    """The target's context window when it is known without loading weights (object, embedded, its config).

    A path or Hub id is read from its ``config.json`` as data (:func:`~.engine.loading.config_values`, where
    ``hub`` says where its files are): no repository code runs and nothing asks on stdin, whatever
    ``trust_remote_code`` says, and a Hub that answers badly costs seconds. A window of 0 or less is unknown.
    """
    if spec is None:
        return EMBEDDED_CONTEXT_WINDOW
    if isinstance(spec, torch.nn.Module):
        config = getattr(spec, "config", None)
        return config_window(config) if config is not None else None
    try:
        return declared_window(config_values(str(spec), hub))
    except (OSError, ValueError):
        return None  # neither local nor reachable, or unreadable: filled in when the model loads


def model_profile(
    max_input_tokens: int | None, reasoning_output: bool | None = None, *, served: bool = False
) -> ModelProfile:
    """What profile-driven LangChain code (e.g. SummarizationMiddleware, create_agent's choice of a structured-output
    strategy) needs to know about this model.

    A call may write up to the whole context window (``max_tokens`` is capped by it, and by what the prompt leaves),
    so ``max_output_tokens`` is the window too. ``reasoning_output``: whether answers come with their thinking
    apart (a ``reasoning`` block), known from the ``reasoning`` option or, once loaded, the chat template; absent
    while unknown, as is any value not known yet. ``structured_output``: native schema-constrained decoding
    (``response_format``, ``method="json_schema"``), when the grammar library (the ``structured`` extra) is
    installed and the target is local (a served target chooses its tokens without the mask); otherwise
    ``create_agent`` answers through a tool call, which works everywhere.
    """
    profile = ModelProfile(
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
        structured_output=not served and importlib.util.find_spec("llguidance") is not None,
    )
    if max_input_tokens is not None:
        profile["max_output_tokens"] = max_input_tokens
    if reasoning_output is not None:
        profile["reasoning_output"] = reasoning_output
    return profile


# --------------------------------------------------------------------------------------------------
# one chat model's pair: where it comes from, and its hold on the loaded pair

EMBEDDED_DRAFT_LAYERS = 15
"""The embedded default's draft: Gemma 3 270M's first 15 of 18 layers."""

MODEL_OBJECTS = ("target_model", "draft_model", "tokenizer", "draft_tokenizer")
"""Loading options that may be objects the user passed in: shared by copies, never copied."""


class PairHandle:
    """One chat model's hold on its shared pair, and what its copies get.

    The owner counts as a holder of its loading key's pair from :meth:`hold` on (again, under the new key,
    when its loading options change), so no pair is left in the registry without a holder, or dropped while
    one lives. A copy of the owner, whichever way it was made (``copy.copy``, ``copy.deepcopy``,
    ``model_copy``; these skip validation), gets a handle of its own (:meth:`for_owner`): it shares the loaded
    pair, holds it for itself, and has its own load lock.
    """

    def __init__(self, owner: Any) -> None:
        self._owner = weakref.ref(owner)
        self._lock = threading.Lock()
        self.pair: ModelPair | None = None  # the loaded pair, once loaded
        self._key: tuple[Any, ...] | None = None  # the key ``pair`` was loaded for
        self._holding: Holding | None = None
        self._tokenizer: tuple[tuple[Any, ...], PreTrainedTokenizerBase] | None = None  # loaded alone, for a key

    @staticmethod
    def for_owner(handle: PairHandle | None, owner: Any) -> PairHandle:
        """``owner``'s own handle: ``handle`` if it is already, else a new one sharing what ``handle`` loaded."""
        if handle is not None and handle._owner() is owner:
            return handle
        own = PairHandle(owner)
        if handle is not None:
            own.pair, own._key, own._tokenizer = handle.pair, handle._key, handle._tokenizer
        return own

    def hold(self, key: tuple[Any, ...]) -> None:
        """Count the owner as a holder of ``key``'s pair (and no longer of the key it held before)."""
        held = self._holding
        if held is not None and held.key == key:
            return
        owner = self._owner()
        assert owner is not None, "a handle outlived its owner"
        self._holding = Holding(key, owner)
        if held is not None:
            held.release()

    def get(self, key: tuple[Any, ...], load: Callable[[], ModelPair]) -> tuple[ModelPair, bool]:
        """The pair of ``key`` (``load`` loads it, once in the process), and whether this call is the one that got it
        for the owner."""
        self.hold(key)
        pair = self.pair
        if pair is not None and self._key == key:
            return pair, False
        with self._lock:
            if self.pair is not None and self._key == key:
                return self.pair, False
            self.pair, self._key = shared_pair(key, load), key
            return self.pair, True

    def tokenizer(self, key: tuple[Any, ...], load: Callable[[], PreTrainedTokenizerBase]) -> PreTrainedTokenizerBase:
        """The tokenizer of ``key``'s pair: the loaded pair's where it is loaded (by the owner, or by any instance
        sharing it), else the one ``load`` reads alone, once per key for the owner, and no model with it."""
        pair = self.pair if self._key == key else None
        if pair is None:
            with _PAIRS_LOCK:
                entry = _PAIRS.get(key)
            pair = entry.pair if entry is not None else None
        if pair is not None:
            return pair.tokenizer
        with self._lock:
            if self._tokenizer is None or self._tokenizer[0] != key:
                self._tokenizer = (key, load())
            return self._tokenizer[1]


class PairSource(BaseModel):
    """Where a chat model's pair comes from: its loading options, the pair they load, and what they tell before
    anything loads (the names traces use, the context window for the profile, the key pairs are shared by).

    ``ChatSpecGuard`` is a ``PairSource`` (as it is a ``SpecGuardParams`` for its decoding options). Instances
    with the same loading options share one loaded pair (:meth:`load`); a copy of an instance, whichever way
    it is made (``copy.copy``, ``copy.deepcopy``, ``model_copy``: these skip validation), shares the loaded
    pair and holds it for itself (:class:`PairHandle`).
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
        "None = embedded Gemma 3 270M. With target_url: the served model's name (None: the server's only model).",
    )
    target_url: str | None = Field(
        default=None,
        description="Base URL of an OpenAI-compatible server that runs the target, e.g. vLLM's "
        "'http://host:8000/v1': each step is judged by one request to it and a rejected step written by it, while "
        "draft_model runs here (its tokenizer must be the served model's; checked at loading). Greedy only; the "
        "attention grounding of the target is not available. See docs/served.md.",
    )
    target_server_options: dict[str, Any] | None = Field(
        default=None,
        description="With target_url, how to talk to the server: timeout (seconds a request may take, default 60), "
        "connect_timeout, retries (default 2), backoff, max_connections (the pool concurrent calls share, default "
        "8), api ('openai', or 'sglang' for SGLang's native /generate) and api_key_env (the environment variable "
        "holding its API key, default SPECGUARD_TARGET_API_KEY).",
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
    max_retries: int = Field(
        default=0,
        ge=0,
        description="Further tries of loading the models (or the tokenizer alone) after a failure that may pass: "
        "the Hub or a served target's server unreachable, a download cut, a timeout; waiting 0.5 s, 1 s, 2 s... (at "
        "most 8 s) between tries. A missing path, damaged weights or a bad option fail at once. Generation is local "
        "and never retried (a served target's requests: target_server_options' retries).",
    )

    _handle: PairHandle | None = PrivateAttr(default=None)  # this instance's hold on its pair

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _from_pipelines(cls, values: Any) -> Any:
        """A transformers text-generation ``Pipeline`` (or langchain-huggingface's ``HuggingFacePipeline``, which
        holds one) as ``target_model``/``model`` or ``draft_model`` stands for its model, and its tokenizer for the
        model's, unless one is given (the draft's is checked against the target's vocabulary)."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        for key in ("target_model", "model", "draft_model"):
            pipe = _pipeline_of(values.get(key))
            if pipe is None:
                continue
            if not isinstance(pipe, TextGenerationPipeline) and pipe.task != "text-generation":
                raise ValueError(
                    f"{key} is a {pipe.task or type(pipe).__name__!r} pipeline; a chat model needs a 'text-generation' "
                    "pipeline (a causal language model)"
                )
            values[key] = pipe.model
            tokenizer = "draft_tokenizer" if key == "draft_model" else "tokenizer"
            if values.get(tokenizer) is None:
                values[tokenizer] = pipe.tokenizer
        return values

    @model_validator(mode="after")
    def _check_pair_options(self) -> Self:
        """Refuse loading options that contradict each other, before anything loads."""
        if self.target_url is not None or self.target_server_options is not None:
            self._check_served_options()
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
        if self.target_model is None and self.draft_model is not None and self.target_url is None:
            raise ValueError(
                "draft_model was given without target_model: name the target too (the embedded default model "
                "drafts with its own first layers, set with draft_layers)"
            )
        self._check_what_applies()
        for role in ("target", "draft"):
            model = getattr(self, f"{role}_model")
            if isinstance(model, torch.nn.Module):
                check_causal_lm(model, role)
                check_object_dtype(model, self.torch_dtype, role)
        try:
            check_tokenizer_spec(self.tokenizer, "tokenizer")
            check_tokenizer_spec(self.draft_tokenizer, "draft_tokenizer")
        except TypeError as exc:  # a ValidationError naming the option, as every option's is
            raise ValueError(str(exc)) from None
        return self

    def _check_served_options(self) -> None:
        """Refuse what a served target cannot use: options of a local target, a draft made of its layers."""
        if self.target_url is None:
            raise ValueError("target_server_options apply to a served target: set target_url as well")
        given = [name for name in ("pair", "draft_layers", "gguf_file", "model_kwargs", "device_map", "max_memory")
                 if getattr(self, name) is not None]  # fmt: skip
        if given:
            raise ValueError(
                f"{given} apply to a local target; with target_url the target runs on the server and only the draft "
                "loads here (draft_model, draft_gguf_file, draft_model_kwargs, device, torch_dtype)"
            )
        if self.draft_model is None:
            raise ValueError(
                "a served target (target_url) needs a local draft_model, speaking the served model's tokenizer"
            )
        if self.target_model is not None and not isinstance(self.target_model, str):
            raise ValueError(
                "with target_url, target_model (model) is the served model's name as the server lists it, "
                f"not a {type(self.target_model).__name__}"
            )
        options = dict(self.target_server_options or {})
        named = sorted({"url", "model"} & options.keys())
        if named:
            raise ValueError(f"target_server_options cannot set {named}: they are target_url and target_model")
        try:  # a bad URL or option fails here, named as the user gave it
            ServedConfig(url=self.target_url, model=self.target_model, **options)
        except ValidationError as exc:
            problems = [f"{_served_option(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
            raise ValueError("; ".join(problems)) from None

    def _check_what_applies(self) -> None:
        """Refuse loading options that nothing would apply (they were once silently dropped)."""
        if self.max_memory is not None and self.device_map is None:
            raise ValueError("max_memory applies only with device_map (accelerate places the model by both): set both")
        if self.pair is not None and self.draft_tokenizer is not None:
            raise ValueError(
                f"pair={self.pair!r} shares one tokenizer between its models: give tokenizer=... to replace it"
            )
        if self.pair is None and self.target_model is None and self.target_url is None:  # the embedded default
            given = [name for name in ("tokenizer", "gguf_file") if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"the embedded default model has its own GGUF and tokenizer: drop {given}, or name a target_model"
                )
        if self.draft_model is None and self.pair is None:  # the draft is the target's first layers
            given = [name for name in ("draft_gguf_file", "draft_model_kwargs", "draft_tokenizer")
                     if getattr(self, name) is not None]  # fmt: skip
            if given:
                raise ValueError(
                    f"{given} apply to a draft_model; the draft here is the target's first layers, which loads nothing"
                )

    # -- the loaded pair, shared ---------------------------------------------------------------

    def load(self) -> ModelPair:
        """The loaded pair (thread-safe, lazy).

        Instances that load the same models with the same loading options (``target_model``,
        ``draft_model``/``draft_layers``, ``tokenizer``, ``gguf_file``, ``device``, ``torch_dtype``,
        ``device_map``, ``trust_remote_code``) share one loaded pair in the process, as the copies that
        ``bind``, ``with_config`` and ``configurable_fields`` make do; decoding options stay per instance.
        The pair is freed when no instance holds it any more.
        """
        load = functools.partial(with_retries, self._load_pair, self.max_retries, "loading the models")
        pair, fresh = self._pairs().get(self._loading_key(), load)
        if fresh:
            self._loaded(pair)
        return pair

    def _loaded(self, pair: ModelPair) -> None:
        """Called once the pair is loaded (or found loaded) for this instance: a subclass checks its options."""

    def _pairs(self) -> PairHandle:
        self._handle = PairHandle.for_owner(self._handle, self)
        return self._handle

    def _loading_key(self) -> tuple[Any, ...]:
        """The registry's key: what makes two pairs the same (objects by identity, options by value)."""
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
            self.target_url,
            repr(self.target_server_options),
        )

    def _load_pair(self) -> ModelPair:
        """Load the pair these options describe (the registry calls this once per key: :func:`shared_pair`), giving the
        loaders copies of the options they could change (:func:`own_copy`)."""
        if self.target_url is not None:
            return load_served_pair(
                self.target_url,
                self.draft_model,
                model=self.target_model,
                tokenizer=self.tokenizer,
                draft_tokenizer=self.draft_tokenizer,
                device=self.device,
                dtype=self.torch_dtype,
                draft_gguf_file=self.draft_gguf_file,
                trust_remote_code=self.trust_remote_code,
                draft_model_kwargs=own_copy(self.draft_model_kwargs),
                server_options=own_copy(self.target_server_options),
            )
        if self.pair is not None:
            return load_packaged_pair(
                self.pair,
                device=self.device,
                dtype=self.torch_dtype,
                tokenizer=self.tokenizer,
                trust_remote_code=self.trust_remote_code,
                device_map=own_copy(self.device_map),
                max_memory=own_copy(self.max_memory),
                model_kwargs=own_copy(self.model_kwargs),
                draft_model_kwargs=own_copy(self.draft_model_kwargs),
            )
        if self.target_model is None:
            return load_embedded_pair(
                draft_layers=self.draft_layers or EMBEDDED_DRAFT_LAYERS,
                device=self.device,
                dtype=self.torch_dtype,
                trust_remote_code=self.trust_remote_code,
                device_map=own_copy(self.device_map),
                max_memory=own_copy(self.max_memory),
                model_kwargs=own_copy(self.model_kwargs),
            )
        return load_pair(
            self.target_model,
            self.draft_model,
            draft_layers=self.draft_layers,
            tokenizer=self.tokenizer,
            device=self.device,
            dtype=self.torch_dtype,
            device_map=own_copy(self.device_map),
            gguf_file=self.gguf_file,
            trust_remote_code=self.trust_remote_code,
            draft_tokenizer=self.draft_tokenizer,
            draft_gguf_file=self.draft_gguf_file,
            max_memory=own_copy(self.max_memory),
            model_kwargs=own_copy(self.model_kwargs),
            draft_model_kwargs=own_copy(self.draft_model_kwargs),
        )

    def pair_tokenizer(self) -> PreTrainedTokenizerBase:
        """The pair's tokenizer, with its chat template, without loading a model's weights while the pair is not
        loaded: counting tokens and rendering a prompt need the tokenizer alone (ChatHuggingFace and ChatOpenAI
        count with a tokenizer only). Once the pair is loaded, its own tokenizer."""
        load = functools.partial(with_retries, self._load_tokenizer, self.max_retries, "loading the tokenizer")
        return self._pairs().tokenizer(self._loading_key(), load)

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer these options give the pair, read as :meth:`_load_pair`'s loader reads it, alone.

        A GGUF holds its tokenizer: the embedded and the packaged models' GGUFs are assembled (and checked) if they
        are not yet, and the tokenizer converted from them is kept, as loading the pair keeps it; no weights load.
        """
        if self.pair is not None:
            spec = PACKAGED_PAIRS[self.pair]
            if self.tokenizer is not None:  # the override load_packaged_pair checks against the pair's sample
                given = load_tokenizer(self.tokenizer, None, trust_remote_code=self.trust_remote_code)
                check_tokenizer(spec, given)
                return given
            folder = cache_dir(spec)
            return packaged_tokenizer(spec, folder, assemble(spec.target, folder, spec.extra))
        if self.target_model is None:  # the embedded default, as load_embedded_pair reads its tokenizer
            path = embedded_gguf_path()
            tokenizer = gguf_tokenizer(path, path.with_name(f"{path.stem}.tokenizer"), check_gguf_tokenizer)
            if tokenizer.chat_template is None:
                tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
            return tokenizer
        target = self.target_model
        by_name = isinstance(target, (str, os.PathLike))
        return load_tokenizer(
            self.tokenizer if self.tokenizer is not None else target if by_name else None,
            target if isinstance(target, PreTrainedModel) else None,  # an object: its tokenizer is saved beside it
            gguf_file=self.gguf_file,
            trust_remote_code=self.trust_remote_code,
            hub=hub_options(self.model_kwargs, same_repository=self.tokenizer is None or self.tokenizer == target),
        )

    # -- copies: the loaded pair and the objects given are shared, the hold on the pair is the copy's own --------

    def __copy__(self) -> Self:
        return super().__copy__()._copied()

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Self:
        """A deep copy of the options; the loaded pair, any model or tokenizer object given and the instance's
        private state (the load lock, the handle) are shared, never copied, and then :meth:`_copied` makes the
        copy its own handle."""
        memo = {} if memo is None else memo
        shared = [*(self.__pydantic_private__ or {}).values(), *(getattr(self, name) for name in MODEL_OBJECTS)]
        memo.update({id(value): value for value in shared if value is not None and not isinstance(value, str)})
        return super().__deepcopy__(memo)._copied()

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy (see :meth:`__copy__`); with ``update``, a copy whose loading options changed gets its own pair."""
        return super().model_copy(update=update, deep=deep)._hold()

    def _copied(self) -> Self:
        """Make a fresh copy its own: it holds its pair through a handle of its own."""
        return self._hold()

    def _hold(self) -> Self:
        """Count this instance as a holder of its loading key's pair from now on (a subclass calls this last in its
        validation, so that only a valid instance holds a pair)."""
        self._pairs().hold(self._loading_key())
        return self

    # -- what the options tell before anything loads ----------------------------------------------

    def loading_identity(self) -> dict[str, Any]:
        """The loading options among LangChain's identifying parameters (its cache key)."""
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
            "target_url": self.target_url,
        }

    @property
    def model_name(self) -> str:
        if self.target_url is not None:  # the served model's name, else the server's address
            return self.target_model if isinstance(self.target_model, str) else self.target_url
        if self.pair is not None:
            return PACKAGED_PAIRS[self.pair].target.filename
        if self.target_model is None:
            return "gemma-3-270m-q4_k_m.gguf"
        if isinstance(self.target_model, str):
            return self.target_model
        return str(getattr(self.target_model, "name_or_path", "") or type(self.target_model).__name__)

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

    def packaged_tool_format(self) -> Literal["hermes", "json"] | None:
        """How a packaged pair's model was seen to write tool calls (None: read it from the template)."""
        return PACKAGED_PAIRS[self.pair].tool_call_format if self.pair is not None else None

    def known_context_window(self) -> int | None:
        """The target's context window where it is known: the loaded pair's, or before loading (see
        :func:`context_window_of`); None when its config states none (the loader then refuses nothing for length)."""
        loaded = self._pairs().pair
        if loaded is not None:
            return loaded.context_window if loaded.context_window < UNKNOWN_WINDOW else None
        if self.target_url is not None:  # the server says, once asked (at loading)
            return None
        window = PACKAGED_PAIRS[self.pair].context_window if self.pair is not None else None
        return window or context_window_of(self.target_model, hub_options(self.model_kwargs))


def _served_option(loc: tuple[Any, ...]) -> str:
    """Where a served target's setting was given (from a validation error's ``loc``): ``target_url``,
    ``target_model`` or a key of ``target_server_options``."""
    field = str(loc[0]) if loc else "url"
    return {"url": "target_url", "model": "target_model"}.get(field, f"target_server_options[{field!r}]")


def _pipeline_of(value: Any) -> Pipeline | None:
    """The transformers pipeline ``value`` is or holds (``HuggingFacePipeline.pipeline``), if any."""
    for candidate in (value, getattr(value, "pipeline", None)):
        if isinstance(candidate, Pipeline):
            return candidate
    return None
