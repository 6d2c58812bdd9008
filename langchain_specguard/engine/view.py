"""Engine views: a second model object over the caller's weights, running the engine's attention.

The engine needs its own attention kernel on every layer (explicit masks, packed grouped-query heads,
step-attention capture) and, for a self-speculative draft, a model with only the first ``k`` layers.
transformers' attention modules read their kernel from ``self.config``, so the view gives the modules
on the path to each attention module (the model, its decoder, the layer list, each layer and its
attention) new Python objects with a config copy naming :data:`~.attention.IMPL_NAME`. Parameters,
buffers and every other module are the caller's own objects: nothing is copied and nothing the caller
holds (the model, its config, its modules, their ``training`` flags) is changed.
"""

from __future__ import annotations

import copy
import functools
import types
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
    code: embeddings, rotary tables, norms and LM head are the caller's modules.
    """
    layers = decoder_layers(model)
    count = len(layers) if num_layers is None else num_layers
    if not 1 <= count <= len(layers):
        raise ValueError(f"a view needs between 1 and {len(layers)} layers, got {count}")
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
        own_layers.append(new_layer)
    decoder._modules["layers"] = own_layers
    decoder.config = config
    view._modules["model"] = decoder
    view.config = config
    return view
