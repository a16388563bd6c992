"""Where a model's parts are: the transformer body and its output projection."""

from __future__ import annotations

import torch


def decoder_and_head(model: torch.nn.Module):
    """The transformer body and output projection, or (None, None) when the model hides them."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # unwrap PEFT
    config = getattr(inner, "config", None)
    # Models that post-process logits (soft-capping, scaling) go through their own forward.
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None, None
    get_decoder = getattr(inner, "get_decoder", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or head is None or decoder is inner:
        return None, None
    return decoder, head
