"""What one task does with tokenised rows: batch them, count their trained tokens, sum their loss.

Causal LMs go through the chunked output projection of train/loss.py; seq2seq and masked-LM models
through their own forward, with the cross-entropy on the trained positions only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.batching import collate, collate_seq2seq, mask_tokens, seeded_generator
from tunesmith.data.tokens import IGNORE_INDEX
from tunesmith.models.tasks import CAUSAL_LM, MASKED_LM, SEQ2SEQ
from tunesmith.train.loss import token_nll_sum


class Objective:
    """What one task does with tokenised rows: batch them, count their trained tokens, sum their loss."""

    def __init__(self, task: str, tokenizer):
        self.task = task
        self.pad_id = tokenizer.pad_token_id
        self.mask_id = tokenizer.mask_token_id if task == MASKED_LM else None
        self.vocab_size = len(tokenizer)  # random replacements are tokens the tokenizer knows
        self.special_ids = sorted(set(tokenizer.all_special_ids))

    def collate(self, rows, key=None) -> dict[str, torch.Tensor]:
        """A padded batch; `key` seeds the masking (masked LM only)."""
        if self.task == SEQ2SEQ:
            return collate_seq2seq(rows, self.pad_id)
        batch = collate(rows, self.pad_id)
        if self.task == MASKED_LM:
            batch["input_ids"], batch["labels"] = mask_tokens(
                batch["input_ids"], batch["labels"], self.mask_id, self.vocab_size, self.special_ids, seeded_generator(key)
            )
        return batch

    def trained_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        labels = batch["labels"]
        if self.task == CAUSAL_LM:
            labels = labels[:, 1:]  # position t predicts token t+1: the first label is never a target
        return int((labels != IGNORE_INDEX).sum())

    def nll_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Sum of token NLLs over the trained positions, and how many there were."""
        if self.task == CAUSAL_LM:
            return token_nll_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        labels = batch["labels"]  # [B, L]
        if self.task == SEQ2SEQ:
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                decoder_input_ids=decoder_inputs(model, labels),
            ).logits  # [B, L, V]
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
        keep = labels != IGNORE_INDEX  # [B, L]
        nll = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")  # only the trained rows
        return nll, int(keep.sum())


def decoder_inputs(model, labels: torch.Tensor) -> torch.Tensor:
    """The decoder's input: the labels shifted one right behind the decoder start token ("teacher forcing"),
    with ignored positions read as padding.  [B, L] -> [B, L]."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    start = config.decoder_start_token_id
    if start is None:
        start = config.pad_token_id
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, config.pad_token_id)
