"""Load a model and its tokenizer from a built-in name, a local folder, a .gguf file or a hub id."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from tunesmith.config import ModelConfig
from tunesmith.errors import UserError
from tunesmith.fileio import atomic_write_dir
from tunesmith.models.builtin import BUILTIN_MODELS, _convert_gguf, builtin_path, tunesmith_home


def gguf_cached_path(gguf_file: Path) -> Path:
    """A user's .gguf file, dequantised once into a cached safetensors folder (keyed by path, size, mtime)."""
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = tunesmith_home() / "models" / f"gguf-{gguf_file.stem}-{key}"
    if not (target / "config.json").is_file():
        atomic_write_dir(target, lambda tmp: _convert_gguf(gguf_file, tmp))
    return target


def resolve_model_source(name: str) -> str:
    """Turn `model.name` into something `from_pretrained` reads: a local folder path or a hub id."""
    if name in BUILTIN_MODELS:
        return str(builtin_path(name))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model.name: the GGUF file {path} does not exist; check the path.")
        return str(gguf_cached_path(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model.name: the folder {path} has no config.json, so it is not a Hugging Face model folder; "
                "point it at the folder that holds config.json and the weights."
            )
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(
            f"model.name: {name!r} is neither a folder nor a .gguf file; give a built-in model "
            f"({', '.join(BUILTIN_MODELS)}), a Hugging Face folder, a .gguf file or a hub id."
        )
    return name  # a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct


def load_tokenizer(source: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise UserError(_unreadable(source, cfg, exc)) from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any token will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: str, cfg: ModelConfig, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=cfg.trust_remote_code, low_cpu_mem_usage=True
        )
    except OSError as exc:
        raise UserError(_unreadable(source, cfg, exc)) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"model.name: {cfg.name} needs Python code shipped with the model; if you trust it, "
                "set model.trust_remote_code: true."
            ) from None
        raise
    return model


def _unreadable(source: str, cfg: ModelConfig, exc: Exception) -> str:
    if Path(source).is_dir():
        return f"model.name: could not read the model in {source} ({exc}); check that the folder is complete."
    return (
        f"model.name: could not load {cfg.name!r}: it is not a built-in model or a local folder, and fetching it "
        f"from the hub failed (no network?). Download it elsewhere and point model.name at the folder, or use "
        f"the built-in {next(iter(BUILTIN_MODELS))}."
    )
