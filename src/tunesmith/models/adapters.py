"""What trains: the whole model, or PEFT adapters beside frozen weights.

Methods (`method:`), and what each costs or buys:
- `full`: every weight trains; AdamW then keeps two more copies of every weight.
- `lora`: a rank-r update B @ A beside each targeted weight, scaled by alpha / r; the base is frozen.
- `qlora`: LoRA on a base whose linear layers were loaded as 4-bit NF4 (see `models/loader.py`).
- `dora`: LoRA plus a learned magnitude per output row (the weight's norm is split from its
  direction); a little slower, often closer to full fine-tuning at low rank.
- `rslora`: LoRA scaled by alpha / sqrt(r), so higher ranks keep learning instead of being
  damped by 1 / r.
- `adalora`: the update is an SVD-shaped P diag(E) Q per layer; ranks start at `adalora.init_r`
  and shrink to an average of `lora.r` along a schedule, kept where the importance scores are
  highest.  It needs three things from the loop: `after_optimizer_step` (importance scores and
  rank masks, after every optimiser step while the gradients are still there), `extra_loss`
  (the penalty keeping P and Q orthogonal, which PEFT would otherwise add only inside its own
  forward, a path our loss does not take) and, for an exact resume, `method_state` /
  `load_method_state` in checkpoints (the scores and chosen ranks are not weights).
`lora.use_dora` and `lora.use_rslora` switch the same options on for `lora` and `qlora`.
"""

from __future__ import annotations

import math

import torch

from tunesmith.config import Config
from tunesmith.errors import UserError
from tunesmith.models.families import family_target_modules
from tunesmith.models.quantized import without_bitsandbytes
from tunesmith.models.tasks import detect_task, peft_task_type


def _linear_classes() -> tuple[type, ...]:
    """Layer types adapters attach to: torch's Linear (bitsandbytes' 4-bit layers subclass it) and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Dotted name -> module for every linear (and Conv1D) layer, the output layer excluded."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    classes = _linear_classes()
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, classes) and module is not output
    }


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct short names of the model's linear and Conv1D layers (q_proj, c_attn, ...), output layer excluded."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_modules(model)})


def _matches(full_name: str, target: str) -> bool:
    """PEFT's rule for a name in target_modules: the whole dotted path, or its end after a dot."""
    return full_name == target or full_name.endswith("." + target)


def resolve_target_modules(model: torch.nn.Module, setting: str | list[str]) -> str | list[str]:
    """`lora.target_modules` made concrete for this model: the family's names for `auto` (only those it has),
    `all-linear` for unknown families, or the given names after checking that each matches a layer."""
    modules = linear_modules(model)
    if setting == "all-linear":
        return "all-linear"
    if setting == "auto":
        family = family_target_modules(getattr(getattr(model, "config", None), "model_type", None))
        if family is None:
            return "all-linear"
        present = [name for name in family if any(_matches(full, name) for full in modules)]
        return present or "all-linear"
    unknown = [name for name in setting if not any(_matches(full, name) for full in modules)]
    if unknown:
        model_type = getattr(getattr(model, "config", None), "model_type", "this")
        raise UserError(
            f"lora.target_modules: {', '.join(unknown)} match{'es' if len(unknown) == 1 else ''} no linear layer "
            f"of this {model_type} model; its linear (and Conv1D) layers are: {', '.join(linear_module_names(model))} "
            "(or use auto or all-linear)."
        )
    return list(setting)


def targeted_layers(model: torch.nn.Module, setting: str | list[str]) -> list[str]:
    """Dotted names of the linear layers an adapter with `lora.target_modules: setting` attaches to."""
    targets = resolve_target_modules(model, setting)
    names = list(linear_modules(model))
    if targets == "all-linear":
        return names
    return [name for name in names if any(_matches(name, target) for target in targets)]


def _targets_only_conv1d(model: torch.nn.Module, targets: str | list[str]) -> bool:
    """True where every targeted layer is a Conv1D (GPT-2): PEFT must then read their weights transposed."""
    from transformers.pytorch_utils import Conv1D

    modules = linear_modules(model)
    chosen = [m for full, m in modules.items() if targets == "all-linear" or any(_matches(full, t) for t in targets)]
    return bool(chosen) and all(isinstance(m, Conv1D) for m in chosen)


