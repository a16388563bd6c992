"""Keeping bitsandbytes out of a process that has no quantised layer."""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def without_bitsandbytes():
    """Inside, peft neither imports bitsandbytes nor looks for its layers, unless bitsandbytes is loaded already.

    peft imports bitsandbytes when peft is imported (`peft.helpers`) and again when it wraps a model
    in LoRA layers (to check for 8/4-bit layers), and importing bitsandbytes pulls in sympy, networkx
    and torch's custom-op machinery: about 115 MiB of resident memory and 2 s on a CPU, for a model
    with no quantised layer (bench/RESULTS.md, "Training throughput and memory", "Where the memory goes").  A quantised model had bitsandbytes imported
    while it was loaded, so with one nothing is hidden.  Outside, `import bitsandbytes` works as before
    (the 8-bit optimisers import it), and peft's cached "is bitsandbytes installed" answers are cleared
    on the way in and out so that they are asked again.
    """
    if "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError; importlib's find_spec says None
    _forget_peft_bnb_answers()
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
        _forget_peft_bnb_answers()


def _forget_peft_bnb_answers() -> None:
    utils = sys.modules.get("peft.import_utils")
    for name in ("is_bnb_available", "is_bnb_4bit_available"):
        cached = getattr(utils, name, None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
