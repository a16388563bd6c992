"""The two measurements every evaluation makes of a model: held-out loss / perplexity (labels
masked exactly as in training) and greedy answers to held-out prompts (batched, left-padded, KV
cache on).  Scoring the answers is tunesmith.evaluate.metrics; putting base and tuned side by side
is tunesmith.evaluate.suite."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from tunesmith.train.batching import iter_batches


@torch.no_grad()
def heldout_loss(model, rows, batch_size: int, device, objective) -> dict:
    """Token-weighted mean NLL over the rows (labels masked as in training) and its perplexity.

    `objective` (a tunesmith.tasks.Objective) batches and scores the rows for the model's task; a
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


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    device,
    desc: str = "generating",
) -> list[str]:
    """Greedy answers for token-id prompts, batched with left padding (so every row's last prompt
    token sits at the same position) and the KV cache on; a row stops at its end-of-turn token.
    Encoder-decoder models read right-padded prompts, and all they generate is the answer."""
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    answers: list[str] = [""] * len(prompts)
    # Longest first: rows of similar length share a batch, so less padding is computed.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    with tqdm(total=len(prompts), desc=desc, unit="row", leave=False) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)  # [b, width]
            attention = torch.zeros((len(idx), width), dtype=torch.long)  # [b, width]
            for row, i in enumerate(idx):
                ids = prompts[i]
                start = 0 if encoder_decoder else width - len(ids)
                input_ids[row, start : start + len(ids)] = torch.tensor(ids)
                attention[row, start : start + len(ids)] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                use_cache=True,
            )  # [b, width + new]; encoder-decoder: [b, 1 + new], the decoder start token first
            for row, i in enumerate(idx):
                answer = out[row] if encoder_decoder else out[row, width:]
                answers[i] = tokenizer.decode(answer, skip_special_tokens=True).strip()
            bar.update(len(idx))
    model.train(was_training)
    return answers
