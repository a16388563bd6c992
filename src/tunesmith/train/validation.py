"""Held-out loss and perplexity, with labels masked exactly as in training (validation during a run,
and the loss half of every evaluation)."""

from __future__ import annotations

import math

import torch

from tunesmith.data.batching import iter_batches


@torch.no_grad()
def heldout_loss(model, rows, batch_size: int, device, objective) -> dict:
    """Token-weighted mean NLL over the rows (labels masked as in training) and its perplexity.

    `objective` (a tunesmith.train.objective.Objective) batches and scores the rows for the model's task; a
    masked-LM batch hides the same tokens every time it is scored here.
    """
    was_training = model.training
    model.eval()
    nll_total, token_total = 0.0, 0
    for index, batch_rows in enumerate(iter_batches(rows, batch_size, order=None)):
        batch = {k: v.to(device) for k, v in objective.collate(batch_rows, key=("heldout", index)).items()}
        nll, n = objective.nll_sum(model, batch)
        nll_total += float(nll)
        token_total += n
    model.train(was_training)
    loss = nll_total / max(token_total, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": token_total}
