"""Turning tokenised rows into padded batches."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from tunesmith.train.loss import IGNORE_INDEX


def collate(rows: Sequence, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows (objects with `input_ids` and `labels`) to the longest one in the batch."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(row.labels, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """A seeded shuffle of row indices, different each epoch and the same on every rerun."""
    order = list(range(n_rows))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return order


def iter_batches(rows: Sequence, batch_size: int, order: list[int] | None) -> Iterator[list]:
    """Rows in `order` (file order when None), `batch_size` at a time; the last batch may be short."""
    indices = order if order is not None else range(len(rows))
    batch: list = []
    for i in indices:
        batch.append(rows[i])
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
