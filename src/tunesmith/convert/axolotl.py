"""An axolotl training YAML -> a tunesmith config.

The keys are those of axolotl's config reference (docs/config.qmd) and its data set types (docs/dataset-formats/,
docs/rlhf.qmd).  Data sets (`datasets:`, one mapping each) become data.path/format/columns, or data.sources when
there are several; `rl:` becomes objective.type.  Anything tunesmith has no equivalent for is listed by the Builder
with the reason.
"""

from __future__ import annotations

from typing import Any

from tunesmith.convert.common import (
    Builder,
    Source,
    add_tracker,
    drop_known,
    drop_matching,
    held_out,
    model_and_code,
    optimizer,
    precision,
    put_once,
    role_names,
    same_strategies,
    scheduler,
    shown_value,
    sources_to_data,
    trainer_keys,
    without_same,
)
from tunesmith.errors import UserError, visible

# Keys that say a YAML is axolotl's (detect_tool in convert/__init__.py counts them).
MARKERS = ("base_model", "datasets", "micro_batch_size", "adapter", "sequence_len", "num_epochs", "lora_r",
           "lora_target_modules", "lora_target_linear", "sample_packing", "val_set_size", "rl", "wandb_project",
           "load_in_4bit", "train_on_inputs")

# axolotl's defaults where they differ from tunesmith's (axolotl's config schema, src/axolotl/utils/schemas/):
# one epoch, a micro-batch of one row, no validation rows, no adapter dropout.
DEFAULTS = {"num_epochs": 1.0, "micro_batch_size": 1, "lora_dropout": 0.0}

RL_OBJECTIVES = ("dpo", "ipo", "orpo", "simpo", "kto")

# HF `datasets` builder names that axolotl takes as `path` together with `data_files`
_BUILDERS = ("json", "parquet", "csv", "arrow", "text")

# Preference types (docs/rlhf.qmd), after the prompt-format prefix (chatml., llama3., ...): the file's column for
# each of our fields.  KTO's types carry a `label` column as they are.
_PAIR_COLUMNS = {
    "prompt_pairs": {},
    "intel": {"prompt": "question"},
    "icr": {"prompt": "input"},
    "argilla": {"prompt": "instruction", "chosen": "chosen_response", "rejected": "rejected_response"},
    "argilla_chat": {},  # chosen and rejected are whole conversations (tunesmith: preference_conversation)
}
_KTO_COLUMNS = {"prompt_pairs": {}, "ultra": {}, "intel": {"prompt": "question"}, "argilla": {"prompt": "instruction"}}

_ATTENTION = "tunesmith runs the model's own attention (PyTorch SDPA); padding-free packing (training.packing) is " \
    "how it skips padding"
