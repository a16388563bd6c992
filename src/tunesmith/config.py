"""The run config: schema, YAML loading, `--set` overrides and defaults.

One YAML file describes a run.  Every key has a default (SPEC step 3 takes its
training defaults from Intel's Edge AI Tuning Kit: batch size 2, eval batch
size 1, gradient accumulation 1, learning rate 1e-4, cosine schedule, 3 epochs,
AdamW).  Unknown keys and bad values fail with the key's dotted path, what was
given and what is allowed.  `resolved_yaml()` writes every default out, and
loading that text back gives the same config.

Whatever the file or a `--set` line holds (another encoding, a folder or a named
pipe, an alias bomb, a key given twice, a `!!python/object` tag, text where a
number belongs), loading ends in a `Config` or in a `UserError` of a few lines
that names the file or key; the path is looked at with `os.stat` before it is
opened, so nothing blocks.  Values are strict: a number is written as a number
(`1e-4` too: the YAML reader takes YAML 1.2's floats), true/false is no number,
and a whole number is no float.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import reprlib
import stat
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.errors import UserError, visible
from tunesmith.fileio import declared_codec

# --- limits on what a config may say.  Each is far past any run someone means, so reaching it is a mistake
# (a stray exponent, a pasted number); limits that depend on the data or the model (batch_size against the
# number of rows, max_length against the model's context) are checked where those are known.

# Every whole number fits a signed 64-bit integer, the widest that torch, numpy and the C code beneath them take.
INT64_MAX = 2**63 - 1
# numpy's legacy seeding (np.random.seed, called by train/loop.py: seed_everything) takes 0 <= seed < 2**32.
SEED_MAX = 2**32 - 1
# Rows per micro-batch, micro-batches per step, prompts per generation batch: a million is three orders past the
# largest published training batches (Llama 2: 4M tokens a step, about 1,000 rows of 4,096 tokens).
MAX_BATCH = 1_000_000
# Tokens per row or per answer: 2**20, about the longest context of open models (Qwen2.5-7B-Instruct-1M:
# 1,010,000 tokens); the model's own limit is checked when it loads.
MAX_TOKENS = 1_048_576
# Passes over the data: also keeps epochs x steps-per-epoch a finite number of steps (train/loop.py: plan_steps).
MAX_EPOCHS = 1_000_000
# CPU threads: more than the largest single machines have (two 192-core EPYC 9965 sockets: 768 threads).
MAX_THREADS = 1024
# A week: waiting longer at a collective step is a hung job; Python's timedelta and torch's millisecond
# timeout overflow far above it.
MAX_TIMEOUT_S = 7 * 24 * 3600

# --- limits on the YAML itself.  examples/*.yaml are about 1 KB and hold under 60 values; the schema has about
# 110 keys and nests three deep (student.prune.keep_layers).
# 256 KiB leaves room for a long system prompt, and PyYAML (with libyaml) reads it in about a second at worst.
MAX_CONFIG_BYTES = 256 * 1024
# Values once aliases are expanded: room for long lists (target_modules), while a "billion laughs" file (nine
# levels of ten aliases each: 10^9 values from a few hundred bytes) is refused before it is built.
MAX_VALUES = 10_000
MAX_DEPTH = 32
# An error names at most this many problems (then "and N more"), each value cut short, so a config of a
# million wrong keys is still a message of a few lines.
MAX_PROBLEMS = 10
# Sections a single word may stand for, and the key it sets: `objective: dpo` is `objective: {type: dpo}`.
SHORT_FORMS = {"objective": "type", "model": "name", "data": "path"}
MAX_MESSAGE = 3000


class _Section(BaseModel):
    # strict: a value must already be of its field's type: `batch_size: true`, `epochs: "3"` and `batch_size: 2.0`
    # are refused instead of read as 1, 3.0 and 2 (a whole number given to a float field is still a number).
    # allow_inf_nan=False: `.nan` and `.inf` are no learning rate, temperature or timeout.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


def _path_text(value: str) -> str:
    """A file or folder name, or a model name that may be one: not empty, and without a NUL character (no file
    system allows one; Python's `open` stops with a ValueError)."""
    if "\x00" in value:
        raise ValueError("a path without NUL characters (\\0); remove them")
    if not value.strip():
        raise ValueError("a path; empty text names no file (write null to leave it out)")
    return value


PathText = Annotated[str, AfterValidator(_path_text)]


class ModelConfig(_Section):
    name: PathText = Field(
        "smollm2-135m-instruct",
        description="A built-in model name, a local Hugging Face folder, a .gguf file, or a hub id.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and compute precision; auto picks what this device does fast."
    )
    trust_remote_code: bool = Field(False, description="Run Python code shipped with a hub model.")
    task: Literal["auto", "causal_lm", "seq2seq", "masked_lm"] = Field(
        "auto",
        description="What the model learns: causal_lm (next token: Llama, Qwen, GPT-2, ...), seq2seq (input -> output: "
        "T5, BART), masked_lm (fill in hidden tokens: BERT, RoBERTa); auto reads it from the model's config.",
    )


DataFormat = Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text"]


class DataSourceConfig(_Section):
    """One of several data sets mixed into one run (`data.sources`), as axolotl's `datasets:` list and
    LLaMA-Factory's `dataset: a,b` are."""
    path: PathText = Field(
        description="A data file (.jsonl, .json, .csv, .parquet, .arrow), a folder saved with Hugging Face datasets' "
        "save_to_disk or of Parquet/Arrow shards, or a hub data set id (read only where the network allows).")
    format: DataFormat = Field("auto", description="How this source's rows are read (as data.format).")
    columns: dict[str, str] = Field(default_factory=dict, description="This source's column map (as data.columns).")
    system_prompt: str | None = Field(None, description="System message for this source's rows (as data.system_prompt).")
    split: str = Field("train", description="Which split of a saved DatasetDict or a hub data set to read.")
    weight: float | None = Field(
        None, gt=0, description="This source's share of the mix, relative to the others' weights (1 where a source "
        "has none); with no weights and no rows anywhere, every row of every source is used once.")
    rows: int | None = Field(
        None, ge=1, le=INT64_MAX, description="Take exactly this many rows from this source (instead of a weight); "
        "more than it has repeats rows.")

    @model_validator(mode="after")
    def _weight_or_rows(self) -> DataSourceConfig:
        if self.weight is not None and self.rows is not None:
            raise ValueError("a weight or a row count, not both: rows takes exactly that many rows, a weight a share "
                             "of the rest; remove one of them")
        return self


class DataConfig(_Section):
    path: PathText | None = Field(
        "examples/data/dates-train.jsonl", description="Training data file (null when data.sources names the data).")
    sources: list[DataSourceConfig] = Field(
        default_factory=list, description="Several data sets mixed into one run, each with its own path, format, "
        "columns, system prompt and weight or row count; replaces data.path.  `data: [a.jsonl, b.jsonl]` is the "
        "short form.  A source's format, columns and system_prompt default to data.format, data.columns and "
        "data.system_prompt.")
    format: DataFormat = Field(
        "auto",
        description="How rows are read: alpaca (instruction, input, output), messages, sharegpt (conversations), "
        "prompt_completion (prompt, completion) or text; auto takes the first of these whose fields the file has.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map our field names to the file's columns, e.g. {prompt: dialogue, completion: summary}.",
    )
    system_prompt: str | None = Field(None, description="System message put before every conversation.")
    max_length: int = Field(512, ge=8, le=MAX_TOKENS, description="Rows longer than this many tokens are truncated.")
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens (default: masked).")
    validation_split: float = Field(0.1, ge=0.0, lt=1.0, description="Share of rows held out for validation.")
    validation_path: PathText | None = Field(
        None, description="A separate validation file (overrides validation_split).")
    test_path: PathText | None = Field(
        None, description="Held-out rows for the before/after evaluation; default: the validation rows."
    )
    limit: int | None = Field(None, ge=1, le=INT64_MAX, description="Use only the first N rows of the training file "
                              "(with data.sources: of each source, before they are mixed).")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed of the shuffle that picks the validation rows (and, "
                      "with data.sources, the rows each source gives and their mixed order).")
    num_workers: Annotated[int, Field(ge=1, le=MAX_THREADS)] | Literal["auto"] = Field(
        "auto", description="Processes that tokenise a large data set (thousands of rows) side by side; auto: one per "
        "CPU core; 1 tokenises in the training process.  Small data is always tokenised in the training process.")

    @field_validator("sources", mode="before")
    @classmethod
    def _source_short_forms(cls, value: Any) -> Any:
        """A source given as a path alone is `{path: PATH}`."""
        return [{"path": item} if isinstance(item, str) else item for item in value] if isinstance(value, list) \
            else value

    @model_validator(mode="before")
    @classmethod
    def _path_or_sources(cls, value: Any) -> Any:
        """data.sources replaces data.path: both given is a mistake (which one was meant?); sources alone leave
        path null, so the resolved config (which writes every key) reads back the same."""
        if not isinstance(value, dict):
            return value
        if value.get("sources"):
            if value.get("path") is not None:
                raise ValueError("data.path or data.sources, not both: data.sources names the whole training data, "
                                 "so remove data.path or make that file one more source (on the command line, "
                                 "--set data=[a.jsonl, b.jsonl] replaces data.path)")
            return {**value, "path": None}
        if "path" in value and value["path"] is None:
            raise ValueError("a training data file in data.path (or several data sets in data.sources)")
        return value


class LoraConfig(_Section):
    r: int = Field(16, ge=1, le=INT64_MAX, description="Adapter rank (for adalora: the average rank it ends with).")
    alpha: float = Field(32, gt=0, description="Adapter scale: the update is multiplied by alpha/r (alpha/sqrt(r) "
                         "with rsLoRA).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input while training; 0 turns "
                           "it off.")
    target_modules: Literal["auto", "all-linear"] | list[str] = Field(
        "auto",
        description="auto (the family's attention and MLP projections), all-linear, or module names such as "
        "[q_proj, v_proj].",
    )
    use_dora: bool = Field(False, description="DoRA: learn each weight's magnitude apart from its direction.")
    use_rslora: bool = Field(False, description="rsLoRA: scale adapters by alpha/sqrt(r) instead of alpha/r.")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _names_from_text(cls, value: Any) -> Any:
        """`q_proj` or `q_proj,v_proj` (handy with --set) mean the list of those names."""
        if isinstance(value, str):
            text = value.strip()
            if text.lower() in ("auto", "all-linear"):
                return text.lower()
            value = [part.strip() for part in text.split(",") if part.strip()]
        if isinstance(value, list) and not value:
            raise ValueError("an empty list targets nothing; give module names, auto or all-linear")
        return value


class QloraConfig(_Section):
    fallback: Literal["lora", "error"] = Field(
        "lora",
        description="Where 4-bit cannot run (no bitsandbytes, no kernels for this device): train plain LoRA "
        "with a notice, or stop with an error.",
    )


class AdaloraConfig(_Section):
    init_r: int | None = Field(
        None, ge=1, le=INT64_MAX,
        description="Rank every layer starts with; default 1.5 x lora.r (lora.r is the average it ends with)."
    )
    tinit: int | None = Field(
        None, ge=0, le=INT64_MAX, description="Steps before ranks start to shrink; default 10% of the run.")
    tfinal: int | None = Field(
        None, ge=0, le=INT64_MAX, description="Last steps with ranks fixed; default 20% of the run.")
    delta_t: int = Field(1, ge=1, le=INT64_MAX, description="Reallocate ranks every this many steps.")
    beta1: float = Field(0.85, ge=0.0, lt=1.0, description="Smoothing of the importance scores.")
    beta2: float = Field(0.85, ge=0.0, lt=1.0, description="Smoothing of their uncertainty.")
    orth_reg_weight: float = Field(0.5, ge=0.0, description="Weight of the loss that keeps the factors orthogonal.")
    total_step: int | None = Field(
        None, ge=1, le=INT64_MAX, description="Length of the rank schedule in steps; default the run's planned steps."
    )


class TrainingConfig(_Section):
    epochs: float = Field(3, gt=0, le=MAX_EPOCHS, description="Passes over the training data; a fraction such as 0.5 "
                          "stops partway (max_steps stops sooner when it is fewer steps).")
    max_steps: int | None = Field(None, ge=1, le=INT64_MAX, description="Stop after this many optimiser steps.")
    batch_size: int = Field(2, ge=1, le=MAX_BATCH, description="Rows per micro-batch (in each process).")
    eval_batch_size: int = Field(
        1, ge=1, le=MAX_BATCH, description="Rows per batch when computing the validation and held-out loss.")
    gradient_accumulation: int = Field(
        1, ge=1, le=MAX_BATCH, description="Micro-batches whose gradients add up before each optimiser step.")
    learning_rate: float = Field(1e-4, gt=0, description="The peak learning rate, reached when warmup ends.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="How the learning rate moves after warmup: down to 0 along a cosine or a straight "
        "line, or constant.")
    warmup_steps: int = Field(
        0, ge=0, le=INT64_MAX, description="Steps over which the learning rate rises from 0 to learning_rate; 0 "
        "uses warmup_ratio.")
    warmup_ratio: float = Field(
        0.0, ge=0.0, lt=1.0, description="Warmup as a share of the run's steps, used when warmup_steps is 0.")
    weight_decay: float = Field(
        0.0, ge=0.0, description="AdamW weight decay of the trained weight matrices (biases and norm weights are "
        "not decayed).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm; null turns it off.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="8-bit and paged AdamW come from bitsandbytes; where it cannot run, AdamW."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute layer activations in the backward pass instead of keeping them: less memory, about "
        "a third more compute. auto: on for qlora, and when one micro-batch's activations would take over half the "
        "free memory.",
    )
    autocast: bool | Literal["auto"] = Field(
        "auto",
        description="Run matmuls in bf16/fp16 while trained weights stay in their own precision. auto: on where "
        "the device is fast in 16-bit (GPUs), off on CPUs.",
    )
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="Padding-free micro-batches: the rows of a micro-batch run end to end as one sequence, each row "
        "attending only to itself (position ids restart per row), so no compute goes to padding. The same rows "
        "and loss as padded batches. auto: on CPUs, for causal LMs whose attention tunesmith has checked (Llama, "
        "Mistral, Qwen2/3, Gemma, Phi-3); on a GPU padded batches measured faster, so auto pads there.",
    )
    pass_tokens: Annotated[int, Field(ge=8, le=INT64_MAX)] | Literal["auto"] = Field(
        "auto",
        description="With packing, at most this many tokens go through the model at once; a longer micro-batch "
        "runs as several passes whose gradients add up (the same step, less activation memory). auto: "
        "max(data.max_length, 1024) on a CPU, the whole micro-batch on a GPU.",
    )
    fast_kernels: Literal["auto", "off"] = Field(
        "auto",
        description="Patches that train faster in less memory (src/tunesmith/models/fast). auto: tunesmith's fused "
        "LoRA-dropout, RMSNorm and rotary paths where they apply, on CPUs (on a GPU the stock modules measured faster); "
        "off: the stock PEFT/transformers modules.",
    )
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW's decay rate of its running mean of gradients.")
    adam_beta2: float = Field(
        0.999, ge=0.0, lt=1.0, description="AdamW's decay rate of its running mean of squared gradients.")
    adam_epsilon: float = Field(1e-8, gt=0, description="Added to AdamW's denominator to keep the step finite.")
    eval_each_epoch: bool = Field(
        True, description="Compute the validation loss when each epoch ends (and when max_steps ends the run).")
    eval_steps: int | None = Field(None, ge=1, le=INT64_MAX, description="Also compute validation loss every N steps.")
    save_steps: int | None = Field(
        None, ge=1, le=INT64_MAX, description="Save a checkpoint every N steps (one is always saved at each epoch end)."
    )
    save_total_limit: int = Field(2, ge=1, le=INT64_MAX, description="Keep only the newest K checkpoints.")
    early_stopping_patience: int | None = Field(
        None, ge=1, le=INT64_MAX, description="Stop after this many validations without improvement; null turns it off."
    )
    early_stopping_threshold: float = Field(0.0, ge=0.0, description="Improvement smaller than this does not count.")
    load_best_at_end: bool = Field(False, description="End with the weights of the best validation loss.")
    seed: int = Field(
        42, ge=0, le=SEED_MAX, description="Seeds the random generators and each epoch's row order; the same seed "
        "repeats a run.")
    num_threads: int | None = Field(
        None, ge=1, le=MAX_THREADS, description="CPU threads for torch; default: all cores.")

    @field_validator("fast_kernels", mode="before")
    @classmethod
    def _off_from_yaml(cls, value: Any) -> Any:
        """YAML reads a bare `off` as false: `fast_kernels: off` and `--set training.fast_kernels=off` mean off."""
        return "off" if value is False else value


