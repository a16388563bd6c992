"""The optimiser: AdamW over the trainable parameters."""

from __future__ import annotations

import torch

from tunesmith.config import Config


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.training
    params = [p for p in model.parameters() if p.requires_grad]
    # Weight decay on matrices only: decaying biases and norm gains pulls them to zero for no benefit
    # (the split most LLM recipes use, e.g. nanoGPT's configure_optimizers).
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