_DROPPED = {
    "base_model_ignore_patterns": "tunesmith reads safetensors weights only",
    "revision_of_model": "tunesmith loads the model as it is in the folder or the hub cache; download the revision",
    "tokenizer_use_fast": "tunesmith loads the model's own (fast) tokenizer",
    "tokenizer_legacy": "tunesmith loads the model's own (fast) tokenizer",
    "resize_token_embeddings_to_32x": "tunesmith keeps the model's vocabulary as it is",
    "shrink_embeddings": "tunesmith keeps the model's vocabulary as it is",
    "embeddings_skip_upcast": "tunesmith keeps the embeddings in the model's precision",
    "random_init_weights": "tunesmith fine-tunes pretrained weights",
    "overrides_of_model_config": "tunesmith uses the model's config.json as it is (rope scaling included)",
    "model_config": "tunesmith uses the model's config.json as it is",
    "overrides_of_model_kwargs": "tunesmith picks the loading arguments itself",
    "special_tokens": "tunesmith uses the tokenizer's own special tokens and chat template",
    "tokens": "tunesmith adds no tokens to the vocabulary",
    "added_tokens_overrides": "tunesmith adds no tokens to the vocabulary",
    "chat_template_jinja": "tunesmith formats conversations with the model's own chat template",
    "eot_tokens": "tunesmith trains each reply's end-of-turn token as the model's own chat template writes it",
    "gpu_memory_limit": "tunesmith checks the fit itself before training (tunesmith estimate; train --memory-limit)",
    "max_memory": "tunesmith checks the fit itself before training (train --memory-limit)",
    "device_map": "tunesmith places the model on this machine's device itself",
    "low_cpu_mem_usage": "tunesmith loads the weights its own way",
    "lora_on_cpu": "tunesmith keeps the adapter beside the base on the training device",
    "gptq": "tunesmith trains no GPTQ-quantised models",
    "lora_modules_to_save": "tunesmith's adapters hold only the LoRA matrices (method full trains every weight)",
    "lora_model_dir": "tunesmith starts a new adapter; to go on from one, resume a tunesmith run (train --resume)",
    "peft_layers_to_transform": "tunesmith puts adapters on every layer (lora.target_modules picks the modules)",
    "peft_layer_replication": "tunesmith does not replicate layers",
    "peft_init_lora_weights": "tunesmith initialises adapters as PEFT does by default (A random, B zero)",
    "loraplus_lr_ratio": "tunesmith trains both adapter matrices at one learning rate (no LoRA+)",
    "loraplus_lr_embedding": "tunesmith trains both adapter matrices at one learning rate (no LoRA+)",
    "lora_fan_in_fan_out": "tunesmith reads GPT-2's Conv1D layers transposed by itself",
    "peft": "tunesmith has no LoftQ initialisation",
    "dataset_prepared_path": "tunesmith caches tokenised data itself (under $TUNESMITH_HOME/tokenized)",
    "push_dataset_to_hub": "tunesmith pushes nothing to a hub",
    "dataset_processes": "tunesmith picks the processes that tokenise",
    "dataset_num_proc": "tunesmith picks the processes that tokenise",
    "dataset_keep_in_memory": "tunesmith keeps tokenised rows in memory and in its cache",
    "dataset_exact_deduplication": "tunesmith keeps every row (it leaves out only rows with an empty answer)",
    "dataset_shard_num": "tunesmith reads the whole data set (data.limit takes the first N rows)",
    "dataset_shard_idx": "tunesmith reads the whole data set (data.limit takes the first N rows)",
    "pad_to_sequence_len": "tunesmith pads a micro-batch to its longest row, or packs rows (training.packing)",
    "eval_sample_packing": "tunesmith validates on padded batches",
    "curriculum_sampling": "tunesmith shuffles the rows every epoch",
    "batch_flattening": "training.packing is tunesmith's padding-free batching",
    "pretraining_dataset": "tunesmith reads data files and data set folders, not a streamed pre-training set",
    "skip_prepare_dataset": "tunesmith always tokenises (and caches) the data itself",
    "dpo_use_weighting": "tunesmith's DPO weighs every pair equally",
    "rpo_alpha": "tunesmith's DPO adds no NLL term (RPO)",
    "dpo_norm_loss": "tunesmith's DPO sums the answer's log-probabilities",
    "cpo_alpha": "tunesmith's simpo is SimPO's loss without CPO's behaviour-cloning (NLL) term",
    "remove_unused_columns": "tunesmith reads only the columns it needs",
    "reward_model": "tunesmith trains no reward models", "process_reward_model": "tunesmith trains no reward models",
    "lr_quadratic_warmup": "tunesmith's warmup is linear",
    "lr_scheduler_kwargs": "tunesmith's schedules take no extra arguments",
    "cosine_min_lr_ratio": "tunesmith's cosine decays to 0",
    "cosine_constant_lr_ratio": "tunesmith's cosine decays to 0 from the end of warmup",
    "lr_div_factor": "tunesmith has no one-cycle schedule",
    "optim_args": "tunesmith's AdamW takes training.adam_beta1, adam_beta2 and adam_epsilon",
    "optim_target_modules": "tunesmith has no GaLore",
    "gradient_checkpointing_kwargs": "tunesmith picks the checkpointing arguments itself",
    "flash_optimum": _ATTENTION, "xformers_attention": _ATTENTION, "flash_attention": _ATTENTION,
    "sdp_attention": _ATTENTION, "s2_attention": _ATTENTION, "attn_implementation": _ATTENTION,
    "evals_per_epoch": "tunesmith validates at each epoch end (training.eval_each_epoch) and every training.eval_steps "
    "steps",
    "saves_per_epoch": "tunesmith saves a checkpoint at each epoch end and every training.save_steps steps",
    "eval_table_size": "tunesmith's before/after evaluation writes every answer to eval/predictions.jsonl",
    "do_causal_lm_eval": "tunesmith's before/after evaluation (eval:) scores generated answers after training",
    "eval_causal_lm_metrics": "tunesmith's evaluation metrics are eval.metrics (perplexity, rouge, bleu, chrf, ...)",
    "profiler_steps": "tunesmith has no profiler hook (bench/ measures speed)",
    "loss_watchdog_threshold": "tunesmith stops on a non-finite loss, not on a high one",
    "loss_watchdog_patience": "tunesmith stops on a non-finite loss, not on a high one",
    "auto_resume_from_checkpoints": "tunesmith resumes a run of its own: tunesmith train RUN/config.yaml --resume",
    "hf_use_auth_token": "tunesmith uses the hub login of the environment",
    "fsdp_version": "tunesmith's FSDP is FSDP2 (distributed.strategy: fsdp)",
    "sequence_parallel_degree": "tunesmith has no sequence parallelism",
    "context_parallel_size": "tunesmith has no sequence parallelism",
    "heads_k_stride": "tunesmith has no sequence parallelism",
    "ring_attn_func": "tunesmith has no sequence parallelism",
    "strict": "a setting of axolotl's own command line",
    "debug": "a setting of axolotl's own debugging",
    "plugins": "tunesmith loads no axolotl plugins (its chunked loss already saves the logits' memory, as cut "
    "cross-entropy does)",
    "torchdistx_path": "tunesmith's optimisers need no torchdistx",
    "image_size": "tunesmith trains text models", "image_resize_algorithm": "tunesmith trains text models",
    "processor_type": "tunesmith trains text models",
    "unfrozen_parameters": "tunesmith's method full trains every weight; it freezes none by name",
    "wandb_entity": "tunesmith's W&B runs go to the login's default entity (the WANDB_ENTITY variable sets another)",
    "wandb_watch": "tunesmith logs no gradients or parameters to W&B",
    "wandb_log_model": "tunesmith sends no weights to W&B; the run folder holds them",
    "wandb_run_id": "tunesmith starts a new W&B run",
    "hf_mlflow_log_artifacts": "tunesmith logs training.png and report.md to MLflow, not checkpoints",
    "use_comet": "tunesmith reports to tensorboard, mlflow and wandb (logging.report_to)",
    "dataset_shard_count": "tunesmith reads the whole data set",
}
_PATTERNS = [
    (r"^relora_", "tunesmith has no ReLoRA restarts"),
    (r"^comet_", "tunesmith reports to tensorboard, mlflow and wandb (logging.report_to)"),
    (r"^flash_attn_", _ATTENTION),
    (r"^liger_", "tunesmith runs its own fused paths (training.fast_kernels), not Liger's kernels"),
    (r"^cut_cross_entropy", "tunesmith's chunked loss saves the logits' memory its own way"),
    (r"^unsloth_", "tunesmith runs its own fused paths (training.fast_kernels), not Unsloth's"),
    (r"^lora_\w+_kernel$", "axolotl's Triton LoRA kernels; tunesmith's own fused LoRA paths apply (training.fast_kernels)"),
    (r"^sample_packing_", "tunesmith packs a micro-batch's rows end to end; it needs no packing estimates"),
    (r"^is_\w+_derived_model$", "tunesmith reads the model's family from its config.json"),
    (r"^fsdp_", "tunesmith's FSDP2 takes no settings beyond distributed.strategy: fsdp"),
    (r"^ddp_", "tunesmith sets DDP's arguments itself"),
    (r"^kd_", "tunesmith distil is its own command (tunesmith distill, a teacher: section)"),
]


