"""Runtime patches that make training faster, what each one replaces, and the switch that turns them off.

While training, `fast_kernels(model, cfg.training.fast_kernels)` changes the class of some of the model's
modules (and one transformers function) and changes them back when training ends.  Parameters, their
names and the state dict are never touched, so checkpoints, merging and resuming see the ordinary
PEFT/transformers model.  Outside that context nothing is patched.

LoRA layers (`lora.py`, `fast_lora`): less copying, less memory, cheaper dropout.
- Each PEFT LoRA `Linear` (`peft.tuners.lora.layer.Linear`, the adapter on an `nn.Linear`) becomes
  `FastLoraLinear`, which adds `B(A(dropout(x))) * scaling` to the frozen output in one `addmm_`.
- The `lora_A` of each PEFT LoRA `Linear`, `Linear8bitLt` or `Linear4bit` (QLoRA) whose dropout is over 0
  becomes `DropoutLinear` (dropout and A as one autograd function that keeps no dropped copy of the input;
  masks from numpy, row by row inside `dropout_rows`), and its `lora_dropout` an `nn.Identity`.
- A Llama/Mistral/Qwen2/Qwen3 `*MLP` whose gate, up and down projections are all such layers becomes
  `FastLoraSwiGLU`: the whole SwiGLU as one function that recomputes silu and the product in backward.
  They apply to plain LoRA and rsLoRA with one active, unmerged, enabled adapter; DoRA, AdaLoRA, full
  fine-tuning, several active adapters, merged or disabled adapters run PEFT's own forward.

Norms and rotary embeddings (`norm_rope.py`, `fast_norm_rope`): fewer [tokens x hidden] temporaries.
- The RMSNorm modules of the Llama, Mistral, Qwen2 and Qwen3 families (`LlamaRMSNorm`, ...) become
  `FastRMSNorm` (`RMSNormFunction`), with or without LoRA.
- The `apply_rotary_pos_emb` of those families' modeling modules (`transformers.models.llama.modeling_llama`,
  ...) is replaced, process-wide while the context is open, by one that runs q and k through `RotaryFunction`.
  Both apply only while training in fp32 without autocast (a CPU's default; GPUs train under autocast and
  fall through to transformers' code); anything else runs transformers' own code.

On a GPU `auto` means off: these paths are written for CPUs (dropout masks drawn row by row, fp32 fusions that
step aside under autocast), and on an H200 the stock modules trained 37% faster (bench/RESULTS.md, "GPU check").

Switching off: `training.fast_kernels: off` (or `--set training.fast_kernels=off`) trains on the stock
PEFT/transformers modules.  With `lora.dropout: 0` the per-step losses are the same as with `auto` to float
rounding (tests/test_fast_kernels.py checks it); with dropout the masks are drawn another way (numpy's SFC64
instead of torch's generator), so the two runs drop different elements, with the same probability.
"""

from __future__ import annotations

import contextlib

import torch

from tunesmith.models.fast.lora import dropout_rows, fast_lora, forget_shared_mask, new_mask_seed
from tunesmith.models.fast.norm_rope import fast_norm_rope

__all__ = ["dropout_rows", "fast_kernels", "fast_lora", "fast_norm_rope", "forget_shared_mask", "kernel_mode",
           "new_mask_seed"]

FAST_KERNEL_MODES = ("auto", "off")


def kernel_mode(setting: str, device: str) -> str:
    """The mode `training.fast_kernels` means on `device`: auto patches on CPUs only (see above)."""
    return setting if device == "cpu" else "off"


@contextlib.contextmanager
def fast_kernels(model: torch.nn.Module, mode: str):
    """Inside: with mode "auto", the LoRA-layer and norm/rotary patches above, nested as `fast_lora(model)`
    then `fast_norm_rope(model)`; with "off", the model exactly as it is.  Outside: as it was."""
    if mode not in FAST_KERNEL_MODES:
        raise ValueError(f"fast_kernels: mode is one of {FAST_KERNEL_MODES}, not {mode!r}")
    if mode == "off":
        yield
        return
    with fast_lora(model), fast_norm_rope(model):
        yield
