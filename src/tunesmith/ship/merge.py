"""`tunesmith merge RUN_DIR --out DIR`: fold a run's adapter into its base model and save the result as a
plain Hugging Face folder (safetensors weights, config, generation config, the run's tokenizer with its
chat template), which any tool that reads such folders loads without PEFT or tunesmith.

Merging adds each adapter's update to the weight it sits beside (for LoRA W' = W + (alpha / r) * B @ A),
so the merged model computes what base + adapter computed, up to float rounding in the saved precision.
A QLoRA adapter was trained against the NF4-quantised base, not the original weights: its base is
de-quantised first (every weight becomes the NF4 value it was rounded to, in the merge precision), and the
adapter is added to that.  The merged model is therefore the model the run trained and evaluated, at full
size; it is not the original base + adapter.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tunesmith.errors import UserError
from tunesmith.fileio import atomic_write_dir, atomic_write_json
from tunesmith.hardware import DTYPES, detect_device, four_bit_status, resolve_dtype
from tunesmith.models.run_folder import load_for_inference, open_run

log = logging.getLogger(__name__)

MERGE_INFO = "tunesmith_merge.json"  # written beside the weights: where they came from and how
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def merge_dtype(handle, requested: str, device: str) -> torch.dtype:
    """The precision to merge and save in: as asked, or for "auto" the dtype the run trained in (its
    summary.json records it), else what `model.dtype` resolves to on this device."""

    if requested not in DTYPE_CHOICES:
        raise UserError(f"--dtype {requested}: give one of {', '.join(DTYPE_CHOICES)}.")
    if requested != "auto":
        return DTYPES[requested]
    summary_file = handle.path / "summary.json"
    if summary_file.is_file():
        try:
            trained = json.loads(summary_file.read_text())["hardware"]["dtype"]
        except (ValueError, KeyError, TypeError):
            trained = None
        if trained in DTYPES:
            return DTYPES[trained]
    return resolve_dtype(handle.cfg.model.dtype, device)


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "auto") -> dict:
    """Merge RUN_DIR's adapter into its base and save it in `out_dir` (a new or empty folder, written
    atomically); a full fine-tune's model/ is re-saved as it is.  Returns what tunesmith_merge.json holds."""

    handle = open_run(run_dir)
    if handle.kind == "folder":
        raise UserError(f"{run_dir} is a model folder, not a training run, so it has no adapter to merge; give the "
                        "run folder that `tunesmith train` printed (it holds adapter/ or model/).")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--out {out_dir} already exists and is not empty; tunesmith never writes over it. "
                        "Give a new folder (or delete that one first).")
    cfg = handle.cfg
    device = detect_device()
    target = merge_dtype(handle, dtype, device)
    precision = str(target).replace("torch.", "")
    # A qlora run's base loads in 4-bit where bitsandbytes works, and load_for_inference de-quantises it.
    four_bit = handle.kind == "adapter" and cfg.method == "qlora" and four_bit_status()[0]

    if handle.kind == "model":
        method = "full fine-tune: model/ re-saved as it is (nothing to merge)"
        note = "A full fine-tune has no adapter; its weights are saved unchanged apart from the precision."
    elif four_bit:
        method = f"{cfg.method} adapter merged into the de-quantised 4-bit (NF4) base"
        note = ("The base was de-quantised from NF4 before merging: the merged weights are the NF4 values the "
                "adapter was trained against plus the adapter, not the original base weights plus the adapter.")
    elif cfg.method == "qlora":
        method = f"{cfg.method} adapter merged into the unquantised base (4-bit is not available here)"
        note = ("4-bit (NF4) quantisation cannot run on this machine, so the adapter was merged into the original "
                "base weights rather than the NF4 ones it was trained against; its outputs differ slightly from "
                "the trained run's. Merge on a machine where `tunesmith doctor` reports 4-bit to get those.")
    else:
        method = f"{cfg.method} adapter merged into the base"
        note = "The adapter's update was added to the base weights it was trained beside."
    log.info(f"merge: {handle.path} ({method}) in {precision} -> {out_dir}")

    model, tokenizer, _task = load_for_inference(handle, dtype=target, device=device, merged=True)
    info = {
        "source_run": str(handle.path),
        "base_model": cfg.model.name,
        "base_source": handle.source,
        "method": cfg.method,
        "merge": method,
        "dtype": precision,
        "dequantized_from_nf4": four_bit,
        "note": note,
        "system_prompt": cfg.data.system_prompt,  # chat and generate use it as the default for this folder
    }

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only (and generation_config.json)
        tokenizer.save_pretrained(tmp)  # with the chat template training used
        atomic_write_json(tmp / MERGE_INFO, info)

    atomic_write_dir(out_dir, fill)
    log.info(f"merge: wrote {out_dir} ({precision}{', de-quantised from NF4' if four_bit else ''}); load it with "
           f"AutoModelForCausalLM.from_pretrained('{out_dir}') or `tunesmith chat {out_dir}`.")
    return info