def convert(b: Builder, model: str | None, data: list[str]) -> None:
    """Fill `b` from the axolotl config it holds; `model` (--model) and `data` (--data) replace what it names."""
    _model(b, model)
    _method(b)
    objective = _objective(b)
    _data(b, objective, data)
    _training(b)
    _trackers(b)
    trainer_keys(b)
    drop_known(b, _DROPPED)
    drop_matching(b, _PATTERNS)


def _model(b: Builder, model: str | None) -> None:
    model_and_code(b, "base_model", model)
    name = b.raw.get("base_model")
    for key, same in (("base_model_config", name), ("tokenizer_config", name)):
        value = b.take(key)
        if value is not None and value != same:
            b.drop(key, "tunesmith loads the config and tokenizer from the model's own folder", value)
        elif value is not None:
            b.agree(key)
    for key, suffixes in (("model_type", ("ForCausalLM",)), ("tokenizer_type", ("Tokenizer", "TokenizerFast"))):
        value = b.take(key)
        if value is not None and not str(value).endswith(suffixes):
            b.drop(key, "tunesmith reads the model's class from its config.json (model.task: auto)", value)
        elif value is not None:
            b.agree(key)
    template = b.take("chat_template")
    if template is not None and template != "tokenizer_default":
        b.note("chat_template", f"{shown_value('chat_template', template)} is not applied: tunesmith formats "
               "conversations with the model's own chat template (from its tokenizer)")
    elif template is not None:
        b.agree("chat_template")
    if b.has("default_system_message"):
        b.put("data.system_prompt", b.text("default_system_message", b.take("default_system_message")),
              "default_system_message")
    b.take("default_system_message")


