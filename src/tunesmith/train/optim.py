"""The optimiser: AdamW over the trainable parameters, in 32-bit (torch) or 8-bit (bitsandbytes).

AdamW keeps two running moments per trained weight, 8 bytes a weight in fp32: for full
fine-tuning that is twice the model again.  `adamw_8bit` stores them block-wise quantised to
8 bits (about 2 bytes a weight; bitsandbytes keeps tensors under 4096 elements, such as biases
and small LoRA factors, in 32-bit).  `paged_adamw_8bit` also lets the state spill from GPU to CPU
memory under pressure instead of failing, which only CUDA's unified memory does.  Where
bitsandbytes is missing or cannot run on the device, the run uses torch's AdamW and says so.
"""

from __future__ import annotations

import functools
import logging

import torch

from tunesmith.config import Config

log = logging.getLogger(__name__)

# bitsandbytes quantises optimiser state only for tensors at least this large (its min_8bit_size).
_EIGHT_BIT_MIN_ELEMENTS = 4096


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW (torch's or bitsandbytes' 8-bit) over `model`'s trainable parameters.  A fallback from 8-bit is said
    in one logged line."""
    t = cfg.training
    params = [p for p in model.parameters() if p.requires_grad]
    # Weight decay on matrices only: decaying biases and norm gains pulls them to zero for no benefit
    # (the split most LLM recipes use, e.g. nanoGPT's configure_optimizers).
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    settings = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay)
    if t.optimizer != "adamw":
        device = params[0].device if params else torch.device("cpu")
        eight_bit = eight_bit_adamw_class(t.optimizer, device)
        if eight_bit is not None:
            optimizer = eight_bit(groups, **settings)
            optimizer.state_dict = functools.partial(_flat_state_dict, optimizer)
            return optimizer
    return torch.optim.AdamW(groups, **settings)


def eight_bit_adamw_class(name: str, device: torch.device):
    """bitsandbytes' AdamW8bit or PagedAdamW8bit where it runs on `device`, else None (with a one-line notice)."""
    fallback = "using torch's AdamW (32-bit state) instead"
    try:
        import bitsandbytes as bnb
    except ImportError:
        log.info(f"training.optimizer: {name} needs bitsandbytes (pip install bitsandbytes), which is not installed; {fallback}.")
        return None
    except Exception as exc:  # a broken install raises all sorts (missing CUDA libraries, RuntimeError)
        log.info(f"training.optimizer: bitsandbytes failed to import ({type(exc).__name__}); {fallback}.")
        return None
    if name == "paged_adamw_8bit" and device.type != "cuda":
        log.info(f"training.optimizer: paging optimiser state needs CUDA; on {device.type} paged_adamw_8bit runs as adamw_8bit.")
        name = "adamw_8bit"
    chosen = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    problem = _eight_bit_problem(chosen, device)
    if problem is not None:
        log.info(f"training.optimizer: {name} cannot run on {device.type} ({problem}); {fallback}.")
        return None
    return chosen


def _flat_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """A bitsandbytes optimiser's state in the form our checkpoints store: {slot: tensor} per parameter.

    bitsandbytes' own state_dict nests the quantised slots (state1, absmax1, qmap1, ...) in a sub-dict
    to hide them from FSDP's gather; its load_state_dict reads the flat form as well.  Its quantisation
    maps are one tensor shared by every parameter, and safetensors stores no tensor twice, so repeats
    are copied (256 floats each).
    """
    state = torch.optim.Optimizer.state_dict(optimizer)
    # torch hands out the live per-parameter dicts: copy them before replacing anything
    state["state"] = {index: dict(slots) for index, slots in state["state"].items()}
    seen: set[int] = set()
    for slots in state["state"].values():
        for key, value in slots.items():
            if torch.is_tensor(value):
                storage = value.untyped_storage().data_ptr()
                if storage in seen:
                    slots[key] = value.clone()
                seen.add(storage)
    return state


def _eight_bit_problem(optimizer_class, device: torch.device) -> str | None:
    """One step of the 8-bit optimiser on a throwaway tensor large enough to get 8-bit state; None if it worked."""
    try:
        weight = torch.nn.Parameter(torch.ones(_EIGHT_BIT_MIN_ELEMENTS, device=device))  # [4096]
        weight.grad = torch.full_like(weight, 0.5)
        probe = optimizer_class([weight], lr=0.1)
        probe.step()
        if probe.state[weight]["state1"].dtype != torch.uint8:
            return "it kept its state in 32 bits"
        if not bool(torch.isfinite(weight).all()) or bool((weight == 1).all()):
            return "its update left the weight unchanged or not finite"
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {message}"[:200]
    return None


def allocate_early(params: list, optimizer) -> None:
    """Gradient buffers and AdamW's moments, allocated before the first forward pass and kept for the run.

    Left to themselves, both are allocated in the middle of the first step (gradients during the
    backward pass, moments in the first optimizer step), between activations that are freed a moment
    later.  The C heap cannot give back or reuse the space around such long-lived blocks well, and on a
    CPU that fragmentation showed up as about a gigabyte of resident memory that no tensor was using
    (bench/RESULTS.md, "Training throughput and memory vs Hugging Face Trainer + PEFT (CPU)", the levers table of
    "Levers one by one").  Allocated first, they sit together below everything else.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimiser
    if type(optimizer) is not torch.optim.AdamW:
        return  # other optimisers (bitsandbytes' 8-bit ones) allocate their own state
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("fused") or group.get("capturable"):
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:  # the values torch's Adam._init_group would give them on the first step
                state["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
