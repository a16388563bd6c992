"""`distributed.strategy: ddp`: data parallel, the whole model in every process, the gradients summed.

How a step is shared.  The optimiser step's window of micro-batches (`gradient_accumulation` x world size of
them, `training.batch_size` rows each) is built from the same seeded order on every process, and process r
runs micro-batches r, r + W, r + 2W, ... of it.  Every process counts the trained tokens of the whole window,
so each divides its summed NLL by the same global count; after its backward passes one all-reduce sums the
gradients of all processes, and every process takes the same optimiser step from the same gradients.  The
sum over processes is then exactly the gradient one process computes when it runs the whole window itself,
which is why W processes with accumulation A match one process with accumulation A x W.

Why not torch's `DistributedDataParallel`, whose arithmetic this is: its wrapper would not give these
numbers here.  It reduces only what its own forward saw, and the loss in train/loss.py runs the backbone and
the output projection separately (it never builds the full logits), which goes around that forward.  It
needs every process to run a backward in every step, and here they do not: with packing a micro-batch
becomes as many passes as its rows need, and a short window at an epoch's end leaves some processes with no
micro-batch at all, which would leave the others waiting in DDP's all-reduce.  And it averages the gradients
over the processes, where the loop wants their sum (each token weighted once by the step's global token
count); the mean times W does not round back to the sum for every W.  So the gradients are summed here, after
the step's last backward, in buckets of at most `BUCKET_ELEMENTS`, and the step's summed NLL and the stop flag
travel beside them.
"""

from __future__ import annotations

import torch

from tunesmith.train import distributed
from tunesmith.train.distributed import World
from tunesmith.train.parallel.base import Parallel

BUCKET_ELEMENTS = 1 << 24  # 64 MB of fp32 per all-reduce: large enough to amortise a call, small enough to copy


class DataParallel(Parallel):
    """Each process runs its share of the step's micro-batches; the loop sums the gradients (see above)."""

    name = "ddp"

    def reduce(self, step_nll: float, stop: bool) -> tuple[float, bool]:
        return sum_gradients(self.params, self.world, step_nll, stop)


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive gradients of one dtype and device, at most BUCKET_ELEMENTS together (or one larger one)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        last = buckets[-1] if buckets else None
        if last is None or size + g.numel() > BUCKET_ELEMENTS or (g.dtype, g.device) != (last[0].dtype, last[0].device):
            buckets.append([g])
            size = g.numel()
        else:
            last.append(g)
            size += g.numel()
    return buckets


def sum_gradients(params: list[torch.nn.Parameter], world: World, step_nll: float, stop: bool) -> tuple[float, bool]:
    """Sum each parameter's gradient over the processes, in place; returns (the step's NLL summed over the
    processes, whether any process was asked to stop)."""
    import torch.distributed as dist

    for bucket in _buckets([p.grad for p in params]):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        distributed.collective("summing gradients", lambda flat=flat: dist.all_reduce(flat))
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    # The two numbers travel on their own, in float64 (a bf16 bucket would round the loss), on the device the
    # backend wants (NCCL takes CUDA tensors only).
    return distributed.sum_scalars(world, step_nll, stop, params[0].device if params else torch.device("cpu"))
