"""Adapters (PEFT LoRA) put on a loaded model, and the choice of what trains."""

from __future__ import annotations

import torch

from tunesmith.config import Config
from tunesmith.errors import UserError


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct short names of the model's linear layers (q_proj, v_proj, ...), output layer excluded."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def prepare_trainable(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Full fine-tuning trains every weight; LoRA freezes them and trains small adapters beside them."""
    if cfg.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = cfg.lora.target_modules
    if isinstance(targets, list):
        available = linear_module_names(model)
        unknown = [name for name in targets if name not in available]
        if unknown:
            raise UserError(
                f"lora.target_modules: {', '.join(unknown)} match no linear layer of this model; "
                f"its linear layers are: {', '.join(available)} (or use all-linear)."
            )
    elif targets != "all-linear":
        raise UserError(f"lora.target_modules: given {targets!r}; allowed: all-linear or a list of layer names.")
    peft_config = PeftLoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,  # PEFT's "all-linear" is every linear layer except the output layer
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def after_optimizer_step(model: torch.nn.Module, step: int) -> None:
    """Work an adapter method needs after each optimiser step (none for LoRA and full fine-tuning)."""
    return None
