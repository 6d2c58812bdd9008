"""Decoding parameters: one validated home shared by the engine and ``ChatSpecGuard``."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, Field, field_validator, model_validator

CUDA_CANDIDATES = 4
"""Draft candidates per step on a GPU when ``n_candidates`` is None (a batch of rows costs about one row there)."""
CPU_CANDIDATES = 1
"""Draft candidates per step elsewhere (a CPU pays compute for every row; benchmarks/results/cpu_*)."""


class SpecGuardParams(BaseModel):
    """How SpecGuard drafts, verifies and falls back. See ``shared/design/specguard.md``.

    ``ChatSpecGuard`` inherits these fields, so they validate the same way in both places.
    """

    n_candidates: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Draft continuations sampled per step, in one batch; the most consistent is verified. None "
        "(default): 4 on a GPU, where a batch of rows costs about what one row does; 1 on a CPU, where every "
        "extra row costs compute the target's own decoding never pays (on two CPU cores four candidates made a "
        "call 1.5 to 2 times slower than one: benchmarks/results/cpu_*).",
    )
    acceptance_threshold: float | Literal["auto"] = Field(
        default=0.5,
        description=(
            "A draft step is accepted when its score is >= this. Any finite value: above 1 every step goes to "
            "the target, below 0 every draft step is accepted. With the default confidence_method='ratio' the "
            "score is scale-free (the worst token's probability over the target's own first choice), so one "
            "value serves every pair. 'auto': a low quantile (calibration_quantile) of the scores of the steps "
            "the target would have written itself, learned within the call (engine/calibration.py); for the "
            "'mean' and 'min' methods, whose scale varies by model; needs signal_source='target'."
        ),
    )
    calibration_quantile: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="With acceptance_threshold='auto': the share of the target's own steps that would fail "
        "the threshold in force (lower accepts more draft steps).",
    )
    decision: Literal["confidence", "both", "weighted"] = Field(
        default="confidence",
        description="What the score is. 'confidence' (default): the scoring model's confidence alone, the signal "
        "that told right from wrong draft steps best on a fine-tuned Gemma 3 270M (README, accuracy); "
        "attention is then not recorded at all. 'both': the smaller of grounding and confidence must clear "
        "the threshold; 'weighted': grounding_weight * grounding + (1 - grounding_weight) * confidence.",
    )
    grounding_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    confidence_method: Literal["mean", "min", "ratio"] = Field(
        default="ratio",
        description="How a step's tokens make its confidence. 'ratio' (default): the smallest, over the step's "
        "tokens, of the target's probability of the token over its probability of its own first choice there "
        "(1: every token is the target's choice); scale-free, and it measured best on a real pretrained pair "
        "(README, accuracy). 'min': the least likely token's probability; 'mean': the geometric-mean "
        "probability, which forgives one wrong token (a number, a name) in a long step. With 'ratio' and 'min' "
        "each token passes or fails on its own, so a rejected step keeps its tokens up to the first that fails.",
    )
    signal_source: Literal["draft", "target"] = Field(
        default="target",
        description="Which model's attention and log-probs score the step. 'target' costs one parallel "
        "target pass per step, which also fills the target's cache; 'draft' is free but lets the draft "
        "grade itself.",
    )
    grounding_method: Literal["rollout", "mean"] = Field(
        default="rollout",
        description="'rollout' follows attention through the step's own tokens down the scored layers; "
        "'mean' averages each scored layer's raw attention.",
    )
    score_layers: list[int] | None = Field(
        default=None,
        description="Decoder layer indices (negative allowed) whose attention is scored; None = the last third, "
        "or on models mixing sliding-window and full attention the full-attention layers of the upper half.",
    )
    step_delimiters: list[str] = Field(
        default_factory=lambda: ["\n"],
        description="A chain-of-thought step ends at the first of these after some content. Lines (default) "
        "measured better than paragraphs ('\\n\\n') on a real pair: fewer draft tokens wasted after a wrong one, "
        "and more of the draft's text kept (README, accuracy).",
    )
    max_step_tokens: int = Field(default=48, ge=1, description="Hard cap on one step's length.")
    draft_int8: bool | None = Field(
        default=None,
        description="The draft computes its linear layers in int8 (weights quantized per output row, inputs on the "
        "fly: engine/view.py Int8Linear). Only what the draft proposes changes: the target checks every token in its "
        "own precision, so what it writes is unchanged. On an AVX2 CPU an int8 layer is 3 to 8 times faster than a "
        "float32 one and a few rows cost about one. None (default): on a CPU with float32 weights; never on a GPU.",
    )
    draft_vocab: int | None = Field(
        default=None,
        ge=1,
        description="The draft's LM head covers only this many most frequent multi-character tokens (by the "
        "tokenizer's merge order), the most frequent single characters and the special and marker tokens "
        "(engine/draft_vocab.py, the FR-Spec idea): a large vocabulary's head is most of a small draft's cost. The "
        "target still scores every token with its whole vocabulary, so what it writes is unchanged; a token the "
        "draft cannot propose is one the target writes. None (default): the whole head; 32768 made an "
        "all-layer int8 self-draft of the embedded Gemma about 6% faster on a CPU (benchmarks/results/cpu/). A "
        "value at or above the vocabulary's size keeps "
        "the whole head. Needs signal_source='target' (a draft scoring its own steps keeps its whole distribution).",
    )
    tool_call_markers: tuple[str, str] | None = Field(
        default=None,
        description="(opening, closing) markers of a tool call, e.g. ('<tool_call>', '</tool_call>'). A tool "
        "call is then one step from its opening to its closing marker, whatever the CoT delimiters. "
        "ChatSpecGuard sets this itself when tools are bound.",
    )
    json_tool_calls: bool = Field(
        default=False,
        description='Bare JSON tool calls (Llama 3.x: the answer starts with {"name": ...}) are steps: each call '
        "is one step from its opening brace to the brace that balances it, whatever the CoT delimiters. "
        "ChatSpecGuard sets this itself when tools are bound and the model writes JSON-style calls.",
    )
    max_tool_call_tokens: int = Field(
        default=256, ge=1, description="Hard cap on one tool-call step's length (calls run longer than CoT steps)."
    )
    reasoning_markers: tuple[str, str] | None = Field(
        default=None,
        description="(opening, closing) markers of the think block reasoning models open their answer with, e.g. "
        "('<think>', '</think>'). The block is stepped and verified like any chain of thought, its closing marker "
        "ends a step, and its steps are reported with kind 'reasoning'. ChatSpecGuard uses ('<think>', '</think>') "
        "when this is None and the model thinks (see its `reasoning` option); set it for models with other markers.",
    )
    max_tokens: int = Field(
        default=256,
        ge=1,
        description="Cap on generated tokens per call. Above the model's context window it is an error; when "
        "the prompt leaves fewer tokens than this, the output stops at the window (finish_reason 'length').",
    )
    temperature: float = Field(
        default=0.0, ge=0.0, le=100.0, description="0 = greedy for the kept draft candidate and the target."
    )
    candidate_temperature: float = Field(
        default=0.8,
        gt=0.0,
        le=100.0,
        description="With temperature 0, candidate 0 is greedy and the others are sampled at this temperature.",
    )
    top_p: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the most probable tokens up to this mass."
    )
    top_k: int | None = Field(
        default=None, ge=0, description="Sample among the k most probable tokens only; 0 or None = off."
    )
    min_p: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="Drop tokens less probable than min_p times the most probable one; 0 or None = off.",
    )
    repetition_penalty: float = Field(
        default=1.0,
        gt=0.0,
        allow_inf_nan=False,
        description="Divide the positive logits (multiply the negative ones) of every token already in the "
        "prompt or the output by this, as transformers' generate does; 1 = off, above 1 discourages repeats. "
        "Applies to greedy decoding too.",
    )
    logprobs: bool = Field(
        default=False,
        description="Report each output token's log-probability in response_metadata['logprobs'] (ChatOpenAI's "
        "shape): the target's own distribution where the target scored the token, the draft's for steps the draft "
        "wrote under signal_source='draft'.",
    )
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=20,
        description="With logprobs, also report the most probable alternatives at each position (0 to 20).",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=2**63 - 1,
        description="Seeds the sampling generator for reproducible output. Without one, temperature 0 uses seed 0 "
        "(the same call always gives the same text, sampled extra candidates included) and sampling a fresh seed.",
    )
    cache_implementation: Literal["auto", "dynamic", "static"] = Field(
        default="auto",
        description="'static': KV caches preallocated at fixed addresses (pooled on the loaded pair and reused), "
        "and on CUDA every pass replays a CUDA graph; 'dynamic': caches grow, passes run eagerly. "
        "'auto': static on CUDA, dynamic on the CPU (the faster one on each).",
    )
    compile_decode: bool | None = Field(
        default=None,
        description="Compile the decode iterations (draft and target) with torch.compile (fused kernels) before "
        "capturing them as CUDA graphs. Only where graphs run (static caches on CUDA). None (default): wherever "
        "graphs run; the first call of a process then spends about a minute per model compiling.",
    )

    def on_device(self, device: torch.device) -> SpecGuardParams:
        """These parameters with the defaults that depend on the device filled in (``n_candidates``)."""
        if self.n_candidates is not None:
            return self
        return self.model_copy(update={"n_candidates": CUDA_CANDIDATES if device.type == "cuda" else CPU_CANDIDATES})

    @property
    def candidates(self) -> int:
        """``n_candidates``, once :meth:`on_device` has filled it in."""
        if self.n_candidates is None:
            raise ValueError("n_candidates=None is filled in by on_device(device) before decoding")
        return self.n_candidates

    @property
    def uses_grounding(self) -> bool:
        """Whether the decision reads attention grounding (only then is step attention recorded)."""
        return self.decision == "both" or (self.decision == "weighted" and self.grounding_weight > 0)

    @property
    def step_cap(self) -> int:
        """The most tokens one step can take (tool-call steps may run longer than reasoning steps)."""
        calls = self.tool_call_markers is not None or self.json_tool_calls
        return max(self.max_step_tokens, self.max_tool_call_tokens) if calls else self.max_step_tokens

    @property
    def candidate_temperatures(self) -> list[float]:
        """Each draft candidate's sampling temperature: greedy calls keep one greedy candidate and sample the
        others at ``candidate_temperature`` for the consistency vote."""
        n = self.candidates
        if self.temperature == 0:
            return [0.0] + [self.candidate_temperature] * (n - 1)
        return [self.temperature] * n

    @field_validator("acceptance_threshold")
    @classmethod
    def _finite_threshold(cls, value: float | str) -> float | str:
        if isinstance(value, str):
            return value
        if not math.isfinite(value):
            raise ValueError(f"acceptance_threshold must be a finite number, got {value!r}")
        return value

    @model_validator(mode="after")
    def _target_scored_rules(self) -> SpecGuardParams:
        if self.acceptance_threshold == "auto" and self.signal_source != "target":
            raise ValueError(
                "acceptance_threshold='auto' needs signal_source='target': it learns from the target's "
                "verification of every step, which signal_source='draft' skips; give signal_source='draft' a fixed "
                "acceptance_threshold, e.g. 0.5"
            )
        if self.confidence_method == "ratio" and self.signal_source != "target":
            raise ValueError(
                "confidence_method='ratio' (the default) compares each token with the target's own first choice, "
                "which signal_source='draft' never computes: with signal_source='draft' use confidence_method='mean' "
                "or 'min' and a fixed acceptance_threshold"
            )
        if self.acceptance_threshold == "auto" and self.confidence_method == "ratio":
            raise ValueError(
                "acceptance_threshold='auto' calibrates scores whose scale varies by model ('mean', 'min'); "
                "confidence_method='ratio' (the default) is already scale-free: give a number (default 0.5)"
            )
        return self

    @model_validator(mode="after")
    def _draft_vocab_needs_target_scores(self) -> SpecGuardParams:
        if self.draft_vocab is not None and self.signal_source != "target":
            raise ValueError(
                f"draft_vocab={self.draft_vocab} needs signal_source='target': with signal_source='draft' the draft's "
                "own probabilities score its steps, and a subset head would change them; leave draft_vocab unset"
            )
        return self

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> SpecGuardParams:
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} needs logprobs=True")
        return self

    @model_validator(mode="after")
    def _compile_needs_static(self) -> SpecGuardParams:
        if self.compile_decode and self.cache_implementation == "dynamic":
            raise ValueError(
                "compile_decode=True needs cache_implementation='static' or 'auto' (it compiles what a CUDA graph "
                "replays, and graphs need fixed addresses)"
            )
        return self

    @model_validator(mode="after")
    def _one_call_syntax(self) -> SpecGuardParams:
        if self.json_tool_calls and self.tool_call_markers is not None:
            raise ValueError(
                "tool_call_markers and json_tool_calls are two tool-call syntaxes: set one of them, not both"
            )
        return self

    @field_validator("tool_call_markers")
    @classmethod
    def _non_empty_markers(cls, value: tuple[str, str] | None) -> tuple[str, str] | None:
        if value is not None and (not value[0] or not value[1]):
            raise ValueError("tool_call_markers must be two non-empty strings, e.g. ('<tool_call>', '</tool_call>')")
        return value

    @field_validator("reasoning_markers")
    @classmethod
    def _distinct_reasoning_markers(cls, value: tuple[str, str] | None) -> tuple[str, str] | None:
        if value is not None and (not value[0].strip() or not value[1].strip() or value[0] == value[1]):
            raise ValueError(
                "reasoning_markers must be two different non-blank strings, e.g. ('<think>', '</think>'); "
                f"got {value!r}"
            )
        return value

    @field_validator("step_delimiters")
    @classmethod
    def _non_empty_delimiters(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("step_delimiters must name at least one delimiter, e.g. ['\\n\\n']")
        if any(not d for d in value):
            raise ValueError("step_delimiters must not contain empty strings")
        return value


PARAM_FIELDS: tuple[str, ...] = tuple(SpecGuardParams.model_fields)
