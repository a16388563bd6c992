"""`distributed.strategy: fsdp`: PyTorch's FSDP2, weights, gradients and optimiser state sharded over the processes.

FSDP2's `fully_shard` keeps each parameter as a DTensor holding 1/N of its rows and gathers a layer's rows only
while that layer runs (its forward hooks), reduce-scattering the gradients in the backward pass.  The loss here
does not call the model's own forward (train/loss.py reaches the decoder and the output projection directly),
so the model is sharded under a small root module, `Forward`, whose forward runs one of the loop's functions on
the model: FSDP's hooks then gather and release the root's own weights (embeddings, final norm, output
projection) around exactly the loss, and reduce their gradients, as they do around a forward.  Every process
runs the same number of such calls per step (each gathers weights with the others: `Sharded.passes` pads a short
share with zero-weight passes).  Saving gathers the full tensors (every process takes part; process 0 writes).
"""

from __future__ import annotations

import torch

from tunesmith.errors import UserError
from tunesmith.hardware import release_free_memory
from tunesmith.models.parts import decoder_and_head
from tunesmith.train.distributed import World
from tunesmith.train.parallel.base import Forward, Sharded


class FullyShardedParallel(Sharded):
    name = "fsdp"

    def sharding_words(self) -> str:
        return "; weights, gradients and optimiser state sharded over the processes (FSDP)"

    def place(self, model, window: int) -> None:
        super().place(model, window)
        self.root = shard(model, self.world, self.device)  # before the optimiser: it keeps the shards
        release_free_memory()  # the whole weights the shards were cut from

    def sync_gradients(self, last: bool) -> None:
        self.root.set_requires_gradient_sync(last)  # reduce-scatter once, after the step's last pass

    def forward(self, fn, *args):
        return self.root(fn, *args)

    def release(self) -> None:
        super().release()
        self.root = None


def shard(model: torch.nn.Module, world: World, device: torch.device) -> Forward:
    """Shard `model` in place over the processes: each decoder layer a unit, the rest one root unit (under the
    `Forward` returned, which the loop's losses run through)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    decoder, _ = decoder_and_head(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError("distributed.strategy: fsdp shards a causal LM layer by layer, and tunesmith cannot find "
                        "this model's decoder layers; use distributed.strategy: ddp.")
    mesh = init_device_mesh(device.type, (world.size,))
    # bitsandbytes' 4-bit weights (QLoRA) carry their quantisation state beside the packed bytes, which FSDP2
    # cannot cut into shards: they stay whole in every process, and everything else is sharded.
    whole = {p for p in model.parameters() if getattr(p, "quant_state", None) is not None} or None
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=whole)
    root = Forward(model)
    fully_shard(root, mesh=mesh, ignored_params=whole)
    return root