def _method(b: Builder) -> None:
    adapter = b.take("adapter")
    four = b.flag("load_in_4bit", b.take("load_in_4bit")) if b.has("load_in_4bit") else False
    b.take("load_in_4bit")
    if adapter is None:
        method = "full"
        b.note("adapter", "absent (every weight trains) -> method: full")
    elif str(adapter).lower() in ("lora", "qlora"):
        method = str(adapter).lower()
    else:
        raise UserError(f"{b.where()}: adapter: {shown_value('adapter', adapter)} has no tunesmith equivalent; tunesmith "
                        "trains adapter: lora or qlora, or every weight (no adapter:). Change it and convert again.")
    if four and method == "lora":
        method = "qlora"
        b.note("load_in_4bit", "true with adapter: lora -> method: qlora (LoRA on the 4-bit base, as axolotl trains it)")
    elif four and method == "full":
        b.drop("load_in_4bit", "a full fine-tune in tunesmith trains every weight in full precision", True)
    elif four:
        b.agree("load_in_4bit")  # adapter: qlora loads the base in 4 bits, as method qlora does
    b.put("method", method, "adapter")
    if b.take("load_in_8bit") not in (None, False):
        b.drop("load_in_8bit", "tunesmith has no 8-bit loading: LoRA trains on the full-precision weights (method "
               "qlora on 4-bit ones)", True)
    bnb = b.take("bnb_config_kwargs")
    if isinstance(bnb, dict) and any(not (k == "bnb_4bit_quant_type" and v == "nf4"
                                          or k == "bnb_4bit_use_double_quant" and v is True
                                          or k == "llm_int8_has_fp16_weight" and v is False) for k, v in bnb.items()):
        b.drop("bnb_config_kwargs", "tunesmith's 4-bit weights are NF4 with double quantisation (QLoRA's recipe)", bnb)
    elif bnb:
        b.agree("bnb_config_kwargs")
    lora_keys = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
                 "peft_use_dora", "peft_use_rslora")
    if method == "full":
        for key in lora_keys:
            value = b.take(key)
            if value is not None and value is not False:
                b.drop(key, "method full trains every weight and has no adapter", value)
        return
    b.carry_number("lora_r", "lora.r", whole=True)
    b.carry_number("lora_alpha", "lora.alpha")
    b.carry_number("lora_dropout", "lora.dropout", default=DEFAULTS["lora_dropout"])
    for key in ("lora_r", "lora_alpha", "lora_dropout"):
        b.take(key)
    linear = b.flag("lora_target_linear", b.take("lora_target_linear")) if b.has("lora_target_linear") else False
    b.take("lora_target_linear")
    modules = b.take("lora_target_modules")
    if linear:
        b.put("lora.target_modules", "all-linear", "lora_target_linear")
        if modules:
            b.note("lora_target_modules", "lora_target_linear: true already targets every linear layer "
                   "(lora.target_modules: all-linear)")
    elif modules:
        names = [modules] if isinstance(modules, str) else modules
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
            raise UserError(f"{b.where()}: lora_target_modules is {shown_value('lora_target_modules', modules)}; it "
                            "must be a list of module names such as [q_proj, v_proj].")
        b.put("lora.target_modules", [n.strip() for n in names], "lora_target_modules")
    else:
        b.note("lora_target_modules", "not in the source -> lora.target_modules: auto (the family's attention and "
               "MLP projections)")
    for key, dotted in (("peft_use_dora", "lora.use_dora"), ("peft_use_rslora", "lora.use_rslora")):
        if b.has(key):
            b.put(dotted, b.flag(key, b.take(key)), key)
        b.take(key)


def _objective(b: Builder) -> str:
    rl = b.take("rl")
    if rl is None or rl is False:
        objective = "sft"
    elif rl is True:  # axolotl's first preference option was `rl: true`, which meant DPO
        objective = "dpo"
    elif isinstance(rl, str) and rl.strip().lower() in RL_OBJECTIVES:
        objective = rl.strip().lower()
    elif isinstance(rl, str) and rl.strip().lower() == "grpo":
        raise UserError(f"{b.where()}: rl: grpo takes axolotl's reward functions and data set transforms as Python "
                        "code, which a converter cannot carry; write the tunesmith config by hand (objective: grpo with "
                        "objective.rewards, see examples/grpo.yaml).")
    else:
        raise UserError(f"{b.where()}: rl: {shown_value('rl', rl)} has no tunesmith equivalent; tunesmith tunes "
                        f"preferences with {', '.join(RL_OBJECTIVES)} (objective.type).")
    if objective != "sft":
        b.put("objective.type", objective, "rl")
    trl = b.take("trl")
    beta_keys = [] if objective == "sft" else ["rl_beta"] + (["orpo_alpha"] if objective == "orpo" else [])
    for key in beta_keys:
        if b.has(key):
            put_once(b, "objective.beta", b.number(key, b.take(key)), key)
    if isinstance(trl, dict):
        for name, value in trl.items():
            if name == "beta" and value is not None and objective != "sft":
                put_once(b, "objective.beta", b.number("trl.beta", value), "trl.beta")
            elif value is not None:
                b.drop(f"trl.{name}", "a setting of TRL's trainers that tunesmith's own objectives do not take", value)
    elif trl is not None:
        b.drop("trl", "a setting of TRL's trainers that tunesmith's own objectives do not take", trl)
    only = {"simpo_gamma": ("simpo", "objective.simpo_gamma"), "dpo_label_smoothing": ("dpo", "objective.label_smoothing"),
            "kto_desirable_weight": ("kto", "objective.kto_desirable_weight"),
            "kto_undesirable_weight": ("kto", "objective.kto_undesirable_weight"),
            "orpo_alpha": ("orpo", "objective.beta")}
    for key, (wants, dotted) in only.items():
        if key in b.taken or not b.has(key):
            b.take(key)
            continue
        value = b.take(key)
        if objective == wants:
            b.put(dotted, b.number(key, value), key)
        else:
            b.drop(key, f"it applies to rl: {wants}, and this config is {'sft' if objective == 'sft' else 'rl: ' + objective}",
                   value)
    for key in ("rl_beta",):
        if b.has(key) and key not in b.taken:
            b.drop(key, "this config is supervised fine-tuning (no rl:)", b.take(key))
    return objective


