"""Samples → token ids and labels, formatted by the tokenizer's own chat template.

A conversation's ids are exactly `tokenizer.apply_chat_template(messages)`.  Its
labels copy the ids on each assistant reply (the reply's text and its end-of-turn
token, e.g. `<|im_end|>`, so the model learns to stop) and are -100 everywhere else,
unless `data.train_on_prompt` trains every token.

Which tokens belong to a reply is found by rendering the conversation prefix by
prefix: the ids of `messages[:i]` plus the generation prompt, and the ids of
`messages[:i+1]`, are prefixes of the full ids, and reply i is what lies between
them.  When a tokenizer merges tokens across that boundary (the prefix property
breaks), the same is done on the rendered text and mapped to tokens through the
tokenizer's character offsets.  A template that rewrites earlier turns once later
ones follow gives neither; that is an error with a way out (train_on_prompt).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tunesmith.config import DataConfig
from tunesmith.data.formats import prompt_and_reference
from tunesmith.data.read import visible
from tunesmith.errors import UserError
from tunesmith.models.tasks import CAUSAL_LM, SEQ2SEQ

IGNORE_INDEX = -100  # label value that cross-entropy skips


@dataclass
class TokenizedRow:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the token is not trained
    truncated: bool = False


def _chatml_template(end_of_turn: str) -> str:
    """ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`), with `end_of_turn` closing each message."""
    end = end_of_turn.replace("\\", "\\\\").replace("'", "\\'")
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '" + end + "' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template (GPT-2 style) a ChatML one; True when one was added.

    No tokens are added to the vocabulary (that would change the model's embedding size):
    each message ends with `<|im_end|>` when the vocabulary has it, else with the eos token,
    so generation still stops at a token the model knows.
    """
    if getattr(tokenizer, "chat_template", None):
        return False
    vocab = tokenizer.get_vocab()
    end = "<|im_end|>" if "<|im_end|>" in vocab else (tokenizer.eos_token or "<|im_end|>")
    tokenizer.chat_template = _chatml_template(end)
    return True


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """`apply_chat_template` token ids as a plain list (transformers may hand back a dict-like encoding)."""
    from jinja2.exceptions import TemplateError

    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
    except TemplateError as exc:
        raise UserError(
            f"the model's chat template refused this conversation ({visible(exc)}); reorder or fix its messages "
            "(many templates want user and assistant turns to alternate)."
        ) from None
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def _chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _end_of_turn_ids(tokenizer) -> set[int]:
    """Special tokens; the last one inside a reply is its end-of-turn token."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def _reply_spans_by_tokens(messages: list[dict], tokenizer, ids: list[int]) -> list[tuple[int, int]] | None:
    """Token spans [start, end) of each assistant message, or None when the prefix property breaks."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = chat_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        through = ids if i == len(messages) - 1 else chat_ids(tokenizer, messages[: i + 1])
        if len(through) < len(before) or ids[: len(before)] != before or ids[: len(through)] != through:
            return None
        spans.append((len(before), len(through)))
    return spans


def _reply_spans_by_chars(messages: list[dict], tokenizer, ids: list[int]) -> list[tuple[int, int]] | None:
    """The same spans found on the rendered text and mapped to tokens by character offsets; None if impossible."""
    text = _chat_text(tokenizer, messages)
    char_spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _chat_text(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _chat_text(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through)) or len(through) < len(before):
            return None
        char_spans.append((len(before), len(through)))
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None  # tokenizers without offsets (pure-Python ones)
    if list(encoding["input_ids"]) != ids:
        return None
    offsets = encoding["offset_mapping"]
    spans = []
    for start_char, end_char in char_spans:
        # A token belongs to the reply when its characters overlap the reply's characters.
        inside = [t for t, (s, e) in enumerate(offsets) if e > start_char and s < end_char]
        spans.append((inside[0], inside[-1] + 1) if inside else (0, 0))
    return spans


def mask_prompt_tokens(messages: list[dict], ids: list[int], tokenizer) -> list[int]:
    """Labels for a conversation's `ids`: the ids on assistant replies through their end token, -100 elsewhere."""
    spans = _reply_spans_by_tokens(messages, tokenizer, ids)
    if spans is None:
        spans = _reply_spans_by_chars(messages, tokenizer, ids)
    if spans is None:
        raise UserError(
            "this model's chat template writes earlier turns differently once later turns follow, so tunesmith "
            "cannot tell which tokens are the assistant's replies; set data.train_on_prompt: true to train on "
            "every token, or use rows with a single prompt and answer."
        )
    end_ids = _end_of_turn_ids(tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        # Train through the reply's end-of-turn token; what the template writes after it
        # (ChatML's trailing newline) belongs to the next turn.
        last_special = max((t for t in range(start, end) if ids[t] in end_ids), default=None)
        if last_special is not None:
            end = last_special + 1
        labels[start:end] = ids[start:end]
    return labels


def _text_ids(text: str, tokenizer) -> list[int]:
    """A plain text's ids (with the tokenizer's usual special tokens, e.g. a bos) followed by eos."""
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def tokenize_sample(sample: dict, tokenizer, cfg: DataConfig, task: str = "causal_lm") -> TokenizedRow:
    """One sample ({"messages": ...} or {"text": ...}) → ids and labels, truncated to `cfg.max_length`.

    For `task` seq2seq the ids are the encoder's and the labels the decoder's (see tunesmith.models.tasks);
    for masked_lm the labels mark which tokens may be hidden (the hiding happens per batch).
    """
    if task != CAUSAL_LM:
        make = seq2seq_ids if task == SEQ2SEQ else masked_lm_ids
        ids, labels, truncated = make(sample, tokenizer, cfg.max_length)
        return TokenizedRow(input_ids=ids, labels=labels, truncated=truncated)
    if "messages" in sample:
        ensure_chat_template(tokenizer)
        ids = chat_ids(tokenizer, sample["messages"])
        labels = list(ids) if cfg.train_on_prompt else mask_prompt_tokens(sample["messages"], ids, tokenizer)
    else:
        ids = _text_ids(sample["text"], tokenizer)
        labels = list(ids)
    truncated = len(ids) > cfg.max_length
    if truncated:
        ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]  # keep the start
    return TokenizedRow(input_ids=ids, labels=labels, truncated=truncated)


def encode_prompt(messages: list[dict], tokenizer) -> list[int]:
    """Prompt ids for generation: the conversation without its last assistant reply, plus the generation prompt."""
    ensure_chat_template(tokenizer)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise UserError("a generation prompt needs at least one user message before the assistant's reply.")
    return chat_ids(tokenizer, messages, add_generation_prompt=True)


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
