"""The three kinds of model tunesmith trains, and the three things that differ between them:
how a sample becomes ids and labels, how rows become a batch, and which tokens the loss counts.

- `causal_lm` (Llama, Qwen, Mistral, Gemma, Phi-3, GPT-2, ...): one sequence, the conversation in
  the tokenizer's chat template; the loss is next-token prediction on the assistant's replies.
- `seq2seq` (T5, Flan-T5, BART, ...): the encoder reads the prompt, the decoder writes the
  reference; the loss is on every reference token (the prompt is never in the labels).
- `masked_lm` (BERT, RoBERTa, ...): the model fills in hidden tokens.  Each batch hides 15% of
  the ordinary tokens, of which 80% become the mask token, 10% a random token and 10% stay as
  they are (Devlin et al., "BERT", 2019, section 3.1); the loss is on the hidden positions.  The
  choice is drawn from a generator seeded by the batch's place in the run, so a resumed run masks
  exactly as the uninterrupted one did and every validation masks the same tokens.

`model.task: auto` picks one from the model's config: encoder-decoder models are seq2seq,
masked-LM architectures are masked_lm, everything else is causal.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from tunesmith.data.tokens import IGNORE_INDEX

CAUSAL_LM, SEQ2SEQ, MASKED_LM = "causal_lm", "seq2seq", "masked_lm"
TASKS = (CAUSAL_LM, SEQ2SEQ, MASKED_LM)
MASK_FRACTION = 0.15  # BERT's rate (Devlin et al., 2019, section 3.1)

# model_type values whose checkpoints are encoders trained to fill in masked tokens
MASKED_LM_TYPES = {
    "bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
    "modernbert", "camembert", "mpnet", "megatron-bert", "nomic_bert", "esm",
}


def detect_task(model_config, requested: str = "auto") -> str:
    """`model.task` made concrete for a model config (a transformers PretrainedConfig or None)."""
    if requested != "auto":
        return requested
    if model_config is None:
        return CAUSAL_LM
    if getattr(model_config, "is_encoder_decoder", False):
        return SEQ2SEQ
    architectures = getattr(model_config, "architectures", None) or []
    if any(name.endswith("ForCausalLM") or name.endswith("LMHeadModel") for name in architectures):
        return CAUSAL_LM
    if any(name.endswith("ForMaskedLM") for name in architectures) or model_config.model_type in MASKED_LM_TYPES:
        return MASKED_LM
    return CAUSAL_LM


def auto_model_class(task: str):
    """The transformers Auto class that loads a model for `task`."""
    import transformers

    return {
        CAUSAL_LM: transformers.AutoModelForCausalLM,
        SEQ2SEQ: transformers.AutoModelForSeq2SeqLM,
        MASKED_LM: transformers.AutoModelForMaskedLM,
    }[task]


def peft_task_type(task: str) -> str | None:
    """PEFT's task type (it picks the PeftModel subclass); masked LM has none and gets the generic one."""
    return {CAUSAL_LM: "CAUSAL_LM", SEQ2SEQ: "SEQ_2_SEQ_LM", MASKED_LM: None}[task]


def plain_prompt(messages: list[dict]) -> str:
    """A conversation without its last reply, as the plain text an encoder reads (seq2seq models have no
    chat template): the system text, a blank line, the user's message; earlier turns as `Role: text` lines."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        body = turns[0]["content"]
    else:
        body = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)
    return "\n\n".join([*system, body]) if system else body


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def seq2seq_ids(sample: dict, tokenizer, max_length: int) -> tuple[list[int], list[int], bool]:
    """(encoder ids, decoder labels, truncated) for a seq2seq sample; each side is cut to `max_length`."""
    from tunesmith.data.formats import prompt_and_reference
    from tunesmith.errors import UserError

    if "messages" not in sample:
        raise UserError(
            "a seq2seq model learns to write an output for an input, and plain text has no output; give the data "
            "as prompt/completion, alpaca or messages (or map your columns with data.columns)."
        )
    messages, reference = prompt_and_reference(sample)
    source = list(tokenizer(plain_prompt(messages))["input_ids"])
    target = _with_eos(list(tokenizer(text_target=reference)["input_ids"]), tokenizer.eos_token_id)
    truncated = len(source) > max_length or len(target) > max_length
    return source[:max_length], target[:max_length], truncated


def masked_lm_ids(sample: dict, tokenizer, max_length: int) -> tuple[list[int], list[int], bool]:
    """(ids, maskable, truncated): the whole text of a sample; `maskable` holds the id where a token may be
    hidden and IGNORE_INDEX on special tokens ([CLS], [SEP]), which are never hidden."""
    if "messages" in sample:
        text = "\n".join(m["content"] for m in sample["messages"])
    else:
        text = sample["text"]
    ids = list(tokenizer(text)["input_ids"])
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    special = set(tokenizer.all_special_ids)
    return ids, [IGNORE_INDEX if t in special else t for t in ids], truncated


def _generator(key) -> torch.Generator:
    """A CPU generator seeded by `key` (any repr-able value), independent of the global RNG."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


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
        from tunesmith.train.batching import collate

        if self.task == SEQ2SEQ:
            return collate_seq2seq(rows, self.pad_id)
        batch = collate(rows, self.pad_id)
        if self.task == MASKED_LM:
            batch["input_ids"], batch["labels"] = mask_tokens(
                batch["input_ids"], batch["labels"], self.mask_id, self.vocab_size, self.special_ids, _generator(key)
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
            from tunesmith.train.loss import token_nll_sum

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