def _data(b: Builder, objective: str, replacements: list[str]) -> None:
    b.carry_number("sequence_len", "data.max_length", whole=True)
    if b.has("sample_packing"):
        b.put("training.packing", b.flag("sample_packing", b.take("sample_packing")), "sample_packing")
    b.take("sample_packing")
    if b.has("train_on_inputs"):
        b.put("data.train_on_prompt", b.flag("train_on_inputs", b.take("train_on_inputs")), "train_on_inputs")
    b.take("train_on_inputs")
    held_out(b, "val_set_size")

    datasets = b.take("datasets")
    if isinstance(datasets, dict):
        datasets = [datasets]
    if datasets is None:
        if not replacements:
            raise UserError(f"{b.where()}: datasets is missing, so there is nothing to train on; add it, or give "
                            "--data PATH.")
        sources = [Source(path="", key="--data", local=True) for _ in replacements]
    elif not isinstance(datasets, list) or not datasets:
        raise UserError(f"{b.where()}: datasets is {shown_value('datasets', datasets)}; it must be a list of data "
                        "sets, each a mapping with path and type.")
    else:
        sources = [s for i, entry in enumerate(datasets) for s in _dataset(b, f"datasets[{i}]", entry, objective)]
    sources_to_data(b, sources, replacements, "datasets")

    tests = b.take("test_datasets")
    if tests:
        entries = tests if isinstance(tests, list) else [tests]
        converted = [s for i, e in enumerate(entries) for s in _dataset(b, f"test_datasets[{i}]", e, objective)]
        one = converted[0] if len(converted) == 1 else None
        train = b.get("data.path")
        if one is not None and one.local and train is not None and one.format == b.get("data.format") \
                and one.columns == b.get("data.columns", {}):
            b.put("data.validation_path", one.path, "test_datasets")
            b.put("data.validation_split", 0.0, "test_datasets")
            b.put("eval.enabled", True, "test_datasets")
        else:
            b.drop("test_datasets", "tunesmith's validation file (data.validation_path) is one local file read like the "
                   "training data; set it by hand", tests)


_ENTRY_KEYS_DROPPED = {
    "name": "the data set's configuration name: tunesmith reads the files of a data set folder or a hub id as they are",
    "revision": "tunesmith reads the data set as it is on this machine or the hub",
    "trust_remote_code": "tunesmith runs no data set loading scripts",
    "shards": "tunesmith reads the whole data set (data.limit takes the first N rows)",
    "shards_idx": "tunesmith reads the whole data set",
    "preprocess_shards": "tunesmith tokenises the data itself",
    "chat_template_jinja": "tunesmith formats conversations with the model's own chat template",
    "drop_system_message": "tunesmith keeps a conversation's system message",
    "split_thinking": "tunesmith trains the assistant's reply as it is",
    "message_field_training": "tunesmith trains every assistant reply (data.train_on_prompt: every token)",
    "message_field_training_detail": "tunesmith trains every assistant reply (data.train_on_prompt: every token)",
    "train_on_eot": "tunesmith trains the end-of-turn token of each assistant reply",
    "train_on_split": "tunesmith reads one split per data set",
}
_PROMPT_FORMATS = ("chatml", "llama3", "zephyr", "chat_template", "user_defined")


def _dataset(b: Builder, key: str, entry: Any, objective: str) -> list[Source]:
    """One entry of datasets: as tunesmith sources (one per file of its data_files)."""
    if not isinstance(entry, dict):
        raise UserError(f"{b.where()}: {key} is {shown_value(key, entry)}; each data set is a mapping with path and "
                        "type, e.g. {path: data/train.jsonl, type: alpaca}.")
    seen = {"path", "type", "data_files", "ds_type", "split"}
    path = entry.get("path")
    if not isinstance(path, str) or not path.strip():
        raise UserError(f"{b.where()}: {key}.path is {shown_value('path', path)}; give the data file, folder or hub id.")
    files = entry.get("data_files")
    if files is not None:
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or not all(isinstance(f, str) and f.strip() for f in files):
            raise UserError(f"{b.where()}: {key}.data_files is {shown_value('data_files', files)}; give a file or a "
                            "list of files.")
        paths = [(str(b.local_path(f)), True) for f in files]
        if path not in _BUILDERS:
            b.note(f"{key}.path", f"{shown_value('path', path)} with data_files: tunesmith reads the data_files "
                   "(relative to the source config's folder)")
    elif path in _BUILDERS:
        raise UserError(f"{b.where()}: {key}.path is '{path}', which names a file type, and data_files is missing; give "
                        "the data file in data_files (or as path).")
    else:
        paths = [b.data_path(path.strip())]
    if entry.get("ds_type") is not None:
        b.note(f"{key}.ds_type", "tunesmith tells a file's type from its name (.jsonl, .json, .csv, .parquet, .arrow)")
    split = entry.get("split")
    fmt, columns, system, used = (_sft_type(b, key, entry) if objective == "sft"
                                  else _preference_type(b, key, entry, objective))
    seen |= used
    for name, reason in _ENTRY_KEYS_DROPPED.items():
        seen.add(name)
        if not (entry.get(name) is None or entry.get(name) is False):
            b.drop(f"{key}.{name}", reason, entry[name])
    for name, value in entry.items():
        if name not in seen and value is not None:
            b.drop(f"{key}.{name}", "not a key of an axolotl data set that tunesmith's converter knows", value)
    return [Source(path=p, key=key, format=fmt, columns=columns, system_prompt=system,
                   split=str(split) if split is not None else None, local=local) for p, local in paths]


