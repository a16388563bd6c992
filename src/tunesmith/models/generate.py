"""Greedy answers for held-out prompts: batched, left-padded, KV cache on."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


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
