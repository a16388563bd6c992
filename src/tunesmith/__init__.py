"""tunesmith: fine-tune, distil, evaluate and ship language models on the hardware you have."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# DeepSpeed, where installed (the `deepspeed` extra), is imported by accelerate whenever a model is saved, and
# then warns that it fell back to the CPU.  On a Linux machine with no NVIDIA or AMD GPU driver, say so first.
if (_sys.platform == "linux" and "DS_ACCELERATOR" not in _os.environ
        and not any(_os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/kfd"))):
    _os.environ["DS_ACCELERATOR"] = "cpu"
