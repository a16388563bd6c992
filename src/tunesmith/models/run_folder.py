"""Open what `tunesmith train` made, for using it: a run folder (base model + adapter/, or a full
fine-tune's model/) or a plain Hugging Face folder (e.g. what `tunesmith merge` wrote).

Every shipping command (chat, generate, merge, export, serve) and `tunesmith eval` start here, so
a run is found, checked and loaded one way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.hardware import detect_device, resolve_dtype
from tunesmith.models.loader import load_model, load_tokenizer, model_task, resolve_model_source
from tunesmith.models.quantized import without_bitsandbytes


@dataclass
class RunHandle:
    """What a path holds: `kind` is "adapter" (base + LoRA-style adapter), "model" (a full
    fine-tune's weights) or "folder" (a Hugging Face model folder outside any run)."""

    path: Path
    kind: str
    weights: Path  # adapter/, model/ or the folder itself
    cfg: object  # tunesmith.config.Config: the run's config.yaml, or defaults for a bare folder
    source: str  # the base model `from_pretrained` reads (for "folder": the folder)


def open_run(path: str | Path, overrides: list[str] | tuple = ()) -> RunHandle:
    """Check that `path` is a finished run folder or a model folder and say what it holds."""

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; give the run folder that `tunesmith train` printed.")
    config_file = path / "config.yaml"
    if not config_file.is_file():
        if (path / "config.json").is_file():  # a merged model or any Hugging Face folder
            cfg = load_config(None, list(overrides))
            cfg.model.name = str(path)  # as text, whatever it looks like (a folder named 1e5 or true, say)
            return RunHandle(path=path, kind="folder", weights=path, cfg=cfg, source=str(path))
        raise UserError(f"{path} has no config.yaml, so it is not a tunesmith run folder; give the folder "
                        "that `tunesmith train` printed (it holds config.yaml, summary.json and adapter/ or model/).")
    cfg = load_config(config_file, list(overrides))
    for kind in ("adapter", "model"):
        folder = path / kind
        if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
            return RunHandle(path=path, kind=kind, weights=folder, cfg=cfg, source=resolve_model_source(cfg.model.name))
    raise UserError(
        f"{path} has no trained adapter/ or model/ folder: the run has not finished (resume it with "
        f"`tunesmith train {config_file} --resume`) or this is not a tunesmith run folder."
    )


def load_tokenizer_for(handle: RunHandle):
    """The tokenizer saved with the trained weights (it carries the chat template training used)."""

    has_own = (handle.weights / "tokenizer_config.json").is_file()
    return load_tokenizer(str(handle.weights) if has_own else handle.source, handle.cfg.model)


def load_base(handle: RunHandle, dtype: torch.dtype, task: str, dequantize: bool = False):
    """The run's base model as it trained (4-bit for qlora); `dequantize` turns 4-bit layers back
    into ordinary ones in `dtype` (the weights the adapter was trained against, not the originals)."""

    model = load_model(handle.source, handle.cfg, dtype, task, for_training=False)
    if dequantize and getattr(model, "is_loaded_in_4bit", False):
        model = model.dequantize()
        model.to(dtype)
    return model


def load_for_inference(handle: RunHandle, dtype: torch.dtype | None = None, device: str | None = None,
                       merged: bool = False, dequantize: bool = False):
    """(model, tokenizer, task) in eval mode.  For an adapter run the model is a PeftModel (its
    `disable_adapter()` gives the base), or with `merged` a plain model with the adapter folded in."""

    device = device or detect_device()
    dtype = dtype or resolve_dtype(handle.cfg.model.dtype, device)
    tokenizer = load_tokenizer_for(handle)
    task = model_task(handle.source, handle.cfg)
    if handle.kind == "adapter":
        base = load_base(handle, dtype, task, dequantize=dequantize or merged)
        with without_bitsandbytes(), warnings.catch_warnings():  # a 4-bit base imported bitsandbytes already
            # peft (0.21) asks transformers 5 for `is_gradient_checkpointing`, which warns that it was renamed:
            # their notice to each other, not one for whoever is chatting with the model
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, str(handle.weights), is_trainable=False)
        if merged:
            model = model.merge_and_unload()
    else:
        model = load_model(str(handle.weights), handle.cfg.model_copy(update={"method": "full"}), dtype, task)
    model.to(device)
    model.eval()
    return model, tokenizer, task