def _sft_type(b: Builder, key: str, entry: dict) -> tuple[str, dict, str | None, set]:
    """(format, columns, system prompt, the entry's keys read) of a supervised data set's `type`."""
    kind = entry.get("type")
    tkey = f"{key}.type"
    if isinstance(kind, dict):  # a custom instruction format: its field_* name the columns (docs/config.qmd)
        columns = without_same({"instruction": kind.get("field_instruction", "instruction"),
                                "input": kind.get("field_input", "input"), "output": kind.get("field_output", "output"),
                                "system": kind.get("field_system", "system")})
        if kind.get("field") is not None:  # the completion form of a custom type
            return "text", without_same({"text": kind["field"]}), None, {"type"}
        for name in ("format", "no_input_format", "system_format"):
            if kind.get(name) is not None:
                b.note(f"{tkey}.{name}", "not applied: tunesmith puts the instruction and input into a user message of "
                       "the model's own chat template")
        for name, value in kind.items():
            if name not in ("field_instruction", "field_input", "field_output", "field_system", "format",
                            "no_input_format", "system_format", "system_prompt", "field") and value is not None:
                b.drop(f"{tkey}.{name}", "not a key of a custom axolotl data set type that tunesmith's converter knows",
                       value)
        system = kind.get("system_prompt") or None
        return "alpaca", columns, system, {"type"}
    if not isinstance(kind, str) or not kind.strip():
        raise UserError(f"{b.where()}: {tkey} is {shown_value('type', kind)}; give the data set's type, e.g. alpaca or "
                        "chat_template.")
    name = kind.strip()
    base, _, style = name.partition(":")
    if style:
        b.note(tkey, f"the prompt style ':{visible(style, 30)}' is not applied: tunesmith formats rows with the "
               "model's own chat template")
    if base in ("alpaca", "alpaca_chat", "alpaca_instruct", "alpaca_w_system"):
        return "alpaca", {}, None, {"type"}
    if base == "alpaca_chat.load_qa":
        return "prompt_completion", {}, None, {"type"}
    if base == "completion":
        field = entry.get("field")
        return "text", without_same({"text": field}) if field else {}, None, {"type", "field"}
    if base.startswith("sharegpt"):
        if base != "sharegpt":
            b.note(tkey, f"{visible(base, 40)} -> format: sharegpt (conversations of from/value turns)")
        for old in ("conversation", "field_human", "field_model"):
            if entry.get(old) is not None:
                b.drop(f"{key}.{old}", "tunesmith reads ShareGPT turns as human/gpt (or user/assistant) and formats "
                       "them with the model's own chat template", entry[old])
        return "sharegpt", {}, None, {"type", "conversation", "field_human", "field_model", "roles", "field_messages"}
    if base in ("chat_template", "chat_template.default"):
        return _chat_template(b, key, entry)
    if base == "input_output":
        raise UserError(f"{b.where()}: {tkey} is input_output (segments, each labelled to train or not), which "
                        "tunesmith cannot read: it trains the assistant's replies of a conversation, or every token "
                        "of plain text. Rewrite the rows as prompt/completion (or messages) and convert again with "
                        "type: chat_template.")
    raise UserError(f"{b.where()}: {tkey} is '{visible(name, 60)}', which tunesmith cannot map; it reads axolotl's "
                    "types alpaca, chat_template (messages with role/content or from/value), sharegpt and completion, "
                    "and a custom type with field_instruction/field_input/field_output. Convert the rows to one of "
                    "those and try again.")


