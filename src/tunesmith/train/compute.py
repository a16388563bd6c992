"""How the forward and backward passes run: autocast (mixed precision) and gradient checkpointing.

`training.autocast` runs matmuls in a 16-bit type while the weights that train stay in the
type they were loaded in (LoRA adapters are kept in fp32 by PEFT).  `auto` turns it on where the
device's fast precision is 16-bit (see `hardware.explain_dtype`): CUDA, XPU and MPS; on CPUs it
stays off (tunesmith's fused CPU paths are fp32, and measured faster than bf16 even with AMX).

`training.gradient_checkpointing` keeps only each decoder layer's input during the forward pass
and recomputes the rest in the backward pass: about a third more compute for activation
memory that no longer grows with the number of layers.  `auto` turns it on for QLoRA (a method
picked to save memory) and when the estimated activations of one micro-batch would take more
than half of the memory left beside the weights.
"""

from __future__ import annotations

import torch

from tunesmith.config import Config
from tunesmith.hardware import cuda_native_bf16, explain_dtype, memory_info, rss_bytes

HALF_TYPES = (torch.bfloat16, torch.float16)


def autocast_dtype(setting: bool | str, device: str, dtype: torch.dtype) -> torch.dtype | None:
    """The 16-bit type autocast runs matmuls in, or None for no autocast."""
    if setting is False:
        return None
    if dtype in HALF_TYPES:
        return dtype  # weights are already 16-bit: autocast keeps fp32 adapters and norms in step with them
    if setting == "auto":
        fast = explain_dtype(device)[0]
        return fast if fast in HALF_TYPES else None
    # asked for explicitly: bf16 unless the GPU only emulates it
    if device == "cuda" and not cuda_native_bf16(torch.cuda.current_device()):
        return torch.float16
    if device == "mps":
        return torch.float16
    return torch.bfloat16


def activation_bytes(model_config, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    """Activations a decoder keeps for the backward pass, for one micro-batch, without checkpointing.

    Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022),
    section 4.1: per layer about s*b*h*(34 + 5*a*s/h) bytes with 16-bit activations (s sequence
    length, b batch, h hidden size, a attention heads); twice that in fp32.  Fused attention
    kernels keep less than the 5*a*s/h term, so this errs on the high side.
    """
    get = lambda *names: next((getattr(model_config, n) for n in names if getattr(model_config, n, None)), None)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model") or 0
    layers = get("num_hidden_layers", "n_layer", "num_layers") or 0
    heads = get("num_attention_heads", "n_head", "num_heads") or 1
    if not hidden or not layers:
        return 0
    s, b = seq_len, batch_size
    per_layer_16bit = s * b * hidden * (34 + 5 * heads * s / hidden)
    scale = 1 if dtype in HALF_TYPES else 2
    return int(per_layer_16bit * layers * scale)


def _memory_left(device: str) -> int | None:
    """Bytes free for activations: free device memory (GPU) or available RAM (CPU), weights already loaded."""
    info = memory_info()
    if device in ("cuda", "xpu"):
        gpus = [g for g in info["gpus"] if g["kind"] == device]
        return gpus[0]["free_bytes"] if gpus else None
    available = info["ram_available_bytes"]
    limit = info["ram_limit_bytes"]
    if limit is not None and available is not None:
        available = min(available, max(limit - rss_bytes(), 0))
    return available


def want_gradient_checkpointing(
    cfg: Config, model: torch.nn.Module, device: str, dtype: torch.dtype, pass_tokens: int | None = None
) -> tuple[bool, str]:
    """Whether to checkpoint, and a sentence why (printed at the start of the run).  `pass_tokens`:
    padding-free passes of at most that many tokens, instead of batch_size x max_length padded blocks."""
    setting = cfg.training.gradient_checkpointing
    if setting is not False and not getattr(model, "supports_gradient_checkpointing", False):
        return False, f"gradient checkpointing: off (this {type(model).__name__} does not support it)"
    if setting is True:
        return True, "gradient checkpointing: on (training.gradient_checkpointing: true)"
    if setting is False:
        return False, "gradient checkpointing: off (training.gradient_checkpointing: false)"
    if cfg.method == "qlora":
        # QLoRA is chosen to save memory, and its recipe checkpoints (Dettmers et al., "QLoRA", 2023, section 4)
        return True, "gradient checkpointing: on (auto: method qlora trades compute for memory)"
    rows, length = cfg.training.batch_size, cfg.data.max_length
    if pass_tokens is not None:
        rows, length = max(1, pass_tokens // length), min(length, pass_tokens)
    need = activation_bytes(getattr(model, "config", None), rows, length, dtype)
    left = _memory_left(device)
    if not need or left is None:
        return False, "gradient checkpointing: off (auto: the activation size or free memory is unknown)"
    gib = 2**30
    if need > left / 2:
        what = f"{pass_tokens} tokens" if pass_tokens is not None else f"{rows} x {length} tokens"
        return True, (f"gradient checkpointing: on (auto: one pass of {what} may keep ~{need / gib:.1f} GiB of "
                      f"activations, more than half of the {left / gib:.1f} GiB free)")
    return False, (f"gradient checkpointing: off (auto: ~{need / gib:.1f} GiB of activations fit in the "
                   f"{left / gib:.1f} GiB free; checkpointing would cost about a third more compute)")


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Checkpoint every decoder layer, non-reentrant: frozen embeddings then need no input-gradient hook,
    and dropout is replayed identically in the recomputation (torch saves and restores the RNG state)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
