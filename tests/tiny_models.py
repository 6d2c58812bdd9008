"""Tiny random-weight model pairs, saved to a temp dir and loaded back through ``from_pretrained``.

A character-level tokenizer keeps them small and makes step boundaries (``\\n``, ``\\n\\n``) real
tokens; a byte-level BPE tokenizer (GPT-2/Qwen/Llama 3 style, trained here on a small multilingual
corpus) brings what character-level tokenizers hide: multi-byte characters split over tokens, merged
delimiters, special tokens. Weights are random, so the text is gibberish, but greedy decoding is
deterministic, which is all the invariants need.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"()+-*/=<>[]{}_#\n")


def make_tokenizer(extra: str = "") -> PreTrainedTokenizerFast:
    return _char_tokenizer(SPECIALS, ["<|im_start|>", "<|im_end|>"], "<s>", "</s>", CHATML, extra)


def _char_tokenizer(
    specials: list[str], additional: list[str], bos: str, eos: str, template: str, extra: str = ""
) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(specials)}
    for piece in [*CHARS, "\n\n", *extra]:
        vocab.setdefault(piece, len(vocab))
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    # special tokens are matched before pre-tokenization; with special-token parsing off they are plain characters
    inner.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"\n\n|\n|."), behavior="isolated")
    inner.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=inner,
        bos_token=bos,
        eos_token=eos,
        pad_token="<pad>",
        additional_special_tokens=additional,
    )
    tok.chat_template = template
    return tok


LLAMA3_SPECIALS = [
    "<pad>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
]
LLAMA3_EOS = [2, 5, 6]  # end_of_text, eot and eom, as Llama 3.1's generation config lists them
LLAMA3_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
# Written for these tests in the shape of Llama 3.1's template: custom tools in the first user turn with the
# instruction to answer {"name": ..., "parameters": ...}, a call turn rendered as that JSON (parallel calls
# joined by "; ") and ended by <|eom_id|>, tool results in an ipython turn. It names no <tool_call>, so
# ChatSpecGuard reads its calls in the JSON style.
LLAMA3_STYLE_TEMPLATE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\n{% if tools %}Environment: ipython\n{% endif %}"
    "{{ system }}<|eot_id|>"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and m.get('tool_calls') %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% for c in m['tool_calls'] %}{% if not loop.first %}; {% endif %}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}'
    "{% endfor %}<|eom_id|>"
    "{%- elif m['role'] == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if loop.first and tools %}Given the following functions, respond with a JSON for a function call. "
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\n\n'
    "{% for t in tools %}{{ t | tojson }}\n\n{% endfor %}{% endif %}"
    "{{ m['content'] }}<|eot_id|>{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def make_llama3_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level, with Llama 3's control tokens and a Llama-3.1-style tool template."""
    return _char_tokenizer(
        LLAMA3_SPECIALS, LLAMA3_SPECIALS[3:], "<|begin_of_text|>", "<|eot_id|>", LLAMA3_STYLE_TEMPLATE
    )


def _save(model: torch.nn.Module, tok: PreTrainedTokenizerFast, path: Path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _llama(
    vocab: int, layers: int, seed: int, hidden: int = 64, positions: int = 512, eos: list[int] | None = None
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        bos_token_id=1,
        eos_token_id=eos or [2, 4],
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def _qwen(vocab: int, layers: int, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=[2, 4],
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg)


@functools.cache
def tiny_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="specguard-tiny-"))


@functools.cache
def llama_pair() -> tuple[str, str]:
    """(target, draft) directories: a 4-layer and a 2-layer Llama with different random weights."""
    tok = make_tokenizer()
    root = tiny_dir()
    return (
        _save(_llama(len(tok), 4, seed=0), tok, root / "llama-target"),
        _save(_llama(len(tok), 2, seed=1), tok, root / "llama-draft"),
    )


@functools.cache
def qwen_pair() -> tuple[str, str]:
    tok = make_tokenizer()
    root = tiny_dir()
    return (
        _save(_qwen(len(tok), 3, seed=2), tok, root / "qwen-target"),
        _save(_qwen(len(tok), 1, seed=3), tok, root / "qwen-draft"),
    )


@functools.cache
def mismatched_draft() -> str:
    """A draft whose tokenizer numbers the same characters differently."""
    tok = make_tokenizer(extra="é")
    vocab = tok.get_vocab()
    assert len(vocab) > len(make_tokenizer().get_vocab())
    return _save(_llama(len(tok), 2, seed=4), tok, tiny_dir() / "llama-mismatch")


@functools.cache
def long_llama_pair() -> tuple[str, str]:
    """Like ``llama_pair`` but with a 4096-token window: tool prompts are long in characters."""
    tok = make_tokenizer()
    root = tiny_dir()
    return (
        _save(_llama(len(tok), 4, seed=0, positions=4096), tok, root / "long-llama-target"),
        _save(_llama(len(tok), 2, seed=1, positions=4096), tok, root / "long-llama-draft"),
    )


SCRIPTED_EXTRA = "你好啊集团こんにちは株式会社"
"""Characters the standard suite's Unicode tool-call test asks for: a scripted answer can write them."""


@functools.cache
def scripted_pair() -> tuple[str, str]:
    """The smallest pair the standard suite runs on with scripted answers (``tests/scripted.py``): a 2-layer and a
    1-layer Llama, 32 wide, with a 4096-token window (tool prompts are long in characters) and the character-level
    tokenizer extended by :data:`SCRIPTED_EXTRA`."""
    tok = make_tokenizer(extra=SCRIPTED_EXTRA)
    root = tiny_dir()
    return (
        _save(_llama(len(tok), 2, seed=12, hidden=32, positions=4096), tok, root / "scripted-target"),
        _save(_llama(len(tok), 1, seed=13, hidden=32, positions=4096), tok, root / "scripted-draft"),
    )


