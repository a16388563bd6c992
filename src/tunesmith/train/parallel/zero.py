"""`distributed.strategy: deepspeed`: DeepSpeed's ZeRO stage 2 or 3 under the loop in train/loop.py.

What each stage shards over the N processes (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", 2020): stage 2 the optimiser state and the gradients of the trained parameters,
stage 3 those and every weight of the model, gathered layer by layer when it runs.

How it fits the loop.  The loop's losses do not go through the model's forward (train/loss.py runs the
backbone and the output projection separately), so DeepSpeed is handed `Forward` (train/parallel/base.py), a
small module whose forward runs one of the loop's functions on the model: the engine's forward hooks then
surround exactly the loss.  Under stage 3 the decoder layers are DeepSpeed "leaf" modules, gathered whole when
they run, as FSDP does (the fast LoRA/norm paths read weights inside a layer without calling each submodule),
and the output projection's weight is registered with `Forward`, so it is gathered for the loss and its
backward too.

The loop keeps its own learning-rate schedule (on the torch optimiser DeepSpeed steps), its own token-
weighted loss and the step's boundary: each pass says whether it is the step's last, and `engine.step()`
then clips (training.max_grad_norm) and steps.  Checkpoints hold whole tensors in tunesmith's own format
(safetensors), not DeepSpeed's (which pickles), so a ZeRO run resumes on any number of processes, with any
strategy, or on one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.errors import UserError
from tunesmith.models.parts import decoder_and_head
from tunesmith.train import checkpoint, distributed
from tunesmith.train.parallel.base import Forward, Sharded

STATE_KEYS = ("exp_avg", "exp_avg_sq")  # torch AdamW's per-element state; "step" is one number per group


@dataclass
class ZeroOptimizer:
    """The torch optimiser's layout before DeepSpeed took it over, to write its state back in that layout."""

    engine: object  # deepspeed's DeepSpeedEngine
    order: list[torch.nn.Parameter]  # the parameters, in the optimiser's order (its state_dict's indices)
    sizes: list[int]  # parameters per group
    groups: list[dict]  # the groups (lr as the schedule sets it)


class ZeroParallel(Sharded):
    name = "deepspeed"

    def sharding_words(self) -> str:
        stage = self.cfg.distributed.zero_stage
        return (f"; DeepSpeed ZeRO stage {stage} shards the optimiser state and gradients"
                + (" and the weights" if stage == 3 else ""))

    def wrap(self, model, optimizer, scheduler, restore):
        """After the checkpoint is loaded: its whole tensors go into ZeRO's partitions."""
        progress = restore(self.unwrap(model), optimizer, scheduler)
        if self.half is torch.float16 and all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad):
            raise UserError("distributed.strategy: deepspeed does not take tunesmith's fp16 loss scaling; set "
                            "training.autocast: false, or use distributed.strategy: ddp or fsdp.")
        self.zero = wrap(model, optimizer, self.cfg, self.world)
        self.engine = self.zero.engine
        self.model = model
        return model, optimizer, scheduler, progress

    def sync_gradients(self, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)  # the step's last pass is where gradients are final

    def forward(self, fn, *args):
        return self.engine(fn, *args)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, optimizer) -> float:
        self.engine.step()  # clips to training.max_grad_norm, steps, zeroes the gradients
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def zero_grad(self, optimizer) -> None:
        """`engine.step()` did (ZeRO keeps gradients and optimiser state in its own flat buffers)."""

    def save_checkpoint(self, run_dir, model, optimizer, scheduler, progress):
        return checkpoint.save_checkpoint(run_dir, self.unwrap(model), optimizer, scheduler, progress,
                                          write=self.world.main, trainable=self.gather_trainables(model),
                                          optimizer_state=optimizer_state_dict(self.zero, optimizer))

    def gather_trainables(self, model):
        if self.engine.zero_optimization_stage() != 3:
            return distributed.whole_trainables(model)  # stage 2 keeps every weight whole
        import deepspeed

        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {name: p.detach().clone() for name, p in named}

    def release(self) -> None:
        super().release()
        self.zero = self.engine = None  # the engine holds the model and the optimiser


def wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg, world) -> ZeroOptimizer:
    """Hand `model` and `optimizer` to a DeepSpeed engine (ZeRO stage `distributed.zero_stage`).  State already
    loaded into `optimizer` (a resumed run) is carried into ZeRO's partitions."""
    deepspeed = distributed.import_deepspeed()

    stage = cfg.distributed.zero_stage
    order = [p for group in optimizer.param_groups for p in group["params"]]
    loaded = {index: optimizer.state.pop(p) for index, p in enumerate(order) if optimizer.state.get(p)}
    groups = list(optimizer.param_groups)  # the dicts the schedule sets lr in (ZeRO swaps their "params")
    sizes = [len(g["params"]) for g in groups]
    decoder, head = decoder_and_head(model)
    if stage == 3:
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or head is None:
            raise UserError("distributed.zero_stage: 3 shards a causal LM layer by layer, and tunesmith cannot find "
                            "this model's decoder layers; use distributed.zero_stage: 2.")
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [type(layers[0])])
        embeddings = decoder.get_input_embeddings()
        if not embeddings.weight.requires_grad:
            # ZeRO-3 frees a layer's weights once the gradient of its input is computed; when that input needs no
            # gradient (frozen embeddings, as under LoRA) it frees them too early, before the first layer's LoRA
            # weights have their gradients.  An input that asks for a gradient puts the release where it belongs.
            embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    dtype = next((p.dtype for p in order), torch.float32)
    t = cfg.training
    config = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,  # the loop marks each step's last pass itself
        "train_batch_size": t.batch_size * world.size,
        "gradient_clipping": float(t.max_grad_norm or 0.0),
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},  # every weight sharded
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=Forward(model), optimizer=optimizer, config=config,
                                           dist_init_required=False)
    if stage == 3:
        deepspeed.zero.register_external_parameter(engine.module, head.weight)
    if loaded:
        _put_optimizer_state(engine, optimizer, order, loaded)
    return ZeroOptimizer(engine=engine, order=order, sizes=sizes, groups=groups)


def _flat_partitions(engine) -> list[torch.Tensor]:
    """This process's flat fp32 partitions of the trained parameters, the tensors the torch optimiser steps
    (and keys its state by)."""
    zero_optimizer = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        return list(zero_optimizer.fp32_partitioned_groups_flat)
    return list(zero_optimizer.single_partition_of_fp32_groups)


def _put_optimizer_state(engine, optimizer, order, loaded: dict[int, dict]) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    # Every parameter trains at every step, so AdamW's step count is one number for all of them.
    step = next((slots["step"] for slots in loaded.values() if "step" in slots), 0)
    for flat in _flat_partitions(engine):  # what AdamW's first step would make, filled below
        state = optimizer.state[flat]
        state["step"] = step.detach().clone() if torch.is_tensor(step) else torch.tensor(float(step))
        for key in STATE_KEYS:
            state[key] = torch.zeros_like(flat)
    linker = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if linker is not None:  # stage 2 links each parameter to its slice of the partitions' state lazily
        linker()
    for index, p in enumerate(order):  # a collective under stage 3: every process, every parameter
        for key in STATE_KEYS:
            value = loaded.get(index, {}).get(key)
            if value is None:
                value = torch.zeros(_shape(p), dtype=torch.float32)
            safe_set_full_optimizer_state(p, value.to(engine.device, torch.float32), key)


def _shape(p: torch.nn.Parameter) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)  # stage 3 leaves an empty tensor in .data


def optimizer_state_dict(zero: ZeroOptimizer, optimizer: torch.optim.Optimizer) -> dict:
    """The ZeRO-managed optimiser's state as torch's `state_dict()` of the unsharded optimiser would give it:
    whole tensors, one entry per parameter.  Every process must call this together (gathers)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    flats = [optimizer.state.get(flat) for flat in _flat_partitions(zero.engine)]
    step = next((state["step"] for state in flats if state and "step" in state), None)
    state: dict[int, dict] = {}
    for index, p in enumerate(zero.order if step is not None else []):  # none before the first step
        state[index] = {"step": step.detach().clone()}
        for key in STATE_KEYS:
            state[index][key] = safe_get_full_optimizer_state(p, key).reshape(_shape(p)).cpu()
    groups, start = [], 0
    for group, size in zip(zero.groups, zero.sizes, strict=True):  # lr as the schedule left it
        groups.append({k: v for k, v in group.items() if k != "params"} | {"params": list(range(start, start + size))})
        start += size
    return {"state": state, "param_groups": groups}
