"""Real-shape model pairs without weights: measure speed at 7B scale with no download.

A pair is built on the device from the real architecture configs (Qwen2.5-7B/0.5B, Llama-3.1-8B/3.2-1B)
with *planted* weights, so every layer costs exactly what it costs in the real model while the output
is known in advance:

- every decoder layer's output projections (``o_proj``, ``down_proj``) are zero: attention and MLP run
  at full size, but the residual stream stays the token embedding;
- the LM head row of token ``f(t)`` is the embedding of ``t`` (``t`` normalised dotted with itself beats
  every other row by ~``sqrt(hidden)`` standard deviations), so the target predicts the fixed next token
  ``f(t)`` with probability ~1, ``f`` a random permutation of the ordinary tokens;
- the draft follows the same ``f`` except on a chosen share of tokens, where it predicts another token:
  ``agreement`` is the share of tokens on which the draft predicts what the target would.

A vocabulary-sized word-level tokenizer (``w0 w1 ...``, specials after the ordinary tokens) goes with
them; no token text holds a newline, so steps run to ``max_step_tokens``.

    python -m langchain_specguard.apps.bench --synthetic qwen2.5-7b:qwen2.5-0.5b --agreement 0.97
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from ..engine.attention import decoder_layers
from ..engine.loading import ModelPair, context_window

_QWEN = {"model_type": "qwen2", "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}
_LLAMA = {
    "model_type": "llama",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": {
        **_QWEN,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
    },
    "qwen2.5-1.5b": {
        **_QWEN,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
    },
    "qwen2.5-0.5b": {
        **_QWEN,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
    },
    "llama-3.1-8b": {
        **_LLAMA,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
    "llama-3.2-1b": {
        **_LLAMA,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
    },
}
ORDINARY = {"qwen2": 151643, "llama": 128000}
"""Ordinary (non-special) token count of each family's tokenizer: the planted maps stay inside it."""


def synthetic_tokenizer(ordinary: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: token ``i`` is the word ``w<i>``; three specials follow the ordinary tokens."""
    vocab = {f"w{i}": i for i in range(ordinary)}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for name in specials:
        vocab[name] = len(vocab)
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inner.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=inner,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )


def _build(shape: str, device: str, dtype: torch.dtype, vocab_size: int | None = None) -> PreTrainedModel:
    spec = dict(SHAPES[shape])
    if vocab_size is not None:  # the draft takes the target's vocabulary size (as assisted generation needs)
        spec["vocab_size"] = vocab_size
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, tie_word_embeddings=False, eos_token_id=None)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _plant(model: PreTrainedModel, mapping: torch.Tensor, seed: int) -> None:
    """Zero the output projections, draw N(0, 1) embeddings, and point the LM head along ``mapping``."""
    generator = torch.Generator(device=mapping.device).manual_seed(seed)
    layer: Any
    with torch.no_grad():
        for layer in decoder_layers(model):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embedding: Any = model.get_input_embeddings().weight
        embedding.copy_(torch.randn(embedding.shape, generator=generator, device=embedding.device))
        point_head(model, mapping)


def point_head(model: PreTrainedModel, mapping: torch.Tensor) -> None:
    """LM head rows so that token ``t`` predicts ``mapping[t]`` (ordinary tokens only)."""
    embedding: Any = model.get_input_embeddings().weight
    head: Any = model.get_output_embeddings().weight
    n = mapping.shape[0]
    with torch.no_grad():
        head.zero_()
        head.index_add_(0, mapping, embedding[:n].to(head.dtype))


def next_token_maps(ordinary: int, agreement: float, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's next-token permutation, and the draft's copy of it with ``1 - agreement`` of tokens changed."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    target = torch.randperm(ordinary, generator=generator)
    draft = target.clone()
    changed = torch.randperm(ordinary, generator=generator)[: round((1.0 - agreement) * ordinary)]
    shift = torch.randint(1, ordinary, (changed.shape[0],), generator=generator)
    draft[changed] = (target[changed] + shift) % ordinary  # anything but the target's token
    return target.to(device), draft.to(device)


@dataclass
class SyntheticPair(ModelPair):
    """A planted pair and its next-token maps: the target writes ``target_map[token]`` after ``token``, the draft
    ``draft_map[token]`` (equal on the agreeing share of tokens)."""

    target_map: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    draft_map: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


def synthetic_pair(
    target_shape: str,
    draft_shape: str | None,
    agreement: float = 1.0,
    *,
    draft_layers: int | None = None,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> SyntheticPair:
    """A planted pair; ``draft_shape=None`` with ``draft_layers=k`` makes a self-speculative draft."""
    from ..engine.loading import self_speculative_draft

    family = SHAPES[target_shape]["model_type"]
    ordinary = ORDINARY[family]
    target_map, draft_map = next_token_maps(ordinary, agreement, seed, device)
    target = _build(target_shape, device, dtype)
    _plant(target, target_map, seed)
    if draft_shape is None:
        assert draft_layers is not None, "a synthetic pair needs a draft shape or draft_layers"
        draft = self_speculative_draft(target, draft_layers)  # shares the target's head: agreement 1
    else:
        draft = _build(draft_shape, device, dtype, vocab_size=SHAPES[target_shape]["vocab_size"])
        _plant(draft, draft_map, seed + 1)
    tokenizer = synthetic_tokenizer(ordinary)
    eos = tokenizer.eos_token_id
    assert isinstance(eos, int)
    return SyntheticPair(
        target=target,
        draft=draft,
        tokenizer=tokenizer,
        eos_token_ids=frozenset({eos}),
        context_window=context_window(target),
        draft_layers=draft_layers,
        name=f"synthetic {target_shape}:{draft_shape or f'first {draft_layers} layers'} (agreement {agreement:g})",
        target_map=target_map,
        draft_map=draft_map,
    )


def set_agreement(pair: SyntheticPair, agreement: float, seed: int = 0) -> None:
    """Re-point the draft's LM head for another agreement level (same target, same draft body)."""
    ordinary = int(pair.target_map.shape[0])
    target_map, draft_map = next_token_maps(ordinary, agreement, seed, str(pair.target_map.device))
    assert torch.equal(target_map, pair.target_map)
    point_head(pair.draft, draft_map)
    pair.draft_map = draft_map
    pair.name = pair.name.rsplit(" (agreement", 1)[0] + f" (agreement {agreement:g})"


def synthetic_prompts(pair: SyntheticPair, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Random ordinary tokens."""
    ordinary = int(pair.target_map.shape[0])
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, ordinary, (length,), generator=generator).tolist() for _ in range(count)]
