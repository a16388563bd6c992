"""The run config: schema, YAML loading, `--set` overrides and defaults.

One YAML file describes a run.  Every key has a default (SPEC step 3 takes its
training defaults from Intel's Edge AI Tuning Kit: batch size 2, eval batch
size 1, gradient accumulation 1, learning rate 1e-4, cosine schedule, 3 epochs,
AdamW).  Unknown keys and bad values fail with the key's dotted path, what was
given and what is allowed.  `resolved_yaml()` writes every default out, and
loading that text back gives the same config.
"""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunesmith.errors import UserError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(
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


class DataConfig(_Section):
    path: str = Field("examples/data/dates-train.jsonl", description="Training data file.")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text"] = "auto"
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map our field names to the file's columns, e.g. {prompt: dialogue, completion: summary}.",
    )
    system_prompt: str | None = Field(None, description="System message put before every conversation.")
    max_length: int = Field(512, ge=8, description="Rows longer than this many tokens are truncated.")
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens (default: masked).")
    validation_split: float = Field(0.1, ge=0.0, lt=1.0, description="Share of rows held out for validation.")
    validation_path: str | None = Field(None, description="A separate validation file (overrides validation_split).")
    test_path: str | None = Field(
        None, description="Held-out rows for the before/after evaluation; default: the validation rows."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N rows of the training file.")
    seed: int = 42


class LoraConfig(_Section):
    r: int = Field(16, ge=1, description="Adapter rank (for adalora: the average rank it ends with).")
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
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
        None, ge=1, description="Rank every layer starts with; default 1.5 x lora.r (lora.r is the average it ends with)."
    )
    tinit: int | None = Field(None, ge=0, description="Steps before ranks start to shrink; default 10% of the run.")
    tfinal: int | None = Field(None, ge=0, description="Last steps with ranks fixed; default 20% of the run.")
    delta_t: int = Field(1, ge=1, description="Reallocate ranks every this many steps.")
    beta1: float = Field(0.85, ge=0.0, lt=1.0, description="Smoothing of the importance scores.")
    beta2: float = Field(0.85, ge=0.0, lt=1.0, description="Smoothing of their uncertainty.")
    orth_reg_weight: float = Field(0.5, ge=0.0, description="Weight of the loss that keeps the factors orthogonal.")
    total_step: int | None = Field(
        None, ge=1, description="Length of the rank schedule in steps; default the run's planned steps."
    )


class TrainingConfig(_Section):
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps.")
    batch_size: int = Field(2, ge=1)
    eval_batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
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
        "and loss as padded batches. auto: on for causal LMs whose attention tunesmith has checked (Llama, "
        "Mistral, Qwen2/3, Gemma, Phi-3).",
    )
    pass_tokens: Annotated[int, Field(ge=8)] | Literal["auto"] = Field(
        "auto",
        description="With packing, at most this many tokens go through the model at once; a longer micro-batch "
        "runs as several passes whose gradients add up (the same step, less activation memory). auto: "
        "max(data.max_length, 1024) on a CPU, the whole micro-batch on a GPU.",
    )
    fast_kernels: Literal["auto", "off"] = Field(
        "auto",
        description="Patches that train faster in less memory (src/tunesmith/models/fast). auto: tunesmith's fused "
        "LoRA-dropout, RMSNorm and rotary paths where they apply; off: the stock PEFT/transformers modules.",
    )
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0)
    eval_each_epoch: bool = True
    eval_steps: int | None = Field(None, ge=1, description="Also compute validation loss every N steps.")
    save_steps: int | None = Field(
        None, ge=1, description="Save a checkpoint every N steps (one is always saved at each epoch end)."
    )
    save_total_limit: int = Field(2, ge=1, description="Keep only the newest K checkpoints.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations without improvement; null turns it off."
    )
    early_stopping_threshold: float = Field(0.0, ge=0.0, description="Improvement smaller than this does not count.")
    load_best_at_end: bool = Field(False, description="End with the weights of the best validation loss.")
    seed: int = 42
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch; default: all cores.")

    @field_validator("fast_kernels", mode="before")
    @classmethod
    def _off_from_yaml(cls, value: Any) -> Any:
        """YAML reads a bare `off` as false: `fast_kernels: off` and `--set training.fast_kernels=off` mean off."""
        return "off" if value is False else value


EVAL_METRICS = ("perplexity", "rouge", "bleu", "chrf", "exact_match", "similarity", "bertscore")
EvalMetric = Literal["perplexity", "rouge", "bleu", "chrf", "exact_match", "similarity", "bertscore"]


class EvalConfig(_Section):
    enabled: bool = Field(True, description="Compare base and tuned on the held-out rows after training.")
    limit: int | None = Field(50, ge=1, description="Evaluate at most this many held-out rows.")
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)
    answer_regex: str | None = Field(
        None, description="Compare only what this regex's first group captures (e.g. '#### (.+)')."
    )
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
    name: str | None = Field(
        None,
        description="The model that teaches (`tunesmith distill`): a built-in name, a Hugging Face folder or hub id, "
        "or a tunesmith run folder, whose adapter is applied on the fly.",
    )
    load_in_4bit: bool = Field(False, description="Load the teacher's linear layers in 4-bit NF4 (needs bitsandbytes).")


