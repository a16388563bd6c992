"""How the training processes share a step: one small interface (`Parallel`, in base.py), one mode per module.

    single.py  one process: the whole step here (accelerate places, backpropagates and clips)
    ddp.py     several processes, the whole model in each, the gradients summed after the step's last pass
    fsdp.py    PyTorch FSDP2: weights, gradients and optimiser state sharded, gathered layer by layer
    zero.py    DeepSpeed ZeRO stage 2 or 3: optimiser state and gradients (and at 3 the weights) sharded

The loop in train/loop.py calls the same methods in every mode; `choose_parallel` picks the mode for this process.
"""

from __future__ import annotations

import torch

from tunesmith.config import Config
from tunesmith.train.distributed import World
from tunesmith.train.parallel.base import Forward, Parallel, Sharded
from tunesmith.train.parallel.ddp import DataParallel
from tunesmith.train.parallel.fsdp import FullyShardedParallel
from tunesmith.train.parallel.single import OneProcess
from tunesmith.train.parallel.zero import ZeroParallel

__all__ = ["DataParallel", "Forward", "FullyShardedParallel", "OneProcess", "Parallel", "Sharded", "ZeroParallel",
           "choose_parallel"]

MODES: dict[str, type[Parallel]] = {"ddp": DataParallel, "fsdp": FullyShardedParallel, "deepspeed": ZeroParallel}


def choose_parallel(cfg: Config, world: World, accelerator, half: torch.dtype | None) -> Parallel:
    """This process's mode: one process alone, or `distributed.strategy` among several."""
    mode = OneProcess if world.size == 1 else MODES[cfg.distributed.strategy]
    return mode(cfg, world, accelerator, half)
