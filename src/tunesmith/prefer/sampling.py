"""GRPO's groups: for every prompt, `group_size` answers sampled from the model being trained.

Sampling goes through models/generate.py's `generation_config` (temperature and top-p, no top-k; below
GREEDY_BELOW it decodes greedily) and `model.generate` with the KV cache, so it decodes the way every other
tunesmith command does, and says nothing to transformers that it would warn about.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tunesmith.models.generate import generation_config


@torch.no_grad()
def sample_groups(model, tokenizer, prompts: list[list[int]], group_size: int, max_new_tokens: int,
                  temperature: float, top_p: float, seed: int, batch_size: int) -> list[list[list[int]]]:
    """For each prompt (token ids), `group_size` sampled completions as token ids: what the model wrote after the
    prompt, through its end token when it wrote one (`end_token_ids`), else `max_new_tokens` tokens; never padding.

    Each prompt is repeated group_size times and the copies go to `generate` at most `batch_size` at a time, left
    padded (every row's last prompt token at the same position) with an attention mask over the padding; longest
    prompts first, so rows of one length share a batch.  The same seed and batch_size give the same completions
    whatever used torch's random generators before; those generators are left as they were.  The model samples
    in eval mode (no dropout) and every module gets its own train/eval mode back afterwards.

    The KV cache is on whatever the model's config says: training sets `model.config.use_cache = False`, but
    `generate` takes use_cache from the GenerationConfig, which says True.  Checked (tests/test_grpo_parts.py):
    with the cache, every forward after the first gets one new token per row; without it, the whole sequence.
    Eval mode also matters here: with gradient checkpointing on, transformers turns the cache off in train mode.
    """
    if group_size < 1 or batch_size < 1:
        raise ValueError(f"group_size ({group_size}) and batch_size ({batch_size}) must be at least 1")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt has no tokens; generation needs at least one")
    config = generation_config(model, tokenizer, max_new_tokens, temperature, top_p)
    ends = set(config.eos_token_id or [])
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    device = next(model.parameters()).device

    rows = [prompt for prompt in prompts for _ in range(group_size)]  # prompt i's copies: rows i*G .. i*G + G-1
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    completions: list[list[int]] = [[] for _ in rows]
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with _seeded(device, seed):
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                input_ids, attention = _pad([rows[r] for r in batch], config.pad_token_id, left=not encoder_decoder)
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                     generation_config=config)
                # [b, width + new]; an encoder-decoder: [b, 1 + new], its decoder start token first
                new = out[:, 1:] if encoder_decoder else out[:, input_ids.shape[1]:]  # [b, new]
                for row, r in enumerate(batch):
                    completions[r] = _through_end(new[row].tolist(), ends)
    finally:
        for module, training in modes:
            module.training = training
    return [completions[i * group_size : (i + 1) * group_size] for i in range(len(prompts))]


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [b, width], attention_mask [b, width]): rows padded to the longest with pad_id, masked out."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [b, width]
    attention = torch.zeros((len(rows), width), dtype=torch.long)  # [b, width]
    for row, ids in enumerate(rows):
        start = width - len(ids) if left else 0
        input_ids[row, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, start : start + len(ids)] = 1
    return input_ids, attention


def _through_end(tokens: list[int], ends: set[int]) -> list[int]:
    """`tokens` up to and including the first end token; a row that ended early is filled with the pad token
    (often an end token itself) after it, which is dropped here."""
    for i, token in enumerate(tokens):
        if token in ends:
            return tokens[: i + 1]
    return tokens


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """torch's generators for `device` (and the CPU's) seeded with `seed` inside, put back as they were on leaving.

    Only the generators of the CPU and of the model's device are touched: torch.manual_seed would also seed every
    other CUDA device, and lazily, outside what fork_rng restores.  `generate` samples (torch.multinomial) from
    the default generator of the device the logits are on."""
    seed %= 2**64
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else (
        module.current_device() if hasattr(module, "current_device") else 0)
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        with module.device(index) if hasattr(module, "device") else contextlib.nullcontext():
            module.manual_seed(seed)  # the current device's generator, which module.device(index) made this one
        yield
