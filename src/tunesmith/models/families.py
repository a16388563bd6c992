"""What each model family's adapters attach to by default (`lora.target_modules: auto`).

Keyed by the model config's `model_type`.  The names are the short module names PEFT matches
against the end of each module's dotted path: every projection of the attention and of the MLP,
never the embeddings or the output layer.  A family not listed here gets every linear layer
(`all-linear`), which for the decoder families below is the same set.

Layer types differ by family: GPT-2's projections are `Conv1D` (a linear layer with its weight
stored transposed; PEFT handles it with `fan_in_fan_out`), Phi-3 fuses q/k/v into `qkv_proj` and
gate/up into `gate_up_proj`, T5 v1.0 has one feed-forward input `wi` where v1.1 and Flan-T5 have
`wi_0` and `wi_1` (only the names the model really has are used).
"""

from __future__ import annotations

_LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

FAMILY_TARGET_MODULES: dict[str, list[str]] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "gemma2": _LLAMA_STYLE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    "bert": ["query", "key", "value", "dense"],
}


def family_target_modules(model_type: str | None) -> list[str] | None:
    """The family's default adapter targets, or None for a family tunesmith has no list for."""
    if model_type is None:
        return None
    names = FAMILY_TARGET_MODULES.get(model_type)
    return list(names) if names is not None else None
