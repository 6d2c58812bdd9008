"""Engine views: a second model object over the caller's weights, running the engine's attention.

The engine needs its own attention kernel on every layer (explicit masks, packed grouped-query heads,
step-attention capture) and, for a self-speculative draft, a model with only the first ``k`` layers.
transformers' attention modules read their kernel from ``self.config``, so the view gives the modules
on the path to each attention module (the model, its decoder, the layer list, each layer and its
attention) new Python objects with a config copy naming :data:`~.attention.IMPL_NAME`. Parameters,
buffers and every other module are the caller's own objects: nothing is copied and nothing the caller
holds (the model, its config, its modules, their ``training`` flags) is changed.

On a CPU the view also computes its linear layers as :class:`SkinnyLinear` (the caller's weights, another
layout of the same product). Two views are for drafts alone, whose numbers only propose what the target then
checks: :func:`subset_head_view` gives an LM head over a subset of the vocabulary, and :func:`int8_view`
computes every linear layer in int8 (:class:`Int8Linear`). They are the only views that copy weights: those
rows of the head, and the int8 copy (a quarter of the float32 bytes).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import types
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from transformers import PreTrainedModel

from .attention import IMPL_NAME, decoder_layers


def _shallow(module: torch.nn.Module) -> Any:
    """A new module object sharing ``module``'s parameters, buffers and children (its own child table).

    Methods bound to ``module`` on the instance (accelerate's device hooks replace ``forward`` with a
    ``partial(new_forward, module)`` and keep ``_old_forward`` bound) are bound to the clone instead,
    so the clone runs its own children.
    """
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone.training = False
    for name, value in vars(module).items():
        if isinstance(value, types.MethodType) and value.__self__ is module:
            setattr(clone, name, types.MethodType(value.__func__, clone))
        elif isinstance(value, functools.partial) and value.args and value.args[0] is module:
            setattr(clone, name, functools.partial(value.func, clone, *value.args[1:], **value.keywords))
    return clone


SKINNY_ROWS = 16
"""Most rows :class:`SkinnyLinear` computes as ``weight @ x.T``; more go through ``F.linear``."""


class SkinnyLinear(torch.nn.Linear):
    """A linear layer over the caller's weight and bias, computed as ``(weight @ x.T).T`` for 2 to
    :data:`SKINNY_ROWS` rows on a CPU.

    ``F.linear`` computes ``x @ weight.T``. With a handful of rows (a draft's candidates, a verified step) MKL's
    kernel for that layout repacks the whole weight on every call: on an AVX2 CPU two rows cost more than twice
    one row, where ``weight @ x.T`` streams the weight once for all of them and costs little more than one row
    (benchmarks/cpu_matmul.py). Same product, other summation order: float rounding differs, nothing else.
    One row and long passes keep ``F.linear``.
    """

    @staticmethod
    def of(linear: torch.nn.Linear) -> SkinnyLinear:
        clone = _shallow(linear)
        clone.__class__ = SkinnyLinear
        return clone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x.shape[-1]
        rows = x.numel() // max(1, features)
        if not 1 < rows <= SKINNY_ROWS or x.device.type != "cpu":
            return torch.nn.functional.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, features).T
        out = torch.mm(self.weight, flat) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, flat)
        return out.T.reshape(*x.shape[:-1], self.out_features)


def _replaced(module: torch.nn.Module, make: Callable[[torch.nn.Module], torch.nn.Module | None]) -> torch.nn.Module:
    """``module`` with every module below it for which ``make`` gives a replacement replaced (shallow clones on the
    way down, and only where something below changes; the caller's modules are left as they are)."""
    made = make(module)
    if made is not None:
        return made
    children = {name: _replaced(child, make) for name, child in module._modules.items() if child is not None}
    if all(children[name] is module._modules[name] for name in children):
        return module
    clone = _shallow(module)
    clone._modules.update(children)
    return clone


def _skinny(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every plain ``nn.Linear`` below it seen as a :class:`SkinnyLinear`. Subclasses (quantised
    layers) keep their own forward."""
    return _replaced(
        module, lambda m: SkinnyLinear.of(m) if isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear else None
    )


def _on_cpu(model: torch.nn.Module) -> bool:
    """Whether every weight of ``model`` lies in CPU memory as a plain float tensor (no offload, no quantisation)."""
    return all(p.device.type == "cpu" and p.dtype.is_floating_point for p in model.parameters())


def int8_available() -> bool:
    """Whether this torch runs int8 dynamically quantized linear layers (fbgemm or oneDNN on x86, qnnpack on Arm)."""
    ops = torch.ops.quantized
    return hasattr(ops, "linear_prepack") and hasattr(ops, "linear_dynamic") and bool(torch.backends.quantized.engine)


def use_int8(choice: bool | None, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a draft runs in int8 (``draft_int8``): None, wherever it can (float32 weights on a CPU with quantized
    kernels); True where it cannot is an error that names why."""
    possible = device.type == "cpu" and dtype == torch.float32 and int8_available()
    if choice and not possible:
        raise ValueError(
            f"draft_int8=True needs the draft's float32 weights on a CPU with quantized kernels; this draft is "
            f"{dtype} on {device.type}{'' if int8_available() else ' and this torch has no quantized kernels'}: "
            "leave draft_int8 unset"
        )
    return possible if choice is None else choice


def _pack_int8(weight: torch.Tensor) -> Any:
    """``weight`` in int8, one symmetric scale per output row, packed for ``quantized::linear_dynamic`` (the bias
    is added after the per-token rescaling of :func:`_linear_int8`)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # quantized tensors are the op's input format (deprecated as a user-facing dtype)
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)


@functools.cache
def _grid_row(features: int) -> torch.Tensor:
    """A row holding +1 and -1: beside inputs scaled into [-1, 1] it fixes the op's input range to [-1, 1]."""
    row = torch.zeros(1, features)
    row[0, 0], row[0, min(1, features - 1)] = 1.0, -1.0
    return row


def _linear_int8(x: torch.Tensor, packed: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` with ``weight`` int8 (``packed``) and each token's input quantized on its own scale.

    ``quantized::linear_dynamic`` quantizes its whole input on one scale taken from the input's range, so one row's
    numbers would depend on the others in the batch, and one call's draft on another call's traffic. Here each
    token is divided by its own largest magnitude first and a row of +1 and -1 rides along: the op's range is then
    always [-1, 1], every token is quantized on the same grid, and its output, scaled back, is its own alone.
    """
    flat = x.reshape(-1, x.shape[-1]).float()
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    # reduce_range: 7-bit activations, so AVX2's 16-bit accumulation of pairs of products never saturates
    out = torch.ops.quantized.linear_dynamic(torch.cat([flat / scale, _grid_row(flat.shape[1])]), packed, True)
    out = out[:-1] * scale
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


class Int8Linear(torch.nn.Module):
    """A draft's linear layer in int8: weights quantized per output row once, each call's input quantized on the
    fly (``quantized::linear_dynamic``). On an AVX2 CPU it is 3 to 8 times faster than the float32 layer, and a
    few rows cost about one (benchmarks/cpu_matmul.py); its outputs differ from the float32 layer's by about 2%
    of their range, which moves only what the draft proposes: the target checks every token in float32.
    ``nbytes``: the weight bytes one call reads."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed = _pack_int8(linear.weight)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.nbytes = linear.weight.numel() + (0 if linear.bias is None else 4 * linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear_int8(x, self._packed, self.bias)


_EXTRA_ROWS: ContextVar[tuple[torch.Tensor, torch.Tensor | None] | None] = ContextVar("extra_rows", default=None)


@contextlib.contextmanager
def extra_rows(weight: torch.Tensor, bias: torch.Tensor | None) -> Iterator[None]:
    """Inside the block a :class:`SubsetHead` also gives, per batch row ``b``, the logits of head rows
    ``weight[b] [E, d]`` (plus ``bias[b] [E]``), after its own columns: each sequence's own extra tokens."""
    token = _EXTRA_ROWS.set((weight, bias))
    try:
        yield
    finally:
        _EXTRA_ROWS.reset(token)


class SubsetHead(SkinnyLinear):
    """An LM head over the rows ``ids`` of the caller's head (FR-Spec's frequency-ranked draft head), computed
    like every CPU linear layer of a view, or in int8 (:meth:`in_int8`).

    Its logits are over ``ids`` alone (column ``j`` is token ``ids[j]``), then, inside :func:`extra_rows`, over
    each batch row's own extra rows; :class:`~.runner.ModelRunner` maps what it samples back to token ids, and
    gives the other tokens probability 0 wherever it needs a whole distribution. ``vocab_size``: the caller's
    head's columns; ``source``: its weight and bias (the extra rows are read from them).
    """

    ids: torch.Tensor
    vocab_size: int
    source: tuple[torch.Tensor, torch.Tensor | None]
    packed: Any = None  # the int8 form of ``weight`` (None: float)

    @staticmethod
    def over(head: torch.nn.Linear, ids: torch.Tensor) -> SubsetHead:
        layer = SubsetHead(head.in_features, len(ids), bias=head.bias is not None, device="meta")
        index = ids.to(head.weight.device)
        layer.weight = torch.nn.Parameter(head.weight.detach().index_select(0, index), requires_grad=False)
        if head.bias is not None:
            layer.bias = torch.nn.Parameter(head.bias.detach().index_select(0, index), requires_grad=False)
        layer.register_buffer("ids", index, persistent=False)
        layer.vocab_size = head.out_features
        # (a plain attribute: the caller's tensors, not parameters of this module)
        layer.__dict__["source"] = (head.weight.detach(), None if head.bias is None else head.bias.detach())
        layer.training = False
        return layer

    def in_int8(self) -> SubsetHead:
        """The same head computing its own columns in int8 (the extra rows stay float: a handful per row)."""
        clone = _shallow(self)
        clone.packed = _pack_int8(self.weight)
        return clone

    @property
    def nbytes(self) -> int:
        """Weight bytes one call reads (its own columns)."""
        return self.weight.numel() * (1 if self.packed is not None else self.weight.element_size())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _linear_int8(x, self.packed, self.bias) if self.packed is not None else super().forward(x)
        extra = _EXTRA_ROWS.get()
        if extra is None:
            return out
        weight, bias = extra
        own = torch.matmul(x.reshape(weight.shape[0], -1, x.shape[-1]), weight.transpose(1, 2))  # [b, q, E]
        if bias is not None:
            own = own + bias[:, None, :]
        return torch.cat([out, own.reshape(*x.shape[:-1], -1)], dim=-1)


def subset_head_view(view: PreTrainedModel, ids: torch.Tensor) -> PreTrainedModel:
    """``view`` (an :func:`engine_view`) whose LM head computes the logits of ``ids`` only (sorted token ids)."""
    head = view.get_output_embeddings()
    if type(head) not in (torch.nn.Linear, SkinnyLinear):
        raise TypeError(f"a subset head needs a plain linear LM head, {type(view).__name__} has {type(head).__name__}")
    if ids.dim() != 1 or len(ids) == 0 or int(ids.max()) >= head.out_features or int(ids.min()) < 0:
        raise ValueError(f"subset head ids must be a non-empty list of rows of the head's {head.out_features}")
    clone = _shallow(view)
    name = next(n for n, m in view.named_children() if m is head)
    clone._modules[name] = SubsetHead.over(head, ids)
    return clone


def _int8(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every float linear layer below it in int8."""

    def make(m: torch.nn.Module) -> torch.nn.Module | None:
        if isinstance(m, SubsetHead):
            return m.in_int8()
        if type(m) in (torch.nn.Linear, SkinnyLinear):
            assert isinstance(m, torch.nn.Linear)
            return Int8Linear(m)
        return None

    return _replaced(module, make)


def int8_view(view: PreTrainedModel) -> PreTrainedModel:
    """``view`` (an :func:`engine_view`, perhaps with a subset head) computing every linear layer of its decoder
    layers and its LM head in int8. For a draft on a CPU: float32 weights, an x86 or Arm CPU (:func:`int8_available`).
    """
    if view.dtype != torch.float32 or not _on_cpu(view) or not int8_available():
        raise ValueError(f"an int8 draft needs float32 weights on a CPU with quantized kernels, not {view.dtype}")
    clone = _shallow(view)
    decoder = _shallow(view.model)
    decoder._modules["layers"] = torch.nn.ModuleList(_int8(layer) for layer in decoder_layers(view))
    clone._modules["model"] = decoder
    head = view.get_output_embeddings()
    name = next(n for n, m in view.named_children() if m is head)
    clone._modules[name] = _int8(head)
    return clone


def read_bytes(view: PreTrainedModel) -> int:
    """Weight bytes one decode step of ``view`` reads: every parameter but an input embedding that is not also the
    LM head (a lookup reads one row), int8 layers at their int8 size (their packed weights are not parameters)."""
    embedding = view.get_input_embeddings().weight
    head = view.get_output_embeddings()
    skip = set() if getattr(head, "weight", None) is embedding else {id(embedding)}
    int8 = [m for m in view.modules() if isinstance(m, Int8Linear | SubsetHead) and getattr(m, "packed", 1) is not None]
    for module in int8:
        skip |= {id(p) for p in module.parameters()}  # (an int8 subset head keeps its float rows for the extras)
    unique = {id(p): p for p in view.parameters() if id(p) not in skip}
    return sum(p.numel() * p.element_size() for p in unique.values()) + sum(m.nbytes for m in int8)


def layer_windows(config: Any) -> list[int | None]:
    """Per decoder layer, the sliding-window size it attends within, or None for full attention."""
    n = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if kind == "sliding_attention" else None for kind in list(types)[:n]]
    if window and getattr(config, "use_sliding_window", True):  # Mistral: every layer slides
        return [int(window)] * n
    return [None] * n


def engine_view(model: PreTrainedModel, num_layers: int | None = None) -> PreTrainedModel:
    """``model`` seen through the engine's attention; with ``num_layers=k``, only its first ``k`` layers.

    The result is a ``PreTrainedModel`` of the same class whose forward is the caller's own modeling
    code: embeddings, rotary tables, norms and LM head are the caller's modules. On a CPU its linear layers
    (the decoder layers' and the LM head) are :class:`SkinnyLinear` views of the caller's.
    """
    layers = decoder_layers(model)
    count = len(layers) if num_layers is None else num_layers
    if not 1 <= count <= len(layers):
        raise ValueError(f"a view needs between 1 and {len(layers)} layers, got {count}")
    skinny = _on_cpu(model)
    config = copy.deepcopy(model.config)
    config._attn_implementation_internal = IMPL_NAME
    config.num_hidden_layers = count
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:count]
    view = _shallow(model)
    decoder = _shallow(model.model)
    own_layers = torch.nn.ModuleList()
    for layer in list(layers)[:count]:
        new_layer = _shallow(layer)
        if hasattr(new_layer, "config"):
            new_layer.config = config
        attention = getattr(layer, "self_attn", None)
        if attention is None or not hasattr(attention, "config"):
            raise TypeError(f"decoder layer of {type(model).__name__} has no `self_attn` with a config")
        new_attention = _shallow(attention)
        new_attention.config = config
        new_layer._modules["self_attn"] = new_attention
        if skinny:
            for name, child in list(new_layer._modules.items()):
                if child is not None:
                    new_layer._modules[name] = _skinny(child)
        own_layers.append(new_layer)
    decoder._modules["layers"] = own_layers
    decoder.config = config
    view._modules["model"] = decoder
    view.config = config
    head = model.get_output_embeddings()
    if skinny and type(head) is torch.nn.Linear:
        name = next(n for n, m in model.named_children() if m is head)
        view._modules[name] = SkinnyLinear.of(head)
    return view
