"""Convert the packaged pair's GGUF files to bf16 safetensors once, so worker processes load in seconds.

    python -m research.gsm8k.convert --gguf-dir /tmp/w/gguf --tokenizer /tmp/w/tokenizer --out /tmp/w [--only draft]

The tokenizer is taken from ``--tokenizer`` (saved by a transformers release that converts Qwen's GGUF
tokenizer right) and checked; the weights are dequantised by transformers' own GGUF loader.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from langchain_specguard.engine.packaged import QWEN_CODER, check_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf-dir", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", choices=["target", "draft"], default=None)
    args = parser.parse_args()
    out = Path(args.out)
    tok = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=False)
    check_tokenizer(QWEN_CODER, tok)
    if not (out / "tokenizer").exists():
        shutil.copytree(args.tokenizer, out / "tokenizer")
    for role, spec in (("target", QWEN_CODER.target), ("draft", QWEN_CODER.draft)):
        if args.only not in (None, role):
            continue
        started = time.time()
        model = AutoModelForCausalLM.from_pretrained(
            args.gguf_dir, gguf_file=spec.filename, dtype=torch.bfloat16, trust_remote_code=False
        )
        model.hf_quantizer = None  # dequantised already: save it as the plain bf16 model it now is
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out / role)
        tok.save_pretrained(out / role)
        print(f"{role}: {spec.filename} -> {out / role} in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