@functools.cache
def llama3_pair() -> tuple[str, str]:
    """A Llama pair speaking a Llama-3-style tokenizer and chat template (bare JSON tool calls)."""
    tok = make_llama3_tokenizer()
    root = tiny_dir()
    return (
        _save(_llama(len(tok), 4, seed=0, positions=4096, eos=LLAMA3_EOS), tok, root / "llama3-target"),
        _save(_llama(len(tok), 2, seed=1, positions=4096, eos=LLAMA3_EOS), tok, root / "llama3-draft"),
    )


WINDOW = 8
"""Sliding window of the tiny Gemma-3-style pair: every test prompt is longer than this."""


def _gemma(vocab: int, layers: int, seed: int) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(layers)],
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=[2, 4],
        pad_token_id=0,
    )
    return Gemma3ForCausalLM(cfg)


@functools.cache
def gemma_pair() -> tuple[str, str]:
    """Gemma-3-style pair: sliding-window layers (window 8) mixed with full-attention ones."""
    tok = make_tokenizer()
    root = tiny_dir()
    return (
        _save(_gemma(len(tok), 4, seed=5), tok, root / "gemma-target"),
        _save(_gemma(len(tok), 2, seed=6), tok, root / "gemma-draft"),
    )


BPE_CORPUS = (
    "The sum of 3 and 5 is 8.\n\nStep 1: add the apples.\nStep 2: count them again.\n\n"
    "Café crème, naïve façade, über Straße. 日本語のテキストと中文文本。 Emoji 😀🎉👍 and ü é è ñ.\n"
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 2"}}\n</tool_call>\n'
    "def f(x):\n    return x * 2  # double\n\nAnswer: 42\n"
)


@functools.cache
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with merges (so ``\\n\\n``, ``.\\n`` and parts of characters are tokens)."""
    inner = Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    inner.train_from_iterator([BPE_CORPUS] * 20, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=inner,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHATML
    return tok


@functools.cache
def bpe_pair() -> tuple[str, str]:
    """A Qwen2 pair speaking the byte-level BPE tokenizer."""
    tok = bpe_tokenizer()
    root = tiny_dir()
    return (
        _save(_qwen(len(tok), 3, seed=7), tok, root / "bpe-target"),
        _save(_qwen(len(tok), 1, seed=8), tok, root / "bpe-draft"),
    )


THINK_MARKERS = ("<think>", "</think>")
THINKING_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n"
    "Reply with <tool_call></tool_call> blocks.<|im_end|>\n{% endif %}"
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.index0 > ns.last_user and m.reasoning_content %}"
    "<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking "
    "is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% else %}{{ '<think>\\n' }}{% endif %}{% endif %}"
)
"""A reasoning model's template in the style of Qwen3-Thinking and DeepSeek-R1 distills: the generation prompt
opens the think block (``enable_thinking=False`` closes it at once, as Qwen3 does), tools and tool turns are
rendered Qwen-style, and the reasoning of assistant turns after the last user message (a tool loop) is rendered
back from ``reasoning_content`` (earlier turns' thinking is dropped)."""


def thinking_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer with ``<think>``/``</think>`` as tokens of their own (not special: as in
    Qwen3 and the R1 distills) and :data:`THINKING_TEMPLATE`."""
    tok = make_tokenizer()
    tok.add_tokens(list(THINK_MARKERS))
    tok.chat_template = THINKING_TEMPLATE
    return tok


@functools.cache
def thinking_pair() -> tuple[str, str]:
    """A Llama pair speaking :func:`thinking_tokenizer` (a 4096-token window: tool prompts are long in characters)."""
    tok = thinking_tokenizer()
    root = tiny_dir()
    return (
        _save(_llama(len(tok), 4, seed=10, positions=4096), tok, root / "thinking-target"),
        _save(_llama(len(tok), 2, seed=11, positions=4096), tok, root / "thinking-draft"),
    )


def tokenizer_gguf(path: Path, weights: bool = False) -> Path:
    """A GGUF file holding :func:`bpe_tokenizer` (its vocabulary, merges and special tokens) and a tiny Llama's
    header: what ``AutoTokenizer.from_pretrained(folder, gguf_file=...)`` converts. ``weights``: with random float32
    weights too (seeded), so that ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` loads it."""
    import json

    import gguf
    import numpy as np

    tok = bpe_tokenizer()
    data = json.loads(tok.backend_tokenizer.to_str())
    added = {a["id"]: a["content"] for a in data["added_tokens"]}
    tokens = {**{i: t for t, i in data["model"]["vocab"].items()}, **added}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([tokens[i] for i in range(len(tokens))])
    kinds = [gguf.TokenType.CONTROL if i in added else gguf.TokenType.NORMAL for i in range(len(tokens))]
    writer.add_token_types(kinds)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    if weights:  # llama.cpp's tensor names, as transformers' GGUF loader maps them
        writer.add_head_count_kv(2)
        writer.add_layer_norm_rms_eps(1e-5)
        rng = np.random.default_rng(0)
        shapes = {"token_embd": (len(tokens), 8), "output_norm": (8,), "output": (len(tokens), 8)}
        shapes |= {f"blk.0.{n}": (8,) for n in ("attn_norm", "ffn_norm")}
        shapes |= {f"blk.0.{n}": (8, 8) for n in ("attn_q", "attn_k", "attn_v", "attn_output")}
        shapes |= {"blk.0.ffn_gate": (16, 8), "blk.0.ffn_up": (16, 8), "blk.0.ffn_down": (8, 16)}
        for name, shape in shapes.items():
            writer.add_tensor(f"{name}.weight", rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
