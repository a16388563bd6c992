"""The held-out rows an evaluation scores a model on: generation prompts with their references, and
tokenised rows for the loss."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.data.formats import prompt_and_references
from tunesmith.data.tokens import encode_prompt, plain_prompt
from tunesmith.models.tasks import MASKED_LM, SEQ2SEQ


@dataclass
class EvalInputs:
    """The held-out rows both models are scored on."""

    prompts: list[list[int]]  # token ids that generation continues (empty for plain text / masked LM)
    references: list[list[str]]  # every acceptable answer of each prompt
    prompt_texts: list[str]  # the last user message, for people to read
    rows: list = field(default_factory=list)  # tokenised rows (labels masked as in training), for perplexity


def build_inputs(samples: list[dict], rows: list, tokenizer, max_length: int, task: str, text_only: bool,
                 limit: int | None) -> EvalInputs:
    """The first `limit` held-out samples as generation prompts with their references, and the first
    `limit` tokenised rows for perplexity.  Plain text has no answers to generate and a masked LM does
    not generate: those get the loss only."""
    samples = samples[:limit] if limit else samples
    rows = rows[:limit] if limit else rows
    prompts, references, texts = [], [], []
    if not text_only and task != MASKED_LM:
        for sample in samples:
            messages, refs = prompt_and_references(sample)
            if task == SEQ2SEQ:
                prompts.append(list(tokenizer(plain_prompt(messages))["input_ids"])[:max_length])
            else:
                prompts.append(encode_prompt(messages, tokenizer))
            references.append(refs)
            texts.append(messages[-1]["content"])
    return EvalInputs(prompts=prompts, references=references, prompt_texts=texts, rows=list(rows))
