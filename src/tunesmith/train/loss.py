"""Causal-LM loss computed only where it counts.

The usual path runs the output projection over every position ([tokens x vocab]
logits, 49k columns for SmolLM2) and then throws away the masked prompt and
padding positions.  Here the decoder's hidden states are gathered at the trained
positions first, and the projection + cross-entropy run on those rows only, a
chunk at a time (the idea torchtune's chunked cross-entropy uses), so the full
logits tensor never exists.  The result is the *sum* of token NLLs and the token
count, so the caller can weight by tokens across gradient accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.tokens import IGNORE_INDEX

LOSS_CHUNK_TOKENS = 1024  # rows of the output projection computed at once


def _decoder_and_head(model: torch.nn.Module):
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


def token_nll_sum(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # [B, T]
    attention_mask: torch.Tensor,  # [B, T]
    labels: torch.Tensor,  # [B, T], IGNORE_INDEX where not trained
    position_ids: torch.Tensor | None = None,  # [B, T]
) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over trained positions, and how many positions that was."""
    targets = labels[:, 1:]  # [B, T-1]: position t predicts token t+1
    keep = targets != IGNORE_INDEX  # [B, T-1]
    n_tokens = int(keep.sum())
    decoder, head = _decoder_and_head(model)
    if decoder is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return nll, n_tokens
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # [B, T, H]
    selected = hidden[:, :-1][keep]  # [N, H], N = n_tokens
    wanted = targets[keep]  # [N]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, selected.shape[0], LOSS_CHUNK_TOKENS):
        chunk_logits = head(selected[start : start + LOSS_CHUNK_TOKENS]).float()  # [n, V], upcast per chunk
        total = total + F.cross_entropy(chunk_logits, wanted[start : start + LOSS_CHUNK_TOKENS], reduction="sum")
    return total, n_tokens
