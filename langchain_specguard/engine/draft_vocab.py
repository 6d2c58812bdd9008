"""The draft's vocabulary on a CPU: an LM head over the tokens text is mostly made of (FR-Spec's idea).

A draft pays its whole LM head every token: Gemma 3 270M's head (262,144 x 640) is 62% of the model's weights,
Qwen2.5-0.5B's (151,936 x 896) 28%, so on a CPU, where a token costs the bytes of weight it reads, a self-draft
of any depth costs at least the head. FR-Spec (Zhao et al., 2025, "FR-Spec: Accelerating Large-Vocabulary
Language Models via Frequency-Ranked Speculative Sampling") restricts the *draft's* head to the most frequent
tokens; the target still computes its whole distribution and checks every token, so what the target writes is
unchanged, and a token the draft cannot propose is one the target writes itself.

The ranking needs no corpus: a BPE vocabulary lists its merged tokens in the order the merges were learnt, the
most frequent pairs first (Qwen's byte-level BPE, Gemma's SentencePiece BPE), and its single characters as an
alphabet block, also most frequent first in SentencePiece (byte-level BPE puts its 256 bytes first). So the
subset is the ``size`` lowest-id multi-character tokens, the ``size // 32`` lowest-id single characters, and the
tokens the engine must be able to propose: end-of-sequence ids, special tokens and added tokens that are text
(tool-call and think markers). On GSM8K test text (never used to choose it) 32,768 such tokens covered 95.8% of
Gemma 3's tokens and 96.4% of Qwen2.5's, on this repository's README 92% and 94% (benchmarks/cpu_profile.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from .params import SpecGuardParams


def frequent_ids(
    tokenizer: PreTrainedTokenizerBase, size: int, columns: int, always: Iterable[int] = ()
) -> torch.Tensor:
    """Sorted token ids of the draft's subset head: ``size`` multi-character tokens and ``size // 32`` (at least
    256) single characters, lowest ids first, the tokenizer's special and added text tokens and ``always``; all
    below ``columns`` (the logit columns the draft may propose)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), columns))))
    single = [i for i, p in enumerate(pieces) if isinstance(p, str) and len(p) == 1]
    multi = [i for i, p in enumerate(pieces) if not (isinstance(p, str) and len(p) == 1)]
    chosen = set(multi[:size]) | set(single[: max(256, size // 32)])
    added = getattr(tokenizer, "added_tokens_decoder", {})
    chosen |= {i for i, t in added.items() if not getattr(t, "special", True)}  # markers written as text
    chosen |= set(tokenizer.all_special_ids) | set(always)
    return torch.tensor(sorted(i for i in chosen if 0 <= i < columns), dtype=torch.long)


def draft_head_size(params: SpecGuardParams, columns: int) -> int:
    """Multi-character tokens the draft's head covers for ``params`` (0: the whole head).

    Off unless asked for (``draft_vocab``): on the CPU profile of issue 30 it made an all-layer int8 self-draft
    of the embedded Gemma about 6% faster (benchmarks/results/cpu/), while logits over a subset of columns are
    what anything that reads or shapes a draft's logits by token id (a grammar's mask, a scripted or patched
    forward) does not expect. A draft that scores its own steps (``signal_source="draft"``) keeps its whole
    distribution. The same choice on every device.
    """
    if params.signal_source != "target" or params.draft_vocab is None:
        return 0
    return params.draft_vocab if params.draft_vocab < columns else 0
