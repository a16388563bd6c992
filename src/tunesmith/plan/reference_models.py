"""Published architecture numbers of real models, for estimates that need a model's shape and nothing else.

Each entry is the part of the model's own `config.json` (on the Hugging Face Hub, under the name given) that
decides its parameter count and activation sizes: layers, hidden size, attention heads, key/value heads (GQA),
MLP intermediate size, vocabulary, whether the output layer shares the input embeddings, and the context and
rotary settings for completeness.  `published_billions` is the size the model card (or, for LLaMA-1, the LLaMA
paper, Touvron et al. 2023, Table 2) states; tests/test_estimate_matrix.py checks that the model built from
these numbers on the meta device has that many parameters (within 1%).

`reference_config(name)` turns an entry into a transformers config object; `reference_shape(name)` gives its
`ModelShape` (plan/shapes.py, cached); `write_config_json(name, folder)` writes a config.json that
`shape_from_folder` reads, the same way a downloaded model's folder would be read.  No weights, no network.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import UserError
from tunesmith.plan.shapes import ModelShape, shape_from_config

# The rotary scaling of the Llama 3.1 / 3.2 family (their config.json files, "rope_scaling"; factor 8 for 3.1,
# 32 for 3.2): it changes positions, not sizes.
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = dict(_LLAMA31_ROPE, factor=32.0)


@dataclass(frozen=True)
class ReferenceModel:
    """One model's published numbers: its Hub name, size as published, and config.json fields."""

    name: str
    published_billions: float
    config: dict = field(default_factory=dict)
    source: str = ""  # where the numbers are published


def _llama(layers, hidden, heads, kv_heads, intermediate, vocab, tied, max_positions, rope_theta, rope=None,
           head_dim=None):
    config = {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": hidden,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": intermediate,
              "vocab_size": vocab, "tie_word_embeddings": tied, "max_position_embeddings": max_positions,
              "rope_theta": rope_theta, "rms_norm_eps": 1e-5, "hidden_act": "silu"}
    if rope:
        config["rope_scaling"] = dict(rope)
    if head_dim:
        config["head_dim"] = head_dim
    return config


def _qwen2(layers, hidden, heads, kv_heads, intermediate, vocab, tied, max_positions, rope_theta):
    # Qwen2 / Qwen2.5 put a bias on the q, k and v projections (the modelling code does; config.json has no key)
    return {"model_type": "qwen2", "num_hidden_layers": layers, "hidden_size": hidden,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": intermediate,
            "vocab_size": vocab, "tie_word_embeddings": tied, "max_position_embeddings": max_positions,
            "rope_theta": rope_theta, "rms_norm_eps": 1e-6, "hidden_act": "silu", "use_sliding_window": False}