def is_quantized_4bit(model: torch.nn.Module) -> bool:
    """Whether the model's linear layers were loaded as bitsandbytes 4-bit (method: qlora where it runs)."""
    return bool(getattr(model, "is_loaded_in_4bit", False))


def _check_options(cfg: Config) -> None:
    """Combinations of method and lora options that cannot mean what they say."""
    lora = cfg.lora
    if cfg.method == "full" and (lora.use_dora or lora.use_rslora):
        option = "lora.use_dora" if lora.use_dora else "lora.use_rslora"
        raise UserError(f"{option} is an adapter option, and method: full trains no adapters; turn it off or pick an adapter method.")
    if cfg.method == "adalora" and (lora.use_dora or lora.use_rslora):
        option = "lora.use_dora" if lora.use_dora else "lora.use_rslora"
        raise UserError(
            f"{option} does not combine with method: adalora (PEFT's AdaLoRA has its own rank scaling and no DoRA); "
            "turn it off, or use method: lora with it."
        )


def prepare_trainable(model: torch.nn.Module, cfg: Config, total_steps: int | None = None) -> torch.nn.Module:
    """Mark what trains and return the model to train: the model itself (full) or a PEFT model.

    `total_steps` is the run's planned optimiser steps; AdaLoRA's rank schedule needs it (else
    `adalora.total_step`, else `training.max_steps`).
    """
    _check_options(cfg)
    if cfg.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    with without_bitsandbytes():  # a model without 4/8-bit layers does not need it imported
        from peft import get_peft_model

        targets = resolve_target_modules(model, cfg.lora.target_modules)
        if cfg.method == "qlora" and is_quantized_4bit(model):
            from peft import prepare_model_for_kbit_training

            # Freezes the base and upcasts its unquantised fp16/bf16 tensors (norms, embeddings, output layer)
            # to fp32 for stable updates; on a CPU run they are fp32 already, so it costs nothing there.
            # Gradient checkpointing is not this function's business: it stays as the model has it.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        transposed = _targets_only_conv1d(model, targets)
        if cfg.method == "adalora":
            peft_config = _adalora_config(cfg, model, targets, transposed, total_steps)
        else:
            peft_config = _lora_config(cfg, model, targets, transposed)
        return get_peft_model(model, peft_config)


def _peft_task_type(model) -> str | None:
    """PEFT's task type for this model (CAUSAL_LM, SEQ_2_SEQ_LM, or None for masked LM)."""

    return peft_task_type(detect_task(getattr(model, "config", None)))


def _lora_config(cfg: Config, model, targets: str | list[str], transposed: bool):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,  # PEFT's "all-linear" is every linear layer except the output layer
        fan_in_fan_out=transposed,
        use_dora=cfg.lora.use_dora or cfg.method == "dora",
        use_rslora=cfg.lora.use_rslora or cfg.method == "rslora",
        task_type=_peft_task_type(model),
    )


def _adalora_config(cfg: Config, model, targets: str | list[str], transposed: bool, total_steps: int | None):
    from peft import AdaLoraConfig as PeftAdaLoraConfig

    a = cfg.adalora
    total = a.total_step or total_steps or cfg.training.max_steps
    if total is None:
        raise UserError(
            "method: adalora shrinks ranks on a schedule as long as the run, and the run's length is not known "
            "here; set training.max_steps or adalora.total_step."
        )
    tinit = a.tinit if a.tinit is not None else total // 10
    tfinal = a.tfinal if a.tfinal is not None else total // 5
    if tinit >= total - tfinal:
        raise UserError(
            f"adalora: tinit ({tinit}) and tfinal ({tfinal}) leave none of the {total} steps for shrinking ranks; "
            "lower them, or raise adalora.total_step."
        )
    init_r = a.init_r if a.init_r is not None else max(cfg.lora.r, round(1.5 * cfg.lora.r))
    if init_r < cfg.lora.r:
        raise UserError(
            f"adalora.init_r ({init_r}) is below lora.r ({cfg.lora.r}), the average rank AdaLoRA shrinks to; "
            "ranks only shrink, so raise adalora.init_r or lower lora.r."
        )
    return PeftAdaLoraConfig(
        init_r=init_r,
        target_r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        fan_in_fan_out=transposed,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=a.delta_t,
        beta1=a.beta1,
        beta2=a.beta2,
        orth_reg_weight=a.orth_reg_weight,
        total_step=total,
        task_type=_peft_task_type(model),
    )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once, and a 4-bit weight counts
    as the weights it holds (its packed tensor has two a byte)."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        quant_state = getattr(param, "quant_state", None)  # bitsandbytes' Params4bit knows the unpacked shape
        count = math.prod(quant_state.shape) if quant_state is not None else param.numel()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def _adalora_model(model: torch.nn.Module):
    """PEFT's AdaLoraModel inside `model` (which may be wrapped by DDP and by PeftModel), else None."""
    from peft.tuners.adalora import AdaLoraModel

    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    tuner = getattr(inner, "base_model", None)
    return tuner if isinstance(tuner, AdaLoraModel) else None


