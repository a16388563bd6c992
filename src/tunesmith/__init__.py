"""tunesmith: fine-tune, distil, evaluate and ship language models on the hardware you have."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# DeepSpeed, where installed (the `deepspeed` extra), is imported by accelerate whenever a model is saved, and
# then warns that it fell back to the CPU.  On a Linux machine with no NVIDIA or AMD GPU driver, say so first.
if (_sys.platform == "linux" and "DS_ACCELERATOR" not in _os.environ
        and not any(_os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/kfd"))):
    _os.environ["DS_ACCELERATOR"] = "cpu"

# bitsandbytes (0.50) on an AVX512-BF16 CPU logs, at import, that it could not load an optional 4-bit prompt kernel
# from the `kernels` package, which fetches its kernels from the Hugging Face hub at run time; tunesmith fetches
# nothing at run time, so the advice to install it is not one a user should act on.  Its own kernels run instead.
import logging as _logging  # noqa: E402

_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

from tunesmith import logs as _logs  # noqa: E402

_logs.install()
