"""Turning tokenised rows into padded batches: the epoch's seeded order, right-padded causal-LM and
seq2seq batches, and BERT's masking for masked-LM batches.

Masked LM: each batch hides 15% of the ordinary tokens, of which 80% become the mask token, 10% a
random token and 10% stay as they are (Devlin et al., "BERT", 2019, section 3.1); the loss is on
the hidden positions.  The choice is drawn from a generator seeded by the batch's place in the run,
so a resumed run masks exactly as the uninterrupted one did and every validation masks the same tokens."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence

import torch

from tunesmith.data.tokens import IGNORE_INDEX

MASK_FRACTION = 0.15  # BERT's rate (Devlin et al., 2019, section 3.1)


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


def seeded_generator(key) -> torch.Generator:
    """A CPU generator seeded by `key` (any repr-able value), independent of the global RNG."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def collate_seq2seq(rows, pad_id: int) -> dict[str, torch.Tensor]:
    """Encoder ids right-padded with `pad_id`, decoder labels right-padded with IGNORE_INDEX; the two widths differ."""
    width = max(len(r.input_ids) for r in rows)
    label_width = max(len(r.labels) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), label_width), IGNORE_INDEX, dtype=torch.long)  # [B, L]
    for i, row in enumerate(rows):
        input_ids[i, : len(row.input_ids)] = torch.tensor(row.input_ids, dtype=torch.long)
        attention_mask[i, : len(row.input_ids)] = 1
        labels[i, : len(row.labels)] = torch.tensor(row.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def mask_tokens(
    input_ids: torch.Tensor,  # [B, T]
    maskable: torch.Tensor,  # [B, T]: the id where a token may be hidden, IGNORE_INDEX elsewhere
    mask_id: int,
    vocab_size: int,
    special_ids: list[int],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: (ids with the chosen tokens replaced, labels holding the original id only there)."""
    candidates = maskable != IGNORE_INDEX  # [B, T]
    chosen = (torch.rand(input_ids.shape, generator=generator) < MASK_FRACTION) & candidates  # [B, T]
    for row in range(input_ids.shape[0]):  # every row trains on at least one token
        if candidates[row].any() and not chosen[row].any():
            places = candidates[row].nonzero().flatten()
            pick = places[torch.randint(len(places), (1,), generator=generator)]
            chosen[row, pick] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    draw = torch.rand(input_ids.shape, generator=generator)  # [B, T]
    masked = input_ids.clone()
    masked[chosen & (draw < 0.8)] = mask_id
    random_places = chosen & (draw >= 0.8) & (draw < 0.9)
    replacement = torch.randint(vocab_size, input_ids.shape, generator=generator)  # [B, T]
    if special_ids:  # a random special token ([SEP], [PAD]) would teach nothing: keep the original token there
        is_special = torch.isin(replacement, torch.tensor(special_ids))
        replacement = torch.where(is_special, input_ids, replacement)
    masked[random_places] = replacement[random_places]
    return masked, labels
