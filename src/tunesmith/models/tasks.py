"""The three kinds of model tunesmith trains, and how to tell which one a model is.

- `causal_lm` (Llama, Qwen, Mistral, Gemma, Phi-3, GPT-2, ...): one sequence, the conversation in
  the tokenizer's chat template; the loss is next-token prediction on the assistant's replies.
- `seq2seq` (T5, Flan-T5, BART, ...): the encoder reads the prompt, the decoder writes the
  reference; the loss is on every reference token (the prompt is never in the labels).
- `masked_lm` (BERT, RoBERTa, ...): the model fills in hidden tokens (data/batching.py hides them).

`model.task: auto` picks one from the model's config: encoder-decoder models are seq2seq,
masked-LM architectures are masked_lm, everything else is causal.  How a sample becomes ids for each
task is tunesmith.data.tokens; which tokens the loss counts is tunesmith.train.objective.
"""

from __future__ import annotations

import transformers

CAUSAL_LM, SEQ2SEQ, MASKED_LM = "causal_lm", "seq2seq", "masked_lm"
TASKS = (CAUSAL_LM, SEQ2SEQ, MASKED_LM)

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
    return {
        CAUSAL_LM: transformers.AutoModelForCausalLM,
        SEQ2SEQ: transformers.AutoModelForSeq2SeqLM,
        MASKED_LM: transformers.AutoModelForMaskedLM,
    }[task]


def peft_task_type(task: str) -> str | None:
    """PEFT's task type (it picks the PeftModel subclass); masked LM has none and gets the generic one."""
    return {CAUSAL_LM: "CAUSAL_LM", SEQ2SEQ: "SEQ_2_SEQ_LM", MASKED_LM: None}[task]


