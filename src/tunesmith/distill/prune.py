"""A layer-pruned student: a copy of the teacher that keeps N of its decoder layers, evenly spaced, with the
teacher's weights (the "copy every other layer" initialisation of DistilBERT, Sanh et al. 2019, section 3,
taken to any N)."""

from __future__ import annotations

import torch

from tunesmith.errors import UserError


def keep_layer_indices(total: int, keep: int) -> list[int]:
    """`keep` of `total` layer indices, evenly spaced, the first and the last always among them."""
    if not 1 <= keep <= total:
        raise UserError(f"student.prune.keep_layers: {keep}, but the teacher has {total} layers; give 1 to {total}.")
    if keep == 1:
        return [total - 1]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def _layer_list(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(the module holding the decoder layers, the attribute name of their ModuleList)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    for owner in (decoder, getattr(inner, "transformer", None), getattr(inner, "model", None)):
        for name in ("layers", "h"):
            if owner is not None and isinstance(getattr(owner, name, None), torch.nn.ModuleList):
                return owner, name
    raise UserError(f"student.prune: tunesmith cannot find the decoder layers of a {type(inner).__name__}; give "
                    "student.name (a smaller model with the same tokenizer) instead.")


def prune_layers(model: torch.nn.Module, keep: int) -> list[int]:
    """Keep `keep` evenly spaced decoder layers of `model` (in place) and fix its config; returns the kept indices."""
    owner, name = _layer_list(model)
    layers = getattr(owner, name)
    kept = keep_layer_indices(len(layers), keep)
    setattr(owner, name, torch.nn.ModuleList([layers[i] for i in kept]))
    config = model.config
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key) and getattr(config, key) == len(layers):
            setattr(config, key, keep)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == len(layers):
        config.layer_types = [config.layer_types[i] for i in kept]
    for new_index, layer in enumerate(getattr(owner, name)):
        for module in layer.modules():  # the attention's cache slot follows the layer's new place
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    return kept