def _mistral(layers, hidden, heads, kv_heads, intermediate, vocab, max_positions, rope_theta):
    return {"model_type": "mistral", "num_hidden_layers": layers, "hidden_size": hidden,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": intermediate,
            "vocab_size": vocab, "tie_word_embeddings": False, "max_position_embeddings": max_positions,
            "rope_theta": rope_theta, "rms_norm_eps": 1e-5, "hidden_act": "silu", "sliding_window": None,
            "head_dim": hidden // heads}


_MODELS = [
    # Meta Llama 3.2 / 3.1 / 3 (config.json of meta-llama/<name> on the Hub; sizes from the Hub's model pages)
    ReferenceModel("meta-llama/Llama-3.2-1B-Instruct", 1.24,
                   _llama(16, 2048, 32, 8, 8192, 128256, True, 131072, 500000.0, _LLAMA32_ROPE, head_dim=64),
                   "meta-llama/Llama-3.2-1B-Instruct config.json; 1.24B on its model page"),
    ReferenceModel("meta-llama/Llama-3.2-3B-Instruct", 3.21,
                   _llama(28, 3072, 24, 8, 8192, 128256, True, 131072, 500000.0, _LLAMA32_ROPE, head_dim=128),
                   "meta-llama/Llama-3.2-3B-Instruct config.json; 3.21B on its model page"),
    ReferenceModel("meta-llama/Llama-3.1-8B-Instruct", 8.03,
                   _llama(32, 4096, 32, 8, 14336, 128256, False, 131072, 500000.0, _LLAMA31_ROPE),
                   "meta-llama/Llama-3.1-8B-Instruct config.json; 8.03B on its model page"),
    ReferenceModel("meta-llama/Meta-Llama-3-8B", 8.03,
                   _llama(32, 4096, 32, 8, 14336, 128256, False, 8192, 500000.0),
                   "meta-llama/Meta-Llama-3-8B config.json; 8.03B on its model page"),
    # Qwen2.5 instruct models (config.json of Qwen/<name>; "Number of Parameters" in each model card)
    ReferenceModel("Qwen/Qwen2.5-0.5B-Instruct", 0.49, _qwen2(24, 896, 14, 2, 4864, 151936, True, 32768, 1e6),
                   "Qwen/Qwen2.5-0.5B-Instruct config.json; 0.49B in its model card"),
    ReferenceModel("Qwen/Qwen2.5-1.5B-Instruct", 1.54, _qwen2(28, 1536, 12, 2, 8960, 151936, True, 32768, 1e6),
                   "Qwen/Qwen2.5-1.5B-Instruct config.json; 1.54B in its model card"),
    ReferenceModel("Qwen/Qwen2.5-3B-Instruct", 3.09, _qwen2(36, 2048, 16, 2, 11008, 151936, True, 32768, 1e6),
                   "Qwen/Qwen2.5-3B-Instruct config.json; 3.09B in its model card"),
    ReferenceModel("Qwen/Qwen2.5-7B-Instruct", 7.62, _qwen2(28, 3584, 28, 4, 18944, 152064, False, 32768, 1e6),
                   "Qwen/Qwen2.5-7B-Instruct config.json; 7.61B in its model card, 7.62B on its model page"),
    # DeepSeek-R1 distilled into Qwen2.5-Math / Llama-3.1 bases: the base's shape, but the 1.5B unties its
    # output layer (tie_word_embeddings false), which is why it is 1.78B where Qwen2.5-1.5B is 1.54B
    ReferenceModel("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1.78,
                   _qwen2(28, 1536, 12, 2, 8960, 151936, False, 131072, 10000.0),
                   "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B config.json; 1.78B on its model page"),
    ReferenceModel("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 7.62,
                   _qwen2(28, 3584, 28, 4, 18944, 152064, False, 131072, 10000.0),
                   "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B config.json; 7.62B on its model page"),
    ReferenceModel("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 8.03,
                   _llama(32, 4096, 32, 8, 14336, 128256, False, 131072, 500000.0, _LLAMA31_ROPE),
                   "deepseek-ai/DeepSeek-R1-Distill-Llama-8B config.json; 8.03B on its model page"),
    ReferenceModel("mistralai/Mistral-7B-Instruct-v0.3", 7.25,
                   _mistral(32, 4096, 32, 8, 14336, 32768, 32768, 1e6),
                   "mistralai/Mistral-7B-Instruct-v0.3 config.json; 7.25B on its model page"),
    # For the published-measurement comparison (bench/estimate_published.py)
    ReferenceModel("meta-llama/Llama-2-7b-hf", 6.74,
                   _llama(32, 4096, 32, 32, 11008, 32000, False, 4096, 10000.0),
                   "meta-llama/Llama-2-7b-hf config.json; 6.74B on its model page"),
    ReferenceModel("huggyllama/llama-65b", 65.2,
                   _llama(80, 8192, 64, 64, 22016, 32000, False, 2048, 10000.0),
                   "LLaMA-65B as converted to transformers (huggyllama/llama-65b config.json); 65.2B in Touvron "
                   "et al. 2023, Table 2"),
]
REFERENCE_MODELS: dict[str, ReferenceModel] = {m.name: m for m in _MODELS}


def reference_model(name: str) -> ReferenceModel:
    """The entry for `name`: its full Hub name, or the part after the slash."""
    if name in REFERENCE_MODELS:
        return REFERENCE_MODELS[name]
    by_short = {m.name.split("/")[-1].lower(): m for m in _MODELS}
    found = by_short.get(name.split("/")[-1].lower())
    if found is None:
        raise UserError(f"{name!r} is not one of the reference models; they are: "
                        f"{', '.join(m.name.split('/')[-1] for m in _MODELS)}.")
    return found


def short_name(name: str) -> str:
    return name.split("/")[-1]


def reference_config(name: str):
    """A transformers config object built from the published numbers (no download)."""
    from transformers import AutoConfig

    fields = dict(reference_model(name).config)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


@functools.lru_cache(maxsize=None)
def reference_shape(name: str) -> ModelShape:
    """The model's shape, counted on the meta device from its published numbers (cached per process)."""
    return shape_from_config(reference_config(reference_model(name).name))


def write_config_json(name: str, folder: str | Path) -> Path:
    """Write a config.json with the published numbers into `folder` (made if missing); returns its path."""
    entry = reference_model(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(reference_config(entry.name).to_dict(), indent=2, default=str), encoding="utf-8")
    return path