class PruneConfig(_Section):
    keep_layers: int = Field(ge=1, description="How many of the teacher's decoder layers the student keeps, evenly spaced.")


class StudentConfig(_Section):
    name: str | None = Field(
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
        64, ge=1, description="With --cache-teacher: the teacher log-probs kept per token; the mass beyond them is "
        "kept as one 'rest' bucket."
    )
    cache_dir: str | None = Field(
        None, description="Where --cache-teacher keeps the teacher's top-k (default: teacher-cache/ in the run folder); "
        "a cache made by the same teacher, temperature and top_k is reused."
    )
    max_new_tokens: int = Field(
        256, ge=1, description="Sequence-level distillation (teacher and student tokenizers differ): the longest "
        "answer the teacher writes per prompt."
    )
    generation_batch_size: int = Field(8, ge=1, description="Prompts the teacher answers at once (sequence level).")


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
        1800, gt=0, description="With several processes (--nproc, torchrun, accelerate launch): how long one waits "
        "for the others at a collective step before the job stops with a sentence."
    )


class OutputConfig(_Section):
    dir: str | None = Field(None, description="Run folder; default runs/<config name>-<date>-<time>.")


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: Literal["lora", "qlora", "dora", "rslora", "adalora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    qlora: QloraConfig = Field(default_factory=QloraConfig)
    adalora: AdaloraConfig = Field(default_factory=AdaloraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _lower_method(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


def _allowed(err: dict) -> str:
    """What a value may be, in words, from a pydantic error record."""
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "literal_error":
        return "one of " + ctx.get("expected", "")
    if kind == "extra_forbidden":
        return "no such key here"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return err["msg"].lower()
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
    return err["msg"]


def _explain(exc: ValidationError, source: str) -> str:
    lines = []
    allowed_by_key: dict[str, tuple[Any, list[str]]] = {}  # a union gives one error per branch: one line per key
    for err in exc.errors():
        # Skip the union's internal branch names (e.g. 'str', 'list[str]', 'constrained-int') from the path.
        key = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in UNION_BRANCHES)))
        given = err.get("input")
        if err["type"] == "extra_forbidden":
            section = key.rsplit(".", 1)[0] if "." in key else ""
            known = _known_keys(section)
            lines.append(f"unknown config key `{key}`; the keys allowed here are: {', '.join(known)}.")
        elif err["type"] == "missing":
            lines.append(f"config key `{key}` is missing; give it a value.")
        elif key in allowed_by_key:
            allowed_by_key[key][1].append(_allowed(err))
        else:
            allowed_by_key[key] = (given, [_allowed(err)])
            lines.append(key)  # a placeholder, filled in below once every branch is known
    for key, (given, allowed) in allowed_by_key.items():
        lines[lines.index(key)] = f"config key `{key}`: given {given!r}; allowed: {', or '.join(allowed)}."
    return f"{source}: " + " ".join(lines)


UNION_BRANCHES = ("str", "int", "float", "bool", "constrained-int", "constrained-float")


def _known_keys(section: str) -> list[str]:
    model: type[BaseModel] = Config
    for part in [p for p in section.split(".") if p]:
        field = model.model_fields.get(part)
        kinds = [field.annotation, *typing.get_args(field.annotation)] if field is not None else []
        sections = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]  # `X | None` too
        if not sections:
            return []
        model = sections[0]
    return list(model.model_fields)


def parse_value(text: str) -> Any:
    """A `--set` value is read as YAML, so 3e-4, true, null and [q_proj, v_proj] mean what they say."""
    try:
        # YAML 1.1 reads '3e-4' as a string; give numbers a chance first.
        return float(text) if _looks_like_float(text) else yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return not text.strip().lstrip("+-").isdigit() and text.strip().lower() not in ("nan", "inf", "-inf", "infinity")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `KEY=VALUE` strings with dotted keys (training.epochs=1) to a raw config mapping."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: write it as KEY=VALUE, e.g. --set training.epochs=1.")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {key}: `{part}` is a value, not a section, so it has no key `{parts[-1]}`.")
            node = child
        node[parts[-1]] = parse_value(value)
    return out


def config_from_dict(raw: dict | None, source: str = "config") -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the top level must be a mapping of sections (model:, data:, training:, ...).")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_explain(exc, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from the defaults when `path` is None) and apply `--set` overrides."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(f"{p}: no such config file; give the path to a YAML file such as examples/quickstart.yaml.")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{p}: not valid YAML ({exc}); fix the line it names.") from None
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source)


def resolved_yaml(cfg: Config) -> str:
    """Every key with its value, defaults included, as YAML that `load_config` reads back to an equal config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
