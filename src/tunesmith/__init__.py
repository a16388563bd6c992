"""tunesmith: fine-tune, distil, evaluate and ship language models on the hardware you have."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# DeepSpeed, where installed (the `deepspeed` extra), is imported by accelerate whenever a model is saved, and
# then warns that it fell back to the CPU.  On a Linux machine with no NVIDIA or AMD GPU driver, say so first.
if (_sys.platform == "linux" and "DS_ACCELERATOR" not in _os.environ
        and not any(_os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/kfd"))):
    _os.environ["DS_ACCELERATOR"] = "cpu"

# transformers (5.x) "kernelizes" every model it loads by default: where the `kernels` package is installed it
# swaps layers for kernels it downloads from the Hugging Face hub at load time (code from the network, chosen by
# the hub), and where it is not, loading a model on a GPU fails with "Kernels are not available" (seen on an H200,
# bench/RESULTS.md, "GPU check").  tunesmith fetches nothing at run time and runs no remote code unless asked:
# hub kernels are off unless the user sets USE_HUB_KERNELS=1 (transformers' own switch) themselves.
_os.environ.setdefault("USE_HUB_KERNELS", "0")

# bitsandbytes (0.50) on an AVX512-BF16 CPU logs, at import, that it could not load an optional 4-bit prompt kernel
# from the `kernels` package, which fetches its kernels from the Hugging Face hub at run time; tunesmith fetches
# nothing at run time, so the advice to install it is not one a user should act on.  Its own kernels run instead.
import logging as _logging  # noqa: E402

_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

from tunesmith import logs as _logs  # noqa: E402

_logs.install()