def _chat_template(b: Builder, key: str, entry: dict) -> tuple[str, dict, str | None, set]:
    """type: chat_template: a list of messages per row, its keys named by message_property_mappings."""
    used = {"type", "field_messages", "message_property_mappings", "message_field_role", "message_field_content",
            "field_system", "roles", "roles_to_train", "train_on_eos", "chat_template"}
    field = entry.get("field_messages") or "messages"
    mapping = dict(entry.get("message_property_mappings") or {})
    if not isinstance(mapping, dict):
        raise UserError(f"{b.where()}: {key}.message_property_mappings is not a mapping; give e.g. "
                        "{role: from, content: value}.")
    role = mapping.pop("role", None) or entry.get("message_field_role") or "role"
    content = mapping.pop("content", None) or entry.get("message_field_content") or "content"
    for extra, value in mapping.items():
        b.drop(f"{key}.message_property_mappings.{extra}", "tunesmith's messages hold a role and a content only", value)
    if (role, content) == ("role", "content"):
        fmt, columns = "messages", without_same({"messages": field})
    elif (role, content) == ("from", "value"):
        fmt, columns = "sharegpt", without_same({"conversations": field})
    else:
        raise UserError(f"{b.where()}: {key}.message_property_mappings names the keys {visible(role, 40)}/"
                        f"{visible(content, 40)}, and tunesmith reads messages as role/content (messages) or "
                        "from/value (sharegpt); rename those keys in the data and convert again.")
    if entry.get("field_system") not in (None, "system"):
        columns["system"] = entry["field_system"]
    roles = entry.get("roles")
    if isinstance(roles, dict):
        names = [str(n) for target, sources in roles.items() if target != "tool"
                 for n in (sources if isinstance(sources, list) else [sources])]
        role_names(b, f"{key}.roles", fmt, names)
        if roles.get("tool"):
            b.drop(f"{key}.roles.tool", "tunesmith's conversations have no tool turns", roles["tool"])
    elif roles is not None:
        b.drop(f"{key}.roles", "a mapping of target roles to the data's roles was expected", roles)
    train = entry.get("roles_to_train")
    if train is not None and [str(r) for r in (train if isinstance(train, list) else [train])] != ["assistant"]:
        b.drop(f"{key}.roles_to_train", "tunesmith trains the assistant's replies (data.train_on_prompt: true trains "
               "every token)", train)
    if entry.get("train_on_eos") not in (None, "turn"):
        b.drop(f"{key}.train_on_eos", "tunesmith trains the end-of-turn token of each assistant reply (as 'turn')",
               entry["train_on_eos"])
    template = entry.get("chat_template")
    if template not in (None, "tokenizer_default"):
        b.note(f"{key}.chat_template", f"{shown_value('chat_template', template)} is not applied: tunesmith formats "
               "conversations with the model's own chat template")
    return fmt, columns, None, used


def _preference_type(b: Builder, key: str, entry: dict, objective: str) -> tuple[None, dict, str | None, set]:
    """(None: the columns tell the preference format, columns, system prompt, keys read) of an rl data set."""
    kind = entry.get("type")
    tkey = f"{key}.type"
    kto = objective == "kto"
    if isinstance(kind, dict):  # user_defined.default written out (docs/rlhf.qmd)
        fields = ({"prompt": "field_prompt", "completion": "field_completion", "label": "field_label",
                   "system": "field_system"} if kto else
                  {"prompt": "field_prompt", "chosen": "field_chosen", "rejected": "field_rejected",
                   "system": "field_system"})
        columns = without_same({ours: kind[theirs] for ours, theirs in fields.items() if kind.get(theirs)})
        for name, value in kind.items():
            if name.endswith("_format"):
                b.note(f"{tkey}.{name}", "not applied: tunesmith formats prompts and answers with the model's own chat "
                       "template")
            elif name not in fields.values() and value is not None:
                b.drop(f"{tkey}.{name}", "not a key of axolotl's user_defined preference type that tunesmith's "
                       "converter knows", value)
        return None, columns, None, {"type"}
    if not isinstance(kind, str) or not kind.strip():
        raise UserError(f"{b.where()}: {tkey} is {shown_value('type', kind)}; give the preference data set's type, "
                        "e.g. chatml.intel.")
    prefix, _, form = kind.strip().partition(".")
    if not form:
        prefix, form = "", prefix
    if prefix and prefix not in _PROMPT_FORMATS:
        raise UserError(f"{b.where()}: {tkey} is '{visible(kind, 60)}', a module tunesmith cannot map; it reads "
                        f"axolotl's preference types {', '.join(p + '.<type>' for p in _PROMPT_FORMATS[:3])} and "
                        "chat_template.default.")
    if prefix in ("chatml", "llama3", "zephyr"):
        b.note(tkey, f"the {prefix} prompt format is not applied: tunesmith formats prompts and answers with the model's "
               "own chat template")
    if prefix == "chat_template" and form == "default" and not kto:
        columns = without_same({"prompt": entry.get("field_messages") or "messages",
                                "chosen": entry.get("field_chosen") or "chosen",
                                "rejected": entry.get("field_rejected") or "rejected"})
        mapping = entry.get("message_property_mappings") or {}
        if isinstance(mapping, dict) and (mapping.get("role", "role"), mapping.get("content", "content")) \
                != ("role", "content"):
            raise UserError(f"{b.where()}: {key}.message_property_mappings renames role/content, and tunesmith's "
                            "preference prompts are role/content messages; rename the keys in the data.")
        b.note(tkey, "chosen and rejected must be text, or a list holding one {role: assistant, content: ...} message: "
               "tunesmith does not read a single message object there")
        return None, columns, None, {"type", "field_messages", "field_chosen", "field_rejected",
                                     "message_property_mappings", "roles"}
    table = _KTO_COLUMNS if kto else _PAIR_COLUMNS
    if form == "argilla" and prefix == "chat_template" and not kto:  # ORPO's: whole conversations as chosen/rejected
        b.note(tkey, "rows whose chosen and rejected are whole conversations train as tunesmith's "
               "preference_conversation only without a prompt column beside them")
        return None, {}, None, {"type"}
    if form not in table:
        raise UserError(f"{b.where()}: {tkey} is '{visible(kind, 60)}', which tunesmith cannot map for "
                        f"{'kto' if kto else 'paired preferences'}; it reads the forms "
                        f"{', '.join(table)} (after chatml. or llama3.), chat_template.default and a user_defined "
                        "type with field_* keys. Rewrite the rows as prompt/chosen/rejected (kto: prompt/completion/"
                        "label) and convert again.")
    return None, dict(table[form]), None, {"type"}