def after_optimizer_step(model: torch.nn.Module, step: int) -> None:
    """Work an adapter method needs after each optimiser step, before the gradients are zeroed.

    AdaLoRA updates each rank's importance score from its weight and gradient, then masks the
    least important ranks down to this step's budget.  Nothing for the other methods.
    """
    tuner = _adalora_model(model)
    if tuner is None:
        return
    config = tuner.peft_config[tuner.trainable_adapter_name]
    allocator = tuner.rankallocator
    fixed_at = config.total_step - config.tfinal  # the step that fixes the ranks for the rest of the run
    if step >= fixed_at and config.rank_pattern is None and not allocator.ipt:
        # Resumed at or after that step from a checkpoint without `method_state`: PEFT would fail on the
        # missing scores or ranks, so score the ranks on this step's gradients alone and cut to the budget.
        allocator.update_ipt(tuner.model)
        if step > fixed_at:
            config.rank_pattern = allocator.mask_to_budget(tuner.model, allocator.target_bgt)
            allocator.reset_ipt()
    tuner.update_and_allocate(step)


_ADALORA_SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def method_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """What a method keeps outside the weights, for checkpoints: (tensors, JSON-able values); empty for all
    but AdaLoRA, whose importance scores (per adapter weight) and chosen ranks an exact resume needs."""
    tuner = _adalora_model(model)
    if tuner is None:
        return {}, {}
    allocator = tuner.rankallocator
    tensors = {
        f"{kind}/{name}": value.detach().contiguous().cpu()
        for kind in _ADALORA_SCORES
        for name, value in getattr(allocator, kind).items()
    }
    return tensors, {"rank_pattern": tuner.peft_config[tuner.trainable_adapter_name].rank_pattern}


def load_method_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], values: dict) -> None:
    """Put back what `method_state` took, on the device of the model's weights."""
    tuner = _adalora_model(model)
    if tuner is None:
        return
    device = next(tuner.model.parameters()).device
    allocator = tuner.rankallocator
    allocator.reset_ipt()
    for key, value in tensors.items():
        kind, name = key.split("/", 1)
        getattr(allocator, kind)[name] = value.to(device)
    tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = values.get("rank_pattern")


def extra_loss(model: torch.nn.Module) -> torch.Tensor | None:
    """A term the method adds to each optimiser step's loss, or None (every method but AdaLoRA).

    AdaLoRA: `orth_reg_weight` x the mean over its factor matrices of ||P P^T - I||_F (rows of each
    P = lora_A) and ||Q^T Q - I||_F (columns of each Q = lora_B), which keeps the factors close to
    orthogonal so that E holds singular values.  Add it once per optimiser step, not per micro-batch.
    """
    tuner = _adalora_model(model)
    if tuner is None:
        return None
    adapter = tuner.trainable_adapter_name
    weight = tuner.peft_config[adapter].orth_reg_weight
    if weight == 0:
        return None
    penalties = []
    for name, param in tuner.model.named_parameters():
        if name.endswith(f".lora_A.{adapter}"):
            gram = param @ param.T  # [r, r] from A [r, in]
        elif name.endswith(f".lora_B.{adapter}"):
            gram = param.T @ param  # [r, r] from B [out, r]
        else:
            continue
        identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)  # [r, r]
        penalties.append(torch.linalg.matrix_norm(gram - identity))  # Frobenius norm, a scalar
    if not penalties:
        return None
    return weight * torch.stack(penalties).mean()
