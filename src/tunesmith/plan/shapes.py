"""A model's shape without its weights: parameter counts, layer sizes and what a LoRA adapter would add.

The model is built on PyTorch's meta device from its config.json (transformers' `from_config` under
`torch.device("meta")`): every parameter has a shape and no storage, so a 70B model's shape is
read in a second and no weights are loaded or downloaded.  Parameter counts come from that model, not from a
formula per family, so tied embeddings, biases, GQA and gated MLPs count as the model actually has them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.config import Config
from tunesmith.errors import UserError
from tunesmith.models.adapters import linear_modules, targeted_layers
from tunesmith.models.tasks import auto_model_class


@dataclass
class ModelShape:
    """What the memory model needs to know about a model, read from its config (no weights)."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    total_params: int
    embedding_params: int  # input embeddings, and the output layer when it is not tied to them
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # dotted name -> (in, out), output excluded
    meta_model: object = field(default=None, repr=False, compare=False)  # the model on the meta device

    @property
    def linear_params(self) -> int:
        return sum(i * o for i, o in self.linear_shapes.values())


def _first(config, *names: str, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value:
            return value
    return default


def shape_from_config(config, task: str = "causal_lm") -> ModelShape:
    """The ModelShape of a transformers config object (built on the meta device)."""
    text = getattr(config, "text_config", None)
    body = text if text is not None and not getattr(config, "hidden_size", None) else config
    with torch.device("meta"):  # (no stderr redirect or warnings filter here: neither is thread-safe)
        model = auto_model_class(task).from_config(config)
    seen: set[int] = set()
    total = 0
    for param in model.parameters():  # tied weights are one parameter
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = inputs is not None and outputs is not None and inputs.weight is outputs.weight
    embedding = (inputs.weight.numel() if inputs is not None else 0) + (
        outputs.weight.numel() if outputs is not None and not tied else 0)
    linears = {}
    for name, module in linear_modules(model).items():
        weight = module.weight
        out_features, in_features = weight.shape[0], weight.shape[1]
        if type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
            in_features, out_features = out_features, in_features
        linears[name] = (int(in_features), int(out_features))
    hidden = int(_first(body, "hidden_size", "n_embd", "d_model", default=0))
    heads = int(_first(body, "num_attention_heads", "n_head", "num_heads", default=1))
    shape = ModelShape(
        model_type=str(getattr(config, "model_type", "unknown")),
        layers=int(_first(body, "num_hidden_layers", "n_layer", "num_layers", default=0)),
        hidden=hidden,
        intermediate=int(_first(body, "intermediate_size", "n_inner", "d_ff", "ffn_dim", default=4 * hidden)),
        heads=heads,
        kv_heads=int(_first(body, "num_key_value_heads", default=heads)),
        head_dim=int(_first(body, "head_dim", default=hidden // max(heads, 1))),
        vocab=int(_first(body, "vocab_size", default=0)),
        tied_embeddings=tied,
        total_params=total,
        embedding_params=embedding,
        linear_shapes=linears,
        meta_model=model,
    )
    return shape


def shape_from_folder(folder: str | Path, task: str = "causal_lm", trust_remote_code: bool = False) -> ModelShape:
    """The ModelShape of the model whose config.json is in `folder` (weights need not be there)."""
    from transformers import AutoConfig

    path = Path(folder) / "config.json"
    try:
        json.loads(path.read_text(encoding="utf-8"))
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: could not read the model's config ({exc}); the estimate needs a readable "
                        "config.json.") from None
    return shape_from_config(config, task)


def lora_trainable(shape: ModelShape, cfg: Config) -> int:
    """Parameters a LoRA-family adapter adds and trains: r x (in + out) per targeted layer (AdaLoRA starts at
    init_r and adds one singular value per rank; DoRA adds a magnitude per output feature)."""
    names = targeted_names(shape, cfg)
    rank = cfg.lora.r
    if cfg.method == "adalora":
        rank = cfg.adalora.init_r or int(1.5 * cfg.lora.r)
    total = 0
    for name in names:
        in_features, out_features = shape.linear_shapes[name]
        total += rank * (in_features + out_features)
        if cfg.method == "adalora":
            total += rank
        if cfg.lora.use_dora or cfg.method == "dora":
            total += out_features
    return total


def targeted_names(shape: ModelShape, cfg: Config) -> list[str]:
    """The dotted names of the linear layers the adapter attaches to."""
    model = shape.meta_model
    return targeted_layers(model, cfg.lora.target_modules) if model is not None else list(shape.linear_shapes)
