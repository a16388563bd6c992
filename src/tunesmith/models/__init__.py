"""Where models come from: built-in names, local folders, GGUF files, the Hugging Face cache and hub, run folders;
how long a sequence each takes; the adapters put on them; the task each model is; and generation."""

from tunesmith.models.builtin import BUILTIN_MODELS, builtin_path, tunesmith_home
from tunesmith.models.loader import (
    HUB_PROBE_S,
    ask_hub,
    check_max_length,
    context_length,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from tunesmith.models.quantized import without_bitsandbytes

__all__ = ["BUILTIN_MODELS", "HUB_PROBE_S", "ask_hub", "builtin_path", "check_max_length", "context_length", "load_model", "load_tokenizer",
           "resolve_model_source", "tunesmith_home", "without_bitsandbytes"]
