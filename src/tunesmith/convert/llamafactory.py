"""A LLaMA-Factory training YAML -> a tunesmith config.

The keys are those of LLaMA-Factory's examples (examples/train_lora, train_qlora, train_full) and its argument
classes (src/llamafactory/hparams/: model_args, data_args, finetuning_args, and Hugging Face's TrainingArguments).
`dataset: a,b` names entries of a dataset_info.json (data/README.md): its file_name, formatting (alpaca, sharegpt),
ranking, columns and tags become each source's path, format and column map.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import DEFAULT_BETA
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
    read_json_file,
    role_names,
    same_strategies,
    scheduler,
    shown_value,
    sources_to_data,
    trainer_keys,
    without_same,
)
from tunesmith.errors import UserError, visible

MARKERS = ("model_name_or_path", "stage", "finetuning_type", "dataset", "template", "cutoff_len", "lora_rank",
           "lora_target", "per_device_train_batch_size", "num_train_epochs", "val_size", "dataset_dir",
           "quantization_bit", "pref_beta", "do_train")

# LLaMA-Factory's defaults where they differ from tunesmith's (hparams/finetuning_args.py, data_args.py, and Hugging
# Face's TrainingArguments for the rest).
DEFAULTS = {"lora_rank": 8, "lora_dropout": 0.0, "cutoff_len": 2048, "learning_rate": 5e-5,
            "per_device_train_batch_size": 8, "lr_scheduler_type": "linear", "pref_beta": 0.1, "simpo_gamma": 0.5}

# pref_loss (stage: dpo) -> objective.type, and the losses that have no tunesmith twin (taken as dpo, with a note)
_PREF_LOSS = {"sigmoid": "dpo", "ipo": "ipo", "orpo": "orpo", "simpo": "simpo"}
_PREF_NEAR = {"hinge": "SLiC's hinge loss", "kto_pair": "the pairwise KTO loss"}

_ATTENTION = "tunesmith runs the model's own attention (PyTorch SDPA)"
_DROPPED = {
    "adapter_name_or_path": "tunesmith starts a new adapter; to go on from one, resume a tunesmith run (train --resume)",
    "adapter_folder": "tunesmith starts a new adapter",
    "cache_dir": "tunesmith uses the Hugging Face cache of the environment",
    "use_fast_tokenizer": "tunesmith loads the model's own (fast) tokenizer",
    "resize_vocab": "tunesmith keeps the model's vocabulary as it is",
    "split_special_tokens": "tunesmith reads special-token text in rows as it is, and leaves out rows that hold one",
    "add_tokens": "tunesmith adds no tokens to the vocabulary",
    "add_special_tokens": "tunesmith adds no tokens to the vocabulary",
    "new_special_tokens": "tunesmith adds no tokens to the vocabulary",
    "model_revision": "tunesmith loads the model as it is in the folder or the hub cache; download the revision",
    "low_cpu_mem_usage": "tunesmith loads the weights its own way",
    "rope_scaling": "tunesmith uses the model's config.json as it is (rope scaling included)",
    "shift_attn": _ATTENTION, "attn": _ATTENTION,
    "mixture_of_depths": "tunesmith trains the model's layers as they are",
    "use_unsloth": "tunesmith runs its own fused paths (training.fast_kernels), not Unsloth's",
    "use_unsloth_gc": "tunesmith runs its own fused paths (training.fast_kernels), not Unsloth's",
    "enable_liger_kernel": "tunesmith runs its own fused paths (training.fast_kernels), not Liger's kernels",
    "moe_aux_loss_coef": "tunesmith adds no router loss",
    "use_reentrant_gc": "tunesmith picks the checkpointing arguments itself",
    "upcast_layernorm": "tunesmith keeps the norms in the model's precision",
    "upcast_lmhead_output": "tunesmith's chunked loss computes the output in fp32 already",
    "train_from_scratch": "tunesmith fine-tunes pretrained weights",
    "offload_folder": "tunesmith does not offload weights to disk",
    "use_cache": "tunesmith sets the KV cache itself (off while training)",
    "infer_dtype": "a setting of LLaMA-Factory's inference", "infer_backend": "a setting of LLaMA-Factory's inference",
    "print_param_status": "tunesmith logs the trainable parameters itself",
    "device_map": "tunesmith places the model on this machine's device itself",
    "model_max_length": "tunesmith truncates rows to data.max_length (from cutoff_len)",
    "block_diag_attn": "tunesmith's packing always keeps each row attending to itself",
    "quantization_device_map": "tunesmith places the 4-bit model itself",
    "media_dir": "tunesmith trains text models",
    "mask_history": "tunesmith trains every assistant reply of a conversation",
    "streaming": "tunesmith reads the whole data set (data.limit takes the first N rows)",
    "buffer_size": "tunesmith reads the whole data set",
    "overwrite_cache": "tunesmith's cache is keyed by the rows and every setting that changes tokens",
    "preprocessing_batch_size": "tunesmith tokenises the data itself",
    "preprocessing_num_workers": "tunesmith picks the processes that tokenise",
    "eval_num_beams": "tunesmith's evaluation decodes greedily",
    "ignore_pad_token_for_loss": "tunesmith never trains on padding",
    "eval_on_each_dataset": "tunesmith validates on one set of rows",
    "tool_format": "tunesmith's conversations have no tool turns",
    "enable_thinking": "tunesmith trains the assistant's reply as the row holds it",
    "tokenized_path": "tunesmith caches tokenised data itself (under $TUNESMITH_HOME/tokenized)",
    "data_shared_file_system": "tunesmith's first process tokenises, the others read its cache",
    "use_llama_pro": "tunesmith adds no layers (LLaMA Pro)",
    "use_adam_mini": "tunesmith trains with AdamW (training.optimizer)",
    "use_muon": "tunesmith trains with AdamW (training.optimizer)",
    "use_galore": "tunesmith has no GaLore", "use_apollo": "tunesmith has no APOLLO", "use_badam": "tunesmith has no BAdam",
    "freeze_vision_tower": "tunesmith trains text models", "freeze_multi_modal_projector": "tunesmith trains text models",
    "freeze_language_model": "tunesmith trains text models",
    "compute_accuracy": "tunesmith's evaluation scores generated answers (eval.metrics)",
    "disable_shuffling": "tunesmith shuffles the rows every epoch with training.seed",
    "include_effective_tokens_per_second": "tunesmith logs tokens per second every step",
    "additional_target": "tunesmith's adapters hold only the LoRA matrices (method full trains every weight)",
    "loraplus_lr_ratio": "tunesmith trains both adapter matrices at one learning rate (no LoRA+)",
    "pissa_init": "tunesmith initialises adapters as PEFT does by default (A random, B zero)",
    "pissa_convert": "tunesmith initialises adapters as PEFT does by default",
    "create_new_adapter": "tunesmith starts a new adapter every run",
    "pref_ftx": "tunesmith's preference objectives add no supervised term (orpo has its own)",
    "pref_bco_weight": "tunesmith's preference objectives add no BCO term",
    "ref_model": "the reference is the base model (with the adapter switched off, or precomputed)",
    "ref_model_adapters": "the reference is the base model", "ref_model_quantization_bit": "the reference is the base model",
    "ld_alpha": "tunesmith's DPO weighs every answer token alike (no LD-DPO)",
    "reward_model": "tunesmith trains no PPO", "reward_model_type": "tunesmith trains no PPO",
    "overwrite_output_dir": "tunesmith never writes over a run folder: a new run gets a new folder",
    "do_eval": "tunesmith validates while training and compares base and tuned after it (eval:)",
    "do_predict": "tunesmith eval RUN writes predictions.jsonl after training",
    "plot_loss": "tunesmith always writes training.png",
    "ray_run_name": "tunesmith runs without Ray", "ray_storage_path": "tunesmith runs without Ray",
    "ray_num_workers": "tunesmith runs without Ray (tunesmith train --nproc)", "use_ray": "tunesmith runs without Ray",
    "predict_with_generate": "tunesmith eval generates after training",
    "max_new_tokens": "tunesmith's evaluation generates eval.max_new_tokens tokens",
    "do_sample": "tunesmith's evaluation decodes greedily", "temperature": "tunesmith's evaluation decodes greedily",
    "top_p": "tunesmith's evaluation decodes greedily", "top_k": "tunesmith's evaluation decodes greedily",
    "num_beams": "tunesmith's evaluation decodes greedily",
    "repetition_penalty": "tunesmith's evaluation decodes greedily",
    "length_penalty": "tunesmith's evaluation decodes greedily",
    "default_system_message": "not a LLaMA-Factory key (default_system is)",
    "swanlab_api_key": "tunesmith reports to tensorboard, mlflow and wandb",
}
_PATTERNS = [
    (r"^swanlab_|^use_swanlab$", "tunesmith reports to tensorboard, mlflow and wandb (logging.report_to)"),
    (r"^(galore|apollo|badam)_", "tunesmith trains with AdamW (training.optimizer)"),
    (r"^ppo_", "tunesmith trains no PPO (stage: dpo or kto convert)"),
    (r"^export_", "a setting of llamafactory-cli export (tunesmith merge / tunesmith export)"),
    (r"^(vllm|sglang|kt)_", "a setting of LLaMA-Factory's inference backends"),
    (r"^(image|video|audio)_", "tunesmith trains text models"),
    (r"^oft_|^module_dropout$", "tunesmith has no OFT"),
    (r"^loraplus_", "tunesmith trains both adapter matrices at one learning rate (no LoRA+)"),
    (r"^pissa_", "tunesmith initialises adapters as PEFT does by default"),
    (r"_hub_token$|^hf_hub_token$", "tunesmith uses the hub login of the environment"),
    (r"^ray_", "tunesmith runs without Ray"),
    (r"^freeze_extra_modules$", "tunesmith's method full trains every weight"),
]


def convert(b: Builder, model: str | None, data: list[str]) -> None:
    _model(b, model)
    stage, objective = _stage(b)
    _method(b)
    _data(b, stage, objective, data)
    _training(b)
    _trackers(b)
    trainer_keys(b)
    drop_known(b, _DROPPED)
    drop_matching(b, _PATTERNS)


def _model(b: Builder, model: str | None) -> None:
    model_and_code(b, "model_name_or_path", model)
    template = b.take("template")
    if template is not None:
        b.note("template", f"{shown_value('template', template)} -> the model's own chat template (from its "
               "tokenizer), which tunesmith formats every conversation with")
    attention = b.take("flash_attn")
    if attention not in (None, "auto", "sdpa"):
        b.drop("flash_attn", _ATTENTION, attention)
    elif attention is not None:
        b.agree("flash_attn")
    if b.has("disable_gradient_checkpointing") and b.flag("disable_gradient_checkpointing",
                                                          b.take("disable_gradient_checkpointing")):
        b.put("training.gradient_checkpointing", False, "disable_gradient_checkpointing")
    b.take("disable_gradient_checkpointing")


def _stage(b: Builder) -> tuple[str, str]:
    """(stage, objective.type)."""
    stage = str(b.take("stage", "sft")).strip().lower()
    if stage in ("sft", "pt"):
        objective = "sft"
        if stage == "sft" and b.has("stage"):
            b.agree("stage")
        if stage == "pt":
            b.note("stage", "pt (pre-training) -> objective sft on plain text rows (format: text): every token trains")
    elif stage == "dpo":
        loss = str(b.take("pref_loss", "sigmoid")).strip().lower()
        if loss in _PREF_LOSS:
            objective = _PREF_LOSS[loss]
        elif loss in _PREF_NEAR:
            objective = "dpo"
            b.note("pref_loss", f"{loss} ({_PREF_NEAR[loss]}) -> objective.type: dpo (DPO's sigmoid loss; tunesmith has "
                   "no twin of this one)")
        else:
            raise UserError(f"{b.where()}: pref_loss: {shown_value('pref_loss', loss)} is not a loss of LLaMA-Factory's "
                            f"dpo stage that tunesmith knows ({', '.join([*_PREF_LOSS, *_PREF_NEAR])}).")
    elif stage == "kto":
        objective = "kto"
    elif stage in ("rm", "ppo"):
        raise UserError(f"{b.where()}: stage: {stage} has no tunesmith equivalent: tunesmith trains no reward models "
                        "and no PPO; its preference objectives are dpo, ipo, orpo, simpo and kto (stage: dpo or kto), "
                        "and grpo.")
    else:
        raise UserError(f"{b.where()}: stage: {shown_value('stage', stage)} is not a LLaMA-Factory stage tunesmith knows "
                        "(pt, sft, dpo, kto).")
    b.take("pref_loss")
    if b.has("do_train") and not b.flag("do_train", b.take("do_train")):
        raise UserError(f"{b.where()}: do_train is false, so this config does not train; tunesmith convert converts "
                        "training configs (tunesmith eval RUN evaluates a run).")
    if b.has("do_train"):
        b.agree("do_train")
    b.take("do_train")
    if objective != "sft":
        b.put("objective.type", objective, "stage")
    beta = b.take("pref_beta")
    if objective == "sft":
        for key in ("pref_beta", "simpo_gamma", "dpo_label_smoothing", "kto_chosen_weight", "kto_rejected_weight"):
            if b.has(key):
                b.drop(key, f"it applies to stage dpo or kto, and this config is stage {stage}", b.take(key))
            b.take(key)
        return stage, objective
    if beta is not None:
        b.put("objective.beta", b.number("pref_beta", beta), "pref_beta")
    elif DEFAULT_BETA.get(objective) != DEFAULTS["pref_beta"]:
        b.put("objective.beta", DEFAULTS["pref_beta"], "pref_beta")
        b.note("pref_beta", f"not in the source; LLaMA-Factory's default {DEFAULTS['pref_beta']} -> objective.beta "
               f"(tunesmith's default for {objective} is {DEFAULT_BETA.get(objective)})")
    only = {"simpo_gamma": ("simpo", "objective.simpo_gamma"), "dpo_label_smoothing": ("dpo", "objective.label_smoothing"),
            "kto_chosen_weight": ("kto", "objective.kto_desirable_weight"),
            "kto_rejected_weight": ("kto", "objective.kto_undesirable_weight")}
    for key, (wants, dotted) in only.items():
        value = b.take(key)
        if value is None:
            if key == "simpo_gamma" and objective == "simpo":
                b.put(dotted, DEFAULTS["simpo_gamma"], key)
                b.note(key, f"not in the source; LLaMA-Factory's default {DEFAULTS['simpo_gamma']} -> {dotted}")
        elif objective == wants:
            b.put(dotted, b.number(key, value), key)
        else:
            b.drop(key, f"it applies to {wants}, and this config trains {objective}", value)
    return stage, objective


def _method(b: Builder) -> None:
    kind = str(b.take("finetuning_type", "lora")).strip().lower()
    bits = b.take("quantization_bit")
    if kind == "lora":
        method = "qlora" if bits is not None and b.number("quantization_bit", bits, whole=True) == 4 else "lora"
    elif kind == "full":
        method = "full"
    elif kind == "freeze":
        method = "full"
        b.note("finetuning_type", "freeze (only the last freeze_trainable_layers layers train) -> method: full: tunesmith "
               "has no partial freezing, so every weight trains (more memory; --set method=lora for an adapter)")
        for key in ("freeze_trainable_layers", "freeze_trainable_modules"):
            if b.has(key):
                b.drop(key, "tunesmith's method full trains every weight", b.take(key))
            b.take(key)
    else:
        raise UserError(f"{b.where()}: finetuning_type: {shown_value('finetuning_type', kind)} has no tunesmith "
                        "equivalent; tunesmith trains lora (quantization_bit: 4 for qlora) and full.")
    b.put("method", method, "finetuning_type")
    if bits is not None and method != "qlora":
        b.drop("quantization_bit", "tunesmith quantises only LoRA's base, and only to 4 bits (method qlora)", bits)
    quant = b.take("quantization_method")
    if quant not in (None, "bnb", "bitsandbytes"):
        b.drop("quantization_method", "tunesmith's 4-bit weights come from bitsandbytes", quant)
    elif quant is not None:
        b.agree("quantization_method")
    qtype = b.take("quantization_type")
    if qtype not in (None, "nf4"):
        b.drop("quantization_type", "tunesmith's 4-bit weights are NF4", qtype)
    elif qtype is not None:
        b.agree("quantization_type")
    double = b.take("double_quantization")
    if double is False:
        b.drop("double_quantization", "tunesmith's 4-bit weights are double-quantised (QLoRA's recipe)", False)
    elif double is not None:
        b.agree("double_quantization")
    lora_keys = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_dora", "use_rslora")
    if method == "full":
        for key in lora_keys:
            value = b.take(key)
            if value is not None and value is not False:
                b.drop(key, "method full trains every weight and has no adapter", value)
        return
    rank = b.carry_number("lora_rank", "lora.r", whole=True, default=DEFAULTS["lora_rank"])
    # LLaMA-Factory's default alpha is twice the rank (finetuning_args.py)
    b.carry_number("lora_alpha", "lora.alpha", default=rank * 2, default_from="LLaMA-Factory's default (2 x lora_rank)")
    b.carry_number("lora_dropout", "lora.dropout", default=DEFAULTS["lora_dropout"])
    target = b.take("lora_target", "all")
    names = [t.strip() for t in target.split(",") if t.strip()] if isinstance(target, str) else target
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{b.where()}: lora_target is {shown_value('lora_target', target)}; give all or module names "
                        "separated by commas, e.g. q_proj,v_proj.")
    b.put("lora.target_modules", "all-linear" if names == ["all"] else names, "lora_target")
    if not b.has("lora_target"):
        b.note("lora_target", "not in the source; LLaMA-Factory's default all -> lora.target_modules: all-linear")
    for key, dotted in (("use_dora", "lora.use_dora"), ("use_rslora", "lora.use_rslora")):
        if b.has(key):
            b.put(dotted, b.flag(key, b.take(key)), key)
        b.take(key)


def _data(b: Builder, stage: str, objective: str, replacements: list[str]) -> None:
    b.carry_number("cutoff_len", "data.max_length", whole=True, default=DEFAULTS["cutoff_len"])
    if b.has("train_on_prompt"):
        b.put("data.train_on_prompt", b.flag("train_on_prompt", b.take("train_on_prompt")), "train_on_prompt")
    b.take("train_on_prompt")
    if b.has("default_system"):
        b.put("data.system_prompt", b.text("default_system", b.take("default_system")), "default_system")
    b.take("default_system")
    packing = b.take("packing")
    neat = b.take("neat_packing")
    if neat is not None and b.flag("neat_packing", neat):
        b.put("training.packing", True, "neat_packing")
    elif packing is not None:
        on = b.flag("packing", packing)
        b.put("training.packing", on, "packing")
        if on:
            b.note("packing", "true -> training.packing: true, where each packed row attends only to itself (as "
                   "LLaMA-Factory's neat_packing; its plain packing lets rows see each other)")
    b.carry_number("max_samples", "data.limit", whole=True)
    held_out(b, "val_size")

    names = b.take("dataset")
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if names is None or names == []:
        if not replacements:
            raise UserError(f"{b.where()}: dataset is missing, so there is nothing to train on; add it, or give "
                            "--data PATH.")
        names = [f"--data {i + 1}" for i in range(len(replacements))]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{b.where()}: dataset is {shown_value('dataset', names)}; give data set names separated by "
                        "commas, e.g. alpaca_en_demo,identity.")
    info, info_path = _dataset_info(b, need=not replacements and not all(_is_file(b, n) for n in names))
    sources = [_source(b, name, info, info_path, stage, objective, given=bool(replacements)) for name in names]
    weights = b.take("interleave_probs")
    strategy = str(b.take("mix_strategy", "concat"))
    if weights is not None and strategy.startswith("interleave"):
        probs = [p.strip() for p in weights.split(",")] if isinstance(weights, str) else weights
        if not isinstance(probs, list) or len(probs) != len(sources):
            raise UserError(f"{b.where()}: interleave_probs gives {shown_value('interleave_probs', weights)} for "
                            f"{len(sources)} data sets; give one probability for each.")
        for source, p in zip(sources, probs):
            source.weight = b.number("interleave_probs", p)
    elif strategy.startswith("interleave"):
        for source in sources:  # tunesmith joins sources without weights; equal weights interleave them
            source.weight = 1.0
        b.note("mix_strategy", f"{visible(strategy, 40)} without interleave_probs -> equal weights")
    elif b.has("mix_strategy"):
        b.agree("mix_strategy")
    sources_to_data(b, sources, replacements, "dataset")

    evaluation = b.take("eval_dataset")
    if evaluation is not None:
        evals = [n.strip() for n in evaluation.split(",") if n.strip()] if isinstance(evaluation, str) else evaluation
        one = _source(b, evals[0], info, info_path, stage, objective, given=False) if len(evals) == 1 else None
        if one is not None and one.local and one.format == b.get("data.format") \
                and one.columns == b.get("data.columns", {}):
            b.put("data.validation_path", one.path, "eval_dataset")
            b.put("data.validation_split", 0.0, "eval_dataset")
            b.put("eval.enabled", True, "eval_dataset")
        else:
            b.drop("eval_dataset", "tunesmith's validation file (data.validation_path) is one local file read like the "
                   "training data; set it by hand", evaluation)


def _is_file(b: Builder, name: str) -> bool:
    return b.local_path(name).is_file()


def _dataset_info(b: Builder, need: bool) -> tuple[dict, Path | None]:
    """LLaMA-Factory's dataset_info.json: in dataset_dir (relative to the source config's folder, else to the current
    folder, as LLaMA-Factory reads it) or beside the config."""
    folder = str(b.take("dataset_dir", "data"))
    candidates = [b.local_path(folder) / "dataset_info.json", Path(folder).expanduser().absolute() / "dataset_info.json",
                  b.config_dir / "dataset_info.json"]
    for number, path in enumerate(candidates):
        if path.is_file():
            if b.has("dataset_dir") and number < 2:
                b.agree("dataset_dir")
            elif b.has("dataset_dir"):
                b.note("dataset_dir", f"'{visible(folder, 100)}' holds no dataset_info.json; the one beside the config "
                       "was read")
            info = read_json_file(path, "dataset_dir")
            if not isinstance(info, dict):
                raise UserError(f"dataset_dir: {visible(str(path), 300)} holds {type(info).__name__}, not a mapping of "
                                "data set names to descriptions.")
            return info, path
    if b.has("dataset_dir"):
        b.drop("dataset_dir", "it holds no dataset_info.json, so the data sets are the files named (or given with --data)",
               folder)
    if need:
        raise UserError(f"{b.where()}: dataset names data sets of a dataset_info.json, and there is none in "
                        f"{visible(str(candidates[0].parent), 300)} (dataset_dir) or beside the config; put "
                        "LLaMA-Factory's dataset_info.json there, or give the data files with --data PATH.")
    return {}, None


def _source(b: Builder, name: str, info: dict, info_path: Path | None, stage: str, objective: str,
            given: bool) -> Source:
    """One data set named in `dataset` as a tunesmith source (its path replaced later when --data is `given`)."""
    key = f"dataset: {name}"
    entry = info.get(name)
    if entry is None:
        if given or _is_file(b, name):
            path = "" if given else str(b.local_path(name))
            return Source(path=path, key=key, format="text" if stage == "pt" else None)
        where = f"in {visible(str(info_path), 300)}" if info_path else "(no dataset_info.json found)"
        raise UserError(f"{b.where()}: dataset names '{visible(name, 80)}', which is not {where}; add its description "
                        "to dataset_info.json, or give the data file with --data PATH.")
    ekey = f"dataset_info.json: {name}"
    if not isinstance(entry, dict):
        raise UserError(f"{ekey} is {shown_value(name, entry)}, not a description with file_name, formatting, columns.")
    base = info_path.parent if info_path else b.config_dir
    if entry.get("file_name"):
        path, local = str(Path((base / entry["file_name"]).as_posix()).resolve()), True
    elif entry.get("hf_hub_url"):
        path, local = str(entry["hf_hub_url"]), False
    elif given:
        path, local = "", True
    else:
        hub = next((k for k in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if entry.get(k)), "none")
        raise UserError(f"{ekey}: the data comes from {hub}, which tunesmith cannot read; give a file_name or an "
                        "hf_hub_url, or the data file with --data PATH.")
    for field in ("subset", "folder"):
        if entry.get(field):
            b.drop(f"{ekey}.{field}", "tunesmith reads the files of a data set folder or hub id as they are",
                   entry[field])
    known = {"file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "subset", "folder",
             "formatting", "ranking", "columns", "tags", "split", "num_samples"}
    for field, value in entry.items():
        if field not in known and value is not None:
            b.drop(f"{ekey}.{field}", "not a key of a dataset_info.json description that tunesmith's converter knows",
                   value)
    fmt, columns = _format(b, ekey, entry, stage, objective)
    rows = entry.get("num_samples")
    return Source(path=path, key=key, format=fmt, columns=columns, split=entry.get("split"), local=local,
                  rows=int(b.number(f"{ekey}.num_samples", rows, whole=True)) if rows is not None else None)


def _format(b: Builder, key: str, entry: dict, stage: str, objective: str) -> tuple[str | None, dict]:
    """(format, columns) of a dataset_info.json description (data/README.md's alpaca and sharegpt formats)."""
    formatting = str(entry.get("formatting", "alpaca")).lower()
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    ranking = bool(entry.get("ranking"))
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise UserError(f"{key}: columns and tags must each be a mapping of names.")
    for extra in ("tools", "images", "videos", "audios"):
        if columns.get(extra):
            b.drop(f"{key}.columns.{extra}", "tunesmith trains text conversations without tools or media", columns[extra])
    if stage == "pt":
        return "text", without_same({"text": columns.get("prompt", "text")})
    if formatting == "alpaca":
        if columns.get("history"):
            b.drop(f"{key}.columns.history", "tunesmith's alpaca rows are one instruction and one answer; the earlier "
                   "turns in history are not read (convert such rows to messages)", columns["history"])
        if objective == "kto":
            if ranking:
                raise UserError(f"{key}: ranking is true (preference pairs), and stage kto reads labelled answers "
                                "(prompt, response and kto_tag columns); convert a config with stage: dpo.")
            return None, without_same({"prompt": columns.get("prompt", "instruction"),
                                       "completion": columns.get("response", "output"),
                                       "label": columns.get("kto_tag", "label"), "system": columns.get("system")})
        if objective != "sft" or ranking:
            if objective == "sft":
                raise UserError(f"{key}: ranking is true (preference pairs), and the config's stage trains sft; "
                                "convert a config with stage: dpo.")
            b.note(f"{key}.columns.query", "tunesmith's preference rows have one prompt field: the query (input) column "
                   "is not appended to the instruction")
            return None, without_same({"prompt": columns.get("prompt", "instruction"),
                                       "chosen": columns.get("chosen", "chosen"),
                                       "rejected": columns.get("rejected", "rejected"), "system": columns.get("system")})
        return "alpaca", without_same({"instruction": columns.get("prompt", "instruction"),
                                       "input": columns.get("query", "input"), "output": columns.get("response", "output"),
                                       "system": columns.get("system")})
    if formatting not in ("sharegpt", "openai"):
        raise UserError(f"{key}: formatting '{visible(formatting, 40)}' is not one tunesmith can map (alpaca, sharegpt).")
    role, content = tags.get("role_tag", "from"), tags.get("content_tag", "value")
    if (role, content) == ("from", "value"):
        fmt = "sharegpt"
    elif (role, content) == ("role", "content"):
        fmt = "messages"
    else:
        raise UserError(f"{key}: tags name the message keys {visible(role, 40)}/{visible(content, 40)}, and tunesmith "
                        "reads messages as from/value (sharegpt) or role/content (messages); rename them in the data.")
    default_tags = {"user_tag": "human", "assistant_tag": "gpt", "system_tag": "system"} if fmt == "sharegpt" else \
        {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}
    role_names(b, f"{key}.tags", fmt, [str(tags.get(t, d)) for t, d in default_tags.items()])
    for tag in ("observation_tag", "function_tag"):
        if tags.get(tag):
            b.drop(f"{key}.tags.{tag}", "tunesmith's conversations have no tool turns", tags[tag])
    messages = columns.get("messages", "conversations")
    if objective == "kto":
        raise UserError(f"{key}: KTO rows in the sharegpt format (a conversation and a kto_tag) cannot be mapped; "
                        "tunesmith's KTO rows are prompt, completion and label (the alpaca form).")
    if objective != "sft" or ranking:
        if objective == "sft":
            raise UserError(f"{key}: ranking is true (preference pairs), and the config's stage trains sft; convert a "
                            "config with stage: dpo.")
        if fmt == "sharegpt":
            raise UserError(f"{key}: preference pairs in the sharegpt format (from/value turns, chosen and rejected as "
                            "one turn each) cannot be mapped: tunesmith's preference prompts are role/content messages; "
                            "write the rows as prompt/chosen/rejected text (the alpaca form).")
        b.note(key, "chosen and rejected must be text, or a list holding one {role: assistant, content: ...} message: "
               "tunesmith does not read a single message object there")
        return None, without_same({"prompt": messages, "chosen": columns.get("chosen", "chosen"),
                                   "rejected": columns.get("rejected", "rejected"), "system": columns.get("system")})
    ours = "conversations" if fmt == "sharegpt" else "messages"
    return fmt, without_same({ours: messages, "system": columns.get("system")})


def _training(b: Builder) -> None:
    b.carry_number("per_device_train_batch_size", "training.batch_size", whole=True,
                   default=DEFAULTS["per_device_train_batch_size"], default_from="the Trainer's default")
    if b.has("per_device_eval_batch_size"):
        b.put("training.eval_batch_size", b.number("per_device_eval_batch_size", b.take("per_device_eval_batch_size"),
                                                   whole=True), "per_device_eval_batch_size")
    b.take("per_device_eval_batch_size")
    b.carry_number("num_train_epochs", "training.epochs")
    if not b.has("learning_rate"):
        b.put("training.learning_rate", DEFAULTS["learning_rate"], "learning_rate")
        b.note("learning_rate", f"not in the source; the Trainer's default {DEFAULTS['learning_rate']} -> "
               "training.learning_rate")
    scheduler(b, "lr_scheduler_type", default=DEFAULTS["lr_scheduler_type"])
    optimizer(b, "optim")
    precision(b, "bf16", "fp16")
    if b.has("pure_bf16") and b.flag("pure_bf16", b.take("pure_bf16")):
        b.put("model.dtype", "bfloat16", "pure_bf16")
    b.take("pure_bf16")
    strategy = b.take("eval_strategy") or b.take("evaluation_strategy")
    b.take("evaluation_strategy")
    same_strategies(b, strategy)


def _trackers(b: Builder) -> None:
    value = b.take("report_to")
    if value is not None:
        names = [n.strip().lower() for n in value.split(",")] if isinstance(value, str) else \
            [str(n).strip().lower() for n in value] if isinstance(value, list) else None
        if names is None:
            raise UserError(f"{b.where()}: report_to is {shown_value('report_to', value)}; give tracker names such as "
                            "tensorboard or wandb, or none.")
        for name in names:
            if name in ("tensorboard", "mlflow", "wandb"):
                add_tracker(b, name, "report_to")
            elif name == "all":
                b.drop("report_to", "all means every tracker installed; tunesmith reports only to the ones named in "
                       "logging.report_to (tensorboard, mlflow, wandb)", "all")
            elif name not in ("none", ""):
                b.drop("report_to", f"tunesmith reports to tensorboard, mlflow and wandb, not {visible(name, 40)}", name)
            else:
                b.agree("report_to")
    if b.has("run_name"):
        b.put("logging.run_name", b.text("run_name", b.take("run_name")), "run_name")
    b.take("run_name")

