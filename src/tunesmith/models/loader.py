"""Load a model and its tokenizer from a built-in name, a local folder, a .gguf file or a hub id.

With `method: qlora` the model's linear layers load as 4-bit NF4 with double quantisation
(bitsandbytes): about 0.5 bytes a weight instead of 4 (fp32) or 2 (bf16), at the cost of
dequantising each weight on every forward and backward pass.  Where 4-bit cannot run,
`qlora.fallback` decides between plain LoRA on the unquantised weights and a stop.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from tunesmith.config import Config, ModelConfig
from tunesmith.errors import UserError
from tunesmith.hardware import four_bit_status
from tunesmith.models.builtin import BUILTIN_MODELS, builtin_path, convert_gguf_once, tunesmith_home
from tunesmith.models.tasks import auto_model_class, detect_task

log = logging.getLogger(__name__)


def gguf_cached_path(gguf_file: Path) -> Path:
    """A user's .gguf file, dequantised once into a cached safetensors folder (keyed by path, size, mtime)."""
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = tunesmith_home() / "models" / f"gguf-{gguf_file.stem}-{key}"

    def converted(folder: Path) -> bool:
        return (folder / "config.json").is_file()

    if not converted(target):
        convert_gguf_once(gguf_file, target, converted)
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


def model_task(source: str, cfg: Config) -> str:
    """`model.task` for this model: as configured, or (auto) from its config.json (see tunesmith.models.tasks)."""
    from transformers import AutoConfig


    if cfg.model.task != "auto":
        return cfg.model.task
    try:
        model_config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        model_config = None  # load_model reports what is wrong with the source
    return detect_task(model_config)


def load_model(source: str, cfg: Config, dtype: torch.dtype, task: str = "causal_lm", for_training: bool = True):
    """The model for `cfg.method` and `task`; `dtype` is the precision it computes in (and stores unquantised
    weights in).  `for_training=False` (inference only) lets bitsandbytes use its CPU inference kernel."""

    extra = {}
    if cfg.method == "qlora":
        quantization = four_bit_config(cfg, dtype)
        if quantization is not None:
            extra["quantization_config"] = quantization
    try:
        model = auto_model_class(task).from_pretrained(
            source, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code, low_cpu_mem_usage=True, **extra
        )
    except OSError as exc:
        raise UserError(_unreadable(source, cfg.model, exc)) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"model.name: {cfg.model.name} needs Python code shipped with the model; if you trust it, "
                "set model.trust_remote_code: true."
            ) from None
        raise
    if "quantization_config" in extra:
        _release_checkpoint_map(model)
        if for_training:
            _keep_four_bit_trainable(model)
    return model


def _keep_four_bit_trainable(model) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel in a model that trains.

    On CPUs with AVX512-BF16 (bitsandbytes 0.50, `Linear4bit.forward`), the first forward of a 4-bit layer in
    eval mode without gradients converts its weight, in place and for good, to a layout for a kernel that has
    no backward.  A run evaluates between steps, so every later step would lose the gradient that flows through
    the frozen 4-bit weights to the adapters beneath them (and a layer with a bias fails outright).  Inference
    loads (`for_training=False`: chat, serve, merge, the distillation teacher) keep the faster kernel."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _release_checkpoint_map(model) -> None:
    """Copy the unquantised CPU tensors (embeddings, norms, output layer) out of the checkpoint file's memory
    map.  They are views of that map, and while one view lives the whole map stays resident, holding every
    weight that quantisation read: about 4 bytes a weight, more than the 4-bit model itself."""
    from bitsandbytes.nn import Params4bit

    with torch.no_grad():
        for param in model.parameters():  # tied weights are one parameter, copied once
            if param.device.type == "cpu" and not isinstance(param, Params4bit):
                param.data = param.data.clone()


def four_bit_config(cfg: Config, dtype: torch.dtype):
    """bitsandbytes' NF4 + double-quantisation settings, computing in `dtype`; None where 4-bit cannot run here
    and `qlora.fallback: lora` (the reason is reported), a UserError where `qlora.fallback: error`."""
    available, detail = four_bit_status()
    if not available:
        reason = detail.rstrip(".")
        if cfg.qlora.fallback == "error":
            raise UserError(
                f"method: qlora needs 4-bit (NF4) quantisation, which cannot run here: {reason}. "
                "Install bitsandbytes (pip install 'bitsandbytes>=0.50,<0.51', the range tunesmith is tested with; it "
                "runs on CPUs too), or train with method: lora, or set qlora.fallback: lora to do that by itself."
            )
        log.info(
            f"method: qlora: 4-bit cannot run here ({reason}); training plain LoRA on the unquantised weights "
            "instead, which needs more memory (qlora.fallback: error stops instead)."
        )
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # 4-bit NormalFloat: levels at the quantiles of a normal distribution
        bnb_4bit_use_double_quant=True,  # the per-block scales are quantised too: ~0.37 bits a weight saved
        bnb_4bit_compute_dtype=dtype,  # weights are dequantised to this for each matmul
    )


def _unreadable(source: str, cfg: ModelConfig, exc: Exception) -> str:
    if Path(source).is_dir():
        return f"model.name: could not read the model in {source} ({exc}); check that the folder is complete."
    return (
        f"model.name: could not load {cfg.name!r}: it is not a built-in model or a local folder, and fetching it "
        f"from the hub failed (no network?). Download it elsewhere and point model.name at the folder, or use "
        f"the built-in {next(iter(BUILTIN_MODELS))}."
    )