EVAL_METRICS = ("perplexity", "rouge", "bleu", "chrf", "exact_match", "similarity", "bertscore")
EvalMetric = Literal["perplexity", "rouge", "bleu", "chrf", "exact_match", "similarity", "bertscore"]


class EvalConfig(_Section):
    enabled: bool = Field(True, description="Compare base and tuned on the held-out rows after training.")
    limit: int | None = Field(50, ge=1, le=INT64_MAX, description="Evaluate at most this many held-out rows.")
    max_new_tokens: int = Field(
        64, ge=1, le=MAX_TOKENS, description="The longest answer generated for each held-out prompt (greedy).")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="Prompts answered at once while generating.")
    answer_regex: str | None = Field(
        None, description="Compare only what this regex's first group captures (e.g. '#### (.+)')."
    )

    @field_validator("answer_regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        """Compiled at load: a regex that cannot compile would otherwise stop the run after minutes of generation
        (evaluate/metrics.py: extract_answer).  It needs no group: without one the whole match is compared."""
        if value is not None:
            try:
                re.compile(value)
            except (re.error, OverflowError, RecursionError) as exc:  # a{99999999999}; ((((...)))) a thousand deep
                raise ValueError(f"a regular expression that Python's re module compiles ({exc})") from None
        return value
    metrics: list[EvalMetric] = Field(
        default_factory=lambda: list(EVAL_METRICS),
        description="What to compute: perplexity (held-out loss), rouge (1/2/L), bleu, chrf, exact_match, "
        "similarity (embedding cosine and the share above similarity_threshold), bertscore (only where its "
        "model is on this machine already).",
    )
    similarity_threshold: float = Field(
        0.75, gt=-1.0, le=1.0, description="An answer counts as similar when its cosine to a reference reaches this."
    )

    @field_validator("metrics", mode="before")
    @classmethod
    def _metric_names_from_text(cls, value: Any) -> Any:
        """`rouge,bleu` (handy with --set) means the list of those names."""
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value


class TeacherConfig(_Section):
    name: PathText | None = Field(
        None,
        description="The model that teaches (`tunesmith distill`): a built-in name, a Hugging Face folder or hub id, "
        "or a tunesmith run folder, whose adapter is applied on the fly.",
    )
    load_in_4bit: bool = Field(False, description="Load the teacher's linear layers in 4-bit NF4 (needs bitsandbytes).")


class PruneConfig(_Section):
    keep_layers: int = Field(
        ge=1, le=INT64_MAX, description="How many of the teacher's decoder layers the student keeps, evenly spaced.")


class StudentConfig(_Section):
    name: PathText | None = Field(
        None, description="The student model (as model.name); default model.name, unless `prune` is given."
    )
    prune: PruneConfig | None = Field(
        None, description="Make the student from the teacher: a copy keeping `keep_layers` evenly spaced layers, "
        "initialised from the teacher's (merged) weights."
    )


class DistillConfig(_Section):
    temperature: float = Field(2.0, gt=0, description="Softmax temperature T of both models in the KL term.")
    alpha: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy on the trained tokens.",
    )
    top_k: int = Field(
        64, ge=1, le=INT64_MAX,
        description="With --cache-teacher: the teacher log-probs kept per token; the mass beyond them is "
        "kept as one 'rest' bucket."
    )
    cache_dir: PathText | None = Field(
        None, description="Where --cache-teacher keeps the teacher's top-k (default: teacher-cache/ in the run folder); "
        "a cache made by the same teacher, temperature and top_k is reused."
    )
    max_new_tokens: int = Field(
        256, ge=1, le=MAX_TOKENS,
        description="Sequence-level distillation (teacher and student tokenizers differ): the longest "
        "answer the teacher writes per prompt."
    )
    generation_batch_size: int = Field(
        8, ge=1, le=MAX_BATCH, description="Prompts the teacher answers at once (sequence level).")



OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo", "kto", "grpo")
PREFERENCE_OBJECTIVES = ("dpo", "ipo", "orpo", "simpo")  # paired: prompt, chosen, rejected
# beta when `objective.beta` is left null, per objective (the papers' or TRL's defaults; prefer/losses.py cites each)
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1, "grpo": 0.04}


class RewardConfig(_Section):
    type: Literal["exact_match", "number", "regex", "length", "python"] = Field(
        description="exact_match (the answer after eval.answer_regex equals the reference), number (the last number "
        "in the answer within `tolerance` of the reference's), regex (the completion matches `pattern`), length "
        "(1 at `target` characters, falling linearly to 0 at 0 and 2x target), python (`function`, module:function)."
    )
    weight: float = Field(1.0, description="The reward's weight in the sum of rewards.")
    tolerance: float = Field(1e-6, ge=0.0, description="number: the largest absolute difference that still scores 1.")
    pattern: str | None = Field(None, description="regex: the pattern a completion must match (re.search).")
    target: int = Field(200, ge=1, le=MAX_TOKENS, description="length: the completion length in characters scoring 1.")
    function: str | None = Field(
        None, description="python: `module:function` called as function(prompts, completions, references) -> list of "
        "floats; the module is imported only because the config names it (it runs your code).")


class ObjectiveConfig(_Section):
    type: Literal["sft", "dpo", "ipo", "orpo", "simpo", "kto", "grpo"] = Field(
        "sft", description="What training optimises: sft (next-token cross-entropy on the answers), dpo, ipo, orpo, "
        "simpo (preference pairs: prompt, chosen, rejected), kto (unpaired answers labelled good or bad) or grpo "
        "(answers sampled per prompt and scored by reward functions). `objective: dpo` is the short form."
    )
    beta: float | None = Field(
        None, gt=0, description="The objective's beta: DPO/IPO/KTO's strength of the pull to the reference (0.1), "
        "ORPO's weight of the odds-ratio term (0.1), SimPO's reward scale (2.0), GRPO's KL coefficient (0.04); "
        "null takes the default in brackets.")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="DPO: the share of pairs assumed mislabelled (conservative DPO); 0 is plain DPO.")
    reference_free: bool = Field(
        False, description="DPO/IPO: compare against a uniform reference instead of the base model (no reference pass).")
    precompute_reference: bool | Literal["auto"] = Field(
        "auto", description="Compute the reference model's log-probs of every pair once before training and keep "
        "them in the run folder (no reference pass per step); auto: for method full (no second copy of the "
        "weights), while adapters take the base with the adapter switched off.")
    simpo_gamma: float = Field(1.0, ge=0.0, description="SimPO: the target reward margin gamma.")
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO: the weight of answers labelled good.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO: the weight of answers labelled bad.")
    group_size: int = Field(8, ge=2, le=MAX_BATCH, description="GRPO: answers sampled per prompt (one group).")
    max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS, description="GRPO: the longest sampled answer, in tokens.")
    temperature: float = Field(1.0, gt=0, description="GRPO: the sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1.0, description="GRPO: nucleus sampling's probability mass.")
    clip_epsilon: float = Field(0.2, gt=0, lt=1.0, description="GRPO: the policy ratio is clipped to 1 +- this.")
    rewards: list[RewardConfig] = Field(
        default_factory=lambda: [RewardConfig(type="exact_match")],
        description="GRPO: the reward functions, summed with their weights; a name alone (`[exact_match]`) is the "
        "short form.")

    @field_validator("rewards", mode="before")
    @classmethod
    def _reward_names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"type": v} if isinstance(v, str) else v for v in value]
        return value

    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.type, 0.1)


class DistributedConfig(_Section):
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="With several processes: `ddp` keeps the whole model in every process and sums the "
        "gradients; `fsdp` (PyTorch FSDP2) shards the weights, gradients and optimiser state over the processes, "
        "so each holds about 1/N of them (QLoRA's 4-bit weights stay whole), at the cost of gathering each layer's "
        "weights when it runs; `deepspeed` runs DeepSpeed ZeRO (stage in zero_stage; pip install 'tunesmith[deepspeed]')."
    )
    zero_stage: Literal[2, 3] = Field(
        2, description="With strategy deepspeed: 2 shards the optimiser state and gradients of what trains (and "
        "takes method qlora, whose 4-bit base stays whole in each process); 3 also shards every weight of the model "
        "(gathered layer by layer as it runs)."
    )
    timeout_s: float = Field(
        1800, gt=0, le=MAX_TIMEOUT_S, description="With several processes (--nproc, torchrun, accelerate launch): how "
        "long one waits for the others at a collective step before the job stops with a sentence."
    )

    @field_validator("zero_stage", mode="before")
    @classmethod
    def _whole_stage(cls, value: Any) -> Any:
        """A Literal compares with ==, so 2.0 and 3.0 would pass; a stage is a whole number like every count here."""
        if isinstance(value, float):
            raise ValueError("2 or 3, a whole number (not 2.0)")
        return value


class LoggingConfig(_Section):
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers that get every metric of metrics.jsonl, the resolved "
        "config and training.png / report.md: tensorboard (event files in RUN/tensorboard), mlflow (a SQLite store in "
        "RUN/mlruns unless tracking_uri or MLFLOW_TRACKING_URI says where) and wandb (offline files in RUN/wandb unless "
        "tracking_uri or WANDB_MODE says otherwise); pip install 'tunesmith[trackers]'.")
    tracking_uri: str | None = Field(
        None, description="Where mlflow (a tracking server or store URI) or wandb (a server's base URL) report to.")
    project: str | None = Field(
        None, description="The experiment (mlflow) or project (wandb) name; default tunesmith.")
    run_name: str | None = Field(None, description="The run's name in the trackers; default the run folder's name.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        """`report_to: tensorboard` is a list of one; `none` (the Hugging Face Trainer's word) is the empty list."""
        if isinstance(value, str):
            return [] if value.lower() == "none" else [value.lower()]
        return value


class OutputConfig(_Section):
    dir: PathText | None = Field(None, description="Run folder; default runs/<config name>-<date>-<time>.")


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model to fine-tune.")
    data: DataConfig = Field(default_factory=DataConfig, description="The training data and how it is read.")
    method: Literal["lora", "qlora", "dora", "rslora", "adalora", "full"] = Field(
        "lora",
        description="What trains: lora (a low-rank adapter beside the frozen weights), qlora (LoRA on a 4-bit base), "
        "dora and rslora (LoRA variants), adalora (LoRA whose ranks shrink along a schedule) or full (every weight).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The adapter of the LoRA methods.")
    qlora: QloraConfig = Field(default_factory=QloraConfig, description="What method qlora does without 4-bit.")
    adalora: AdaloraConfig = Field(default_factory=AdaloraConfig, description="AdaLoRA's rank schedule.")
    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="Optimiser, schedule, batches, validation and checkpoints.")
    eval: EvalConfig = Field(
        default_factory=EvalConfig, description="The base-vs-tuned evaluation after training and in tunesmith eval.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The teacher of tunesmith distill.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="The student of tunesmith distill.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="How tunesmith distill mixes its losses.")
    objective: ObjectiveConfig = Field(
        default_factory=ObjectiveConfig, description="What training optimises: sft, or preference and reward "
        "tuning (dpo, ipo, orpo, simpo, kto, grpo); `objective: dpo` is the short form.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="How several training processes share the work.")
    logging: LoggingConfig = Field(
        default_factory=LoggingConfig, description="Experiment trackers the metrics also go to (report_to).")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where the run is written.")

    @field_validator("method", mode="before")
    @classmethod
    def _lower_method(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_short_form(cls, value: Any) -> Any:
        return {"type": value.lower()} if isinstance(value, str) else value

    @field_validator("model", "data", mode="before")
    @classmethod
    def _name_and_path_short_forms(cls, value: Any, info) -> Any:
        """`model: NAME` is `model: {name: NAME}` and `data: FILE` is `data: {path: FILE}` (axolotl's and
        LLaMA-Factory's users write them so); `data: [a.jsonl, b.jsonl]` (paths or source mappings) is
        `data: {sources: [...]}`."""
        if isinstance(value, list) and info.field_name == "data":
            return {"sources": value}
        return {SHORT_FORMS[info.field_name]: value} if isinstance(value, str) else value


def _allowed(err: dict) -> str:
    """What a value may be, in words, from a pydantic error record."""
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "literal_error":
        return "one of " + ctx.get("expected", "")
    if kind == "extra_forbidden":
        return "no such key here"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return err["msg"].lower().removeprefix("input should be ")
    if kind == "finite_number":
        return "a finite number (not .nan or .inf)"
    if kind == "value_error":
        return visible(err["msg"].removeprefix("Value error, "), 300)
    if kind == "invalid_key":
        return "a key that is text"
    if kind.startswith("int_"):
        return "a whole number"
    if kind.startswith("float_"):
        return "a number"
    if kind.startswith("bool_"):
        return "true or false"
    if kind.startswith("string_"):
        return "text"
    if kind == "list_type":
        return "a list"
    if kind.startswith("dict_") or kind == "model_type":
        return "a mapping of keys to values"
    return visible(err["msg"], 300)


def _explain(exc: ValidationError, source: str) -> str:
    """The validation errors as one message: a sentence per key (a section's unknown keys in one), the first
    MAX_PROBLEMS of them, then how many more.  One pass over the errors: a million of them take seconds, not hours."""
    unknown: dict[str, list[tuple[str, str]]] = {}  # section -> its unknown keys: (dotted, the key itself)
    values: dict[str, tuple[Any, str, list[str]]] = {}  # key -> (given, error type, allowed); a union: one per branch
    problems: dict[tuple[str, str], None] = {}  # (kind, key or section) in the order pydantic found them
    for err in exc.errors():
        key = _config_key(err["loc"])
        if err["type"] == "extra_forbidden":
            section = _config_key(err["loc"][:-1])
            unknown.setdefault(section, []).append((key, str(err["loc"][-1])))
            problems[("unknown", section)] = None
        elif err["type"] == "missing":
            problems[("missing", key)] = None
        elif key in values:
            if (allowed := _allowed(err)) not in values[key][2]:
                values[key][2].append(allowed)
        else:
            values[key] = (err.get("input"), err["type"], [_allowed(err)])
            problems[("value", key)] = None
    lines: list[str] = []
    for kind, key in problems:
        if len(lines) == MAX_PROBLEMS or sum(map(len, lines)) > MAX_MESSAGE:
            break
        if kind == "unknown":
            lines.append(_unknown_keys(key, unknown[key]))
        elif kind == "missing":
            lines.append(f"config key `{visible(key, 100)}` is missing; give it a value.")
        else:
            given, error_type, allowed = values[key]
            unquote = isinstance(given, str) and error_type.startswith(("int_", "float_")) and _is_number(given)
            lines.append(f"config key `{visible(key, 100)}`: given {_shown(given)}; allowed: {', or '.join(allowed)}"
                         + ("; write the number without quotes." if unquote else "."))
    more = len(problems) - len(lines)
    return f"{source}: " + " ".join(lines) + (f" And {more:,} more problem{'s' * (more > 1)}." if more else "")


def _unknown_keys(section: str, keys: list[tuple[str, str]]) -> str:
    """One sentence for a section's unknown keys: the first few (with the nearest known key), and what is known."""
    known = _known_keys(section)
    named = []
    for dotted, key in keys[:5]:
        near = difflib.get_close_matches(key, known, n=1)
        named.append(f"`{visible(dotted, 100)}`" + (f" (did you mean `{near[0]}`?)" if near else ""))
    if len(keys) > 5:
        named.append(f"{len(keys) - 5:,} more")
    where = f"in {visible(section, 100)}" if section else "at the top level"
    return (f"unknown config key{'s' * (len(keys) > 1)} {', '.join(named)}; the keys allowed {where} are: "
            f"{', '.join(known)}.")


def _config_key(loc: tuple) -> str:
    """The dotted config key of a pydantic error location, without the names pydantic gives a union's branches
    ('constrained-int', "literal['auto']", 'list[str]') and a mapping's key check ('[key]').  Those stand only right
    after a union field or a mapping's key, so the walk follows the schema: a key of the user's own that looks like
    a branch name ('int', 'list[str]') stays in."""
    parts: list[str] = []
    here: Any = Config  # the schema type at this point of the path; None past what the schema describes
    skip = ""  # what the next location part is, when it is pydantic's and not a key: "branch" or "[key]"
    for part in loc:
        if skip == "branch" and isinstance(part, str) or skip == "[key]" and part == "[key]":
            skip = ""
            continue
        parts.append(str(part))
        skip = ""
        if isinstance(here, type) and issubclass(here, BaseModel) and part in here.model_fields:
            kinds = [k for k in _members(here.model_fields[part].annotation) if k is not type(None)]
            skip = "branch" if len(kinds) > 1 else ""
            here = kinds[0] if len(kinds) == 1 else None
        else:  # a list index or a mapping's key: the next part may be pydantic's check of that key
            skip = "[key]" if typing.get_origin(here) is dict else ""
            here = None
    return ".".join(parts)


def _members(annotation: Any) -> tuple:
    """The types a field may hold: the members of a union (`X | None` too), else the annotation itself."""
    return typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (
        annotation,)


def _known_keys(section: str) -> list[str]:
    model = _section_model(section.split(".") if section else [])
    return list(model.model_fields) if model is not None else []


def _section_model(parts: list[str]) -> type[BaseModel] | None:
    """The schema class of the section at the dotted path `parts` ([] is the whole config); None: not a section."""
    model: type[BaseModel] = Config
    for part in parts:
        field = model.model_fields.get(part)
        kinds = _members(field.annotation) if field is not None else ()
        sections = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]  # `X | None` too
        if not sections:
            return None
        model = sections[0]
    return model


# --- text in sentences: a value or key the user wrote, cut short and with control characters escaped, so that
# neither a megabyte value nor an escape sequence reaches the terminal whole.

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel, _REPR.maxdict, _REPR.maxlist = 80, 80, 3, 6, 6


def _shown(value: Any) -> str:
    """`value` as Python writes it (strings quoted, so '3' shows it was text), at most about 100 characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        # (repr of an int over 4,300 digits raises ValueError since Python 3.11)
        return f"a whole number of about {int(value.bit_length() * 0.30103):,} digits"
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):  # an int beyond repr's digit limit inside a list
        return f"a {type(value).__name__}"


def _is_number(text: str) -> bool:
    """Whether `text` reads as a finite number ('3', '1e-4'; not 'nan')."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _kind(value: Any) -> str:
    """What a YAML value is, in words."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the text {_shown(value)}"
    return f"the value {_shown(value)}"


# --- reading YAML


class _Refused(Exception):
    """YAML that parses but that a config may not hold: `text` is the rest of a sentence, `line` 1-based or None."""

    def __init__(self, text: str, line: int | None = None):
        super().__init__(text)
        self.text, self.line = text, line


_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: several times faster, and it stops at 1,000 levels


class _ConfigLoader(_Base):
    """PyYAML's safe loader with YAML 1.2's floats (below), a key given twice refused, and a tag or a value that
    cannot be built (`!!python/object`, `!!int 3.5`) refused in a sentence instead of a traceback."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue  # (a merge may repeat keys: the mapping's own win; a list as a key fails below)
                key = self.construct_object(key_node)
                first = seen.setdefault(key, key_node)
                if first is not key_node:
                    raise _Refused(f"the key `{visible(str(key), 100)}` is given twice (first on line "
                                   f"{first.start_mark.line + 1}); keep one of them", key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError, AttributeError, TypeError, OverflowError) as exc:
            # what a standard tag's constructor raises for text it cannot read: int('3.5'), bool 'maybe',
            # int() of more than 4,300 digits
            reason = str(exc).split(";")[0]
            raise _Refused(f"{_shown(node.value)} cannot be read as {_tag(node.tag)} ({visible(reason, 200)}); write "
                           "a plain value", node.start_mark.line + 1) from None

    def refuse_tag(self, node):
        raise _Refused(f"the tag {visible(_tag(node.tag), 100)} is not allowed: a config holds only text, numbers, "
                       "true/false, null, lists and mappings; remove the tag (or quote the value when the ! is "
                       "part of its text)", node.start_mark.line + 1)


def _tag(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!")


_ConfigLoader.add_constructor(None, _ConfigLoader.refuse_tag)


class _ConfigDumper(yaml.SafeDumper):
    """Writes text that _ConfigLoader reads as a float ('1e-4') in quotes, so a resolved config reads back equal."""


# YAML 1.1 (PyYAML) reads 1e-4, 5E+3 and 1.0e4 as text: its floats need a dot and a signed exponent.  YAML 1.2
# (its core schema) reads every one as a float, as JSON and Python do; so do we.  Digits alone stay what YAML 1.1
# makes of them (3 an int, 08 text): a float here has a dot or an exponent.
_FLOAT_12 = re.compile(r"^[-+]?(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)$")
for _resolving in (_ConfigLoader, _ConfigDumper):
    _resolving.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+.0123456789"))


def _yaml_data(text: str) -> Any:
    """The value a YAML document holds.  Raises yaml.YAMLError for text that is not YAML (the error names the
    line), and _Refused for YAML that a config may not hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: bytes that were not UTF-8 (a --set from a shell)
        raise _Refused(f"character {exc.start} is not text (a byte that is not UTF-8, shown as "
                       f"{_shown(text[exc.start])}); write it in UTF-8") from None
    loader = _ConfigLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # PyYAML without libyaml composes by recursion; libyaml stops at 1,000 levels
            raise _Refused(f"nests lists and mappings more than {MAX_DEPTH} deep; a config needs three") from None
        if node is None:
            return None
        _check_shape(node, {}, set(), 1)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_shape(node: yaml.Node, known: dict[int, tuple[int, int]], open_nodes: set[int],
                 depth: int) -> tuple[int, int]:
    """(values, levels) under `node`, with each alias counted as what it stands for; refuses a document nested more
    than MAX_DEPTH deep, one of more than MAX_VALUES values, and an alias inside the value it names (`&a [*a]`).
    `known` holds the nodes already measured (an alias is the same node again), so this takes one pass."""
    where = node.start_mark.line + 1
    if id(node) in known:
        values, levels = known[id(node)]
    else:
        if id(node) in open_nodes:
            raise _Refused("an alias stands inside the value it names, which never ends; remove it", where)
        if depth > MAX_DEPTH:
            raise _Refused(f"nests lists and mappings more than {MAX_DEPTH} deep; a config needs three", where)
        open_nodes.add(id(node))
        values, levels = 1, 1
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        for child in children:
            child_values, child_levels = _check_shape(child, known, open_nodes, depth + 1)
            values, levels = values + child_values, max(levels, child_levels + 1)
            if values > MAX_VALUES:
                raise _Refused(f"holds more than {MAX_VALUES:,} keys and values (an alias, *name, counted as all it "
                               "stands for), and a config holds about a hundred", where)
        open_nodes.discard(id(node))
        known[id(node)] = (values, levels)
    if depth + levels - 1 > MAX_DEPTH:
        raise _Refused(f"nests lists and mappings more than {MAX_DEPTH} deep; a config needs three", where)
    return values, levels


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """A YAML syntax error as the rest of a sentence that begins with the file's name."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow anywhere
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        line = text.count("\n", 0, max(text.find(char), 0)) + 1
        return (f", line {line}: holds the control character U+{ord(char):04X}, which YAML does not allow; remove "
                "it (a file full of them is UTF-16 without a byte-order mark, or not text: save it as UTF-8).")
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f": not valid YAML ({visible(str(exc), 300)}); fix the line it names."
    lines = text.splitlines()
    tab = mark.line < len(lines) and "\t" in lines[mark.line][: mark.column + 1]
    hint = "YAML indents with spaces, not tabs: replace the tab" if tab else "fix that line"
    problem = visible(getattr(exc, "problem", None) or str(exc), 200)
    if problem == "but found another document":
        problem = "a second document starts here"
        hint = "a config is one document: remove the --- line and what follows"
    return f", line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {problem}; {hint}."


def _config_text(data: bytes, name: str) -> str:
    """The file's text: UTF-8 (a leading byte-order mark dropped), or UTF-16/32 when a byte-order mark says so."""
    codec = declared_codec(data) or "utf-8"
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{name}, line {line}: byte {exc.start} (0x{data[exc.start]:02x}) is not {codec.upper()} text; "
                        "save the config as UTF-8 (it is probably in Latin-1 or Windows-1252, or not text).") from None


def read_config_file(path: Path, wanted: str = "a YAML file such as examples/quickstart.yaml") -> str:
    """The text of the config file at `path` (tunesmith's, or another tool's that `tunesmith convert` reads:
    `wanted` says which in the sentences); a sentence for a path that is missing, a folder, a named pipe or a
    device (looked at with stat before anything opens it, so nothing blocks), too large, or not text."""
    name = visible(str(path), 300)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{name}: no such config file; give the path to {wanted}.") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL character in the path
        raise UserError(f"{name}: cannot look at this path ({visible(str(exc), 200)}); give the path to "
                        f"{wanted}.") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{name} is a folder, not a config file; give the YAML file in it (in a run folder: "
                        f"{name}/config.yaml).")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{name} is not a regular file (a named pipe, device or socket); give the path to "
                        f"{wanted}.")
    too_large = (f"{name} is over {MAX_CONFIG_BYTES // 1024} KiB, and a config is a few KB "
                 "(examples/quickstart.yaml: 1 KB); is this a data file? Give data files as data.path.")
    if info.st_size > MAX_CONFIG_BYTES:
        raise UserError(too_large)
    try:
        # O_NONBLOCK: should the path have become a named pipe since the stat, opening it still returns at once
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise UserError(f"{name} is not a regular file; give the path to a YAML config file.")
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{name}: cannot be read ({exc.strerror or exc}); check its permissions.") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UserError(too_large)
    return _config_text(data, name)


def read_yaml_text(text: str, name: str) -> Any:
    """What the YAML file `name` (a config, or another file a user writes like one: a sweep's space) holds, read
    as a config is (YAML 1.2 floats; a key given twice, a tag and an alias bomb refused), or a UserError that
    names the file and the line."""
    try:
        return _yaml_data(text)
    except _Refused as exc:
        raise UserError(f"{name}{f', line {exc.line}' if exc.line else ''}: {exc.text}.") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{name}{_yaml_problem(exc, text)}") from None


# --- overrides and loading


def set_line(key: str, value: Any) -> str:
    """`KEY=VALUE` as `--set` (parse_value) reads it back to the same value: JSON is YAML, so a string stays a
    string ("8" in quotes is text, not the number 8) and a float keeps every digit."""
    return f"{key}={json.dumps(value)}"


def parse_value(text: str, key: str = "") -> Any:
    """A `--set` value is read as YAML, with the same reader as a config file, so 3e-4, true, null and
    [q_proj, v_proj] mean what they say and "3" is text.  What YAML cannot parse, and a value in which it would
    see a comment (`#### (.+)` is null to YAML, `Use # for titles` is 'Use'), is taken as the text it is."""
    where = f"--set {visible(key, 100)}" if key else "--set"
    if len(text) > MAX_CONFIG_BYTES:
        raise UserError(f"{where}: the value is {len(text):,} characters; a config value is at most "
                        f"{MAX_CONFIG_BYTES:,}.")
    try:
        value = _yaml_data(text)
    except _Refused as exc:
        raise UserError(f"{where}: {exc.text}.") from None
    except yaml.YAMLError:
        return text
    comment = re.search(r"(^|\s)#", text) is not None and "#" not in repr(value)
    return text if comment else value


def apply_overrides(raw: Any, overrides: list[str], source: str = "config") -> dict:
    """Apply `KEY=VALUE` strings with dotted keys (training.epochs=1) to a raw config mapping.  Only the
    mappings on an override's path are copied; `raw` is left as it was."""
    out = dict(_top_mapping(raw, source))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {visible(item, 100)}: write it as KEY=VALUE, e.g. --set training.epochs=1.")
        key, value = item.split("=", 1)
        parts = [part.strip() for part in key.strip().split(".")]
        if not all(parts):
            raise UserError(f"--set {visible(item, 100)}: the key {f'`{visible(key, 100)}` ' if key.strip() else ''}has an "
                            "empty name before, between or after its dots; write KEY=VALUE with a dotted key, "
                            "e.g. --set training.epochs=1.")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            dotted = ".".join(parts[: i + 1])
            if isinstance(child, str) and dotted in SHORT_FORMS:  # `objective: dpo` in the file, a key of it set
                child = {SHORT_FORMS[dotted]: child}
            elif isinstance(child, list) and dotted == "data":  # `data: [a.jsonl, b.jsonl]` in the file
                child = {"sources": child}
            if child is None:
                child = {}
            elif isinstance(child, dict):
                child = dict(child)
            else:
                raise UserError(f"--set {visible(key, 100)}: `{visible('.'.join(parts[:i + 1]), 100)}` is a value, not a section, "
                                f"so it has no key `{visible(parts[i + 1], 100)}`.")
            node[part] = child
            node = child
        parsed = parse_value(value, key)
        section = _section_model(parts)
        short = SHORT_FORMS.get(".".join(parts))
        if parts == ["data"] and isinstance(parsed, (str, list)):  # a file or a list of sources: the data, all of it
            kept = node.get("data") if isinstance(node.get("data"), dict) else {}
            given, replaced = ("path", "sources") if isinstance(parsed, str) else ("sources", "path")
            node["data"] = {**{k: v for k, v in kept.items() if k != replaced}, given: parsed}
            continue
        if short is not None and isinstance(parsed, str):  # `--set objective=dpo` is `--set objective.type=dpo`
            node[parts[-1]] = {**(node.get(parts[-1]) or {}), short: parsed} if isinstance(node.get(parts[-1]), dict) \
                else {short: parsed}
            continue
        if section is not None and parsed is not None and not isinstance(parsed, dict):
            raise UserError(f"--set {visible(key, 100)}: `{visible(key, 100)}` is a section, not a value; set one of its keys, "
                            f"e.g. --set {visible(key, 100)}.{next(iter(section.model_fields))}=...")
        node[parts[-1]] = parsed
    return out


def _top_mapping(raw: Any, source: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the top level is {_kind(raw)}, not a mapping of sections; a config starts with "
                        "section names such as `model:`, `data:` and `training:` (see examples/quickstart.yaml).")
    return raw


def config_from_dict(raw: dict | None, source: str = "config") -> Config:
    raw = _top_mapping(raw, source)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_explain(exc, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from the defaults when `path` is None) and apply `--set` overrides."""
    raw: Any = {}
    source = "defaults"
    if path is not None:
        source = visible(str(path), 300)
        raw = read_yaml_text(read_config_file(Path(path)), source)
    raw = apply_overrides(raw, overrides or [], source)
    return config_from_dict(raw, source)


def load_config_text(text: str, overrides: list[str] | None = None, source: str = "config") -> Config:
    """`load_config` for a config held as text (the studio's YAML view), read with the same checks as a file."""
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise UserError(f"{source}: the config is {len(text.encode()):,} bytes; a config is at most {MAX_CONFIG_BYTES:,}.")
    raw = read_yaml_text(text, source) if text.strip() else {}
    return config_from_dict(apply_overrides(raw, overrides or [], source), source)


def resolved_yaml(cfg: Config) -> str:
    """Every key with its value, defaults included, as YAML that `load_config` reads back to an equal config."""
    return yaml.dump(cfg.model_dump(mode="json"), Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True)