def _training(b: Builder) -> None:
    b.carry_number("micro_batch_size", "training.batch_size", whole=True, default=DEFAULTS["micro_batch_size"])
    if b.has("batch_size"):
        b.drop("batch_size", "the whole batch: tunesmith sets micro_batch_size (training.batch_size) and "
               "gradient_accumulation_steps (training.gradient_accumulation)", b.take("batch_size"))
    b.take("batch_size")
    b.carry_number("eval_batch_size", "training.eval_batch_size", whole=True)
    b.carry_number("num_epochs", "training.epochs", default=DEFAULTS["num_epochs"])
    b.take("num_epochs")
    if not b.has("learning_rate"):
        b.note("learning_rate", "not in the source -> tunesmith's default training.learning_rate: 1e-4")
    scheduler(b, "lr_scheduler")  # axolotl's default (left empty) is cosine, as tunesmith's
    optimizer(b, "optimizer")
    precision(b, "bf16", "fp16")
    for key, dtype in (("bfloat16", "bfloat16"), ("float16", "float16")):
        if b.has(key) and b.flag(key, b.take(key)):
            b.put("model.dtype", dtype, key)
        b.take(key)
    strategy = b.take("eval_strategy") or b.take("evaluation_strategy")
    b.take("evaluation_strategy")
    same_strategies(b, strategy)
    b.carry_number("eval_max_new_tokens", "eval.max_new_tokens", whole=True)


def _trackers(b: Builder) -> None:
    mode = b.take("wandb_mode")
    wandb = (b.flag("use_wandb", b.take("use_wandb")) if b.has("use_wandb") else False) or b.has("wandb_project")
    b.take("use_wandb")
    if wandb and mode != "disabled":
        add_tracker(b, "wandb", "wandb_project" if b.has("wandb_project") else "use_wandb")
        if mode == "online":
            b.note("wandb_mode", "online: tunesmith writes W&B runs offline unless the WANDB_MODE variable says online")
        elif mode is not None:
            b.agree("wandb_mode")
    elif mode == "disabled" and b.has("wandb_project"):
        b.note("wandb_mode", "disabled: no W&B reporting (logging.report_to leaves wandb out)")
    if wandb and b.has("wandb_project"):
        put_once(b, "logging.project", b.text("wandb_project", b.take("wandb_project")), "wandb_project")
    b.take("wandb_project")
    if b.has("wandb_name"):
        put_once(b, "logging.run_name", b.text("wandb_name", b.take("wandb_name")), "wandb_name")
    b.take("wandb_name")
    mlflow = (b.flag("use_mlflow", b.take("use_mlflow")) if b.has("use_mlflow") else False) \
        or b.has("mlflow_tracking_uri")
    b.take("use_mlflow")
    if mlflow:
        add_tracker(b, "mlflow", "mlflow_tracking_uri" if b.has("mlflow_tracking_uri") else "use_mlflow")
    if b.has("mlflow_tracking_uri"):
        b.put("logging.tracking_uri", b.text("mlflow_tracking_uri", b.take("mlflow_tracking_uri")),
              "mlflow_tracking_uri")
    b.take("mlflow_tracking_uri")
    for key, dotted in (("mlflow_experiment_name", "logging.project"), ("mlflow_run_name", "logging.run_name")):
        if b.has(key):
            put_once(b, dotted, b.text(key, b.take(key)), key)
        b.take(key)
    if b.has("use_tensorboard") and b.flag("use_tensorboard", b.take("use_tensorboard")):
        add_tracker(b, "tensorboard", "use_tensorboard")
    b.take("use_tensorboard")
