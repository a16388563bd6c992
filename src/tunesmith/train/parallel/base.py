"""`Parallel`: what the training loop asks of the way its processes share a step.

The loop (train/loop.py) runs the same algorithm in every mode; an object of one of these classes answers
the questions whose answer depends on the mode.  The methods here are the interface; their bodies are what
the modes that keep the whole model in every process (one process, DDP) do, and a mode overrides what it
does differently.  `Sharded` adds what FSDP and DeepSpeed ZeRO have in common.

    setup      refuse_unsupported, place (before the optimiser), wrap (model, optimiser, schedule, checkpoint)
    each pass  passes (which ones this process runs), sync_gradients, forward, backward
    each step  reduce (the step's loss and stop flag over the processes), step (clip + optimiser), zero_grad,
               stop_now
    around     shared, heldout, save_checkpoint, gather_trainables, release, unwrap, lost_peers
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from tunesmith.config import Config
from tunesmith.train import checkpoint, distributed
from tunesmith.train.distributed import World
from tunesmith.train.optim import allocate_early
from tunesmith.train.progress import Progress

log = logging.getLogger(__name__)

# One pass of a step: (a padded batch or a packed Pass, its row layout for dropout_rows, its weight in the sum).
PassRun = tuple[object, object, float]


class Forward(torch.nn.Module):
    """What FSDP and DeepSpeed wrap: calling it runs `fn(model, *args)` as its forward.

    The loop's losses do not go through the model's own forward (train/loss.py runs the backbone and the output
    projection separately), so the sharding engines get this small module as their root instead: their forward
    hooks (gather the weights, and the gradients' reduction behind the backward) then surround exactly the loss.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args):
        return fn(self.model, *args)


class Parallel:
    """One process's part in a training run of `world.size` processes."""

    name = "one process"

    def __init__(self, cfg: Config, world: World, accelerator, half: torch.dtype | None):
        t = cfg.training
        self.cfg = cfg
        self.world = world
        self.accelerator = accelerator  # accelerate's: device placement, backward; one process also prepares
        self.device: torch.device = accelerator.device
        self.half = half  # the autocast type, or None
        self.max_norm = t.max_grad_norm if t.max_grad_norm is not None else float("inf")
        self.loss_scale = 1  # what each pass's loss is multiplied by before backward (see Sharded)
        self.model: torch.nn.Module | None = None  # as wrapped, once `wrap` ran
        self.params: list[torch.nn.Parameter] = []  # the trained parameters
        self.scaler: torch.amp.GradScaler | None = None

    # --- setup

    def refuse_unsupported(self, task: str, distilling: bool) -> None:
        """Raise a UserError, before anything loads, when this mode cannot train this run."""

    def place(self, model: torch.nn.Module, window: int) -> None:
        """Before the optimiser is made: say how the processes share a step (`window` micro-batches in all),
        and start every process from the same trained weights and random-number state."""
        t = self.cfg.training
        log.info(f"{self.world.size} processes, data parallel: global batch = micro-batch {t.batch_size} x "
                 f"accumulation {window / self.world.size:g} x {self.world.size} processes = "
                 f"{t.batch_size * window} rows per optimiser step{self.sharding_words()}")
        distributed.align([p for p in model.parameters() if p.requires_grad], self.world)

    def sharding_words(self) -> str:
        return ""

    def wrap(self, model, optimizer, scheduler, restore: Callable[..., Progress]):
        """(model, optimizer, scheduler, progress) ready to train: `restore(model, optimizer, scheduler)` loads
        a checkpoint into the unwrapped objects (or starts afresh) and returns the progress."""
        progress = restore(self.unwrap(model), optimizer, scheduler)
        self._start(model, optimizer, progress)
        return model, optimizer, scheduler, progress

    def _start(self, model, optimizer, progress: Progress) -> None:
        """The trained parameters, fp16 loss scaling where it is needed, and the optimiser's state allocated."""
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fp16 has too few exponent bits for small gradients: scale the loss up, and the gradients back down before
        # clipping (Micikevicius et al., "Mixed Precision Training", 2018).  It needs fp32 trained weights.
        use_scaler = self.half is torch.float16 and all(p.dtype == torch.float32 for p in self.params)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        if use_scaler and progress.grad_scaler:
            self.scaler.load_state_dict(progress.grad_scaler)
        allocate_early(self.params, optimizer)

    # --- each pass

    def passes(self, units: list[tuple[int, tuple]]) -> list[PassRun]:
        """The step's passes this process runs, from `units` ([(owning process, (unit, layout))] for the
        whole step): its own, each with weight 1."""
        return [(unit, layout, 1.0) for owner, (unit, layout) in units if owner == self.world.rank]

    def sync_gradients(self, last: bool) -> None:
        """Before each pass: whether it is the step's last (the modes that reduce in backward do it then)."""

    def forward(self, fn: Callable, *args):
        """`fn(model, *args)`, where this mode's hooks gather the weights it needs."""
        return fn(self.model, *args)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(self.scaler.scale(loss))

    # --- each step

    def reduce(self, step_nll: float, stop: bool) -> tuple[float, bool]:
        """(the step's summed NLL over all processes, whether any was asked to stop); the gradients are summed
        over the processes too where the mode leaves that to the loop."""
        return step_nll, stop

    def stop_now(self, agreed: bool, signal: str | None) -> bool:
        """Whether to stop after this step: what the processes agreed in `reduce` (all stop at the same step, or
        the others would wait for the stopped one); one process alone goes by `signal`, the request as it is now."""
        return agreed

    def step(self, optimizer) -> float:
        """Unscale (fp16), clip to training.max_grad_norm, step the optimiser; returns the gradient norm."""
        self.scaler.unscale_(optimizer)
        norm = distributed.full(torch.nn.utils.clip_grad_norm_(self.params, self.max_norm))
        self.scaler.step(optimizer)  # a plain optimizer.step() when the scaler is off
        self.scaler.update()
        return float(norm)

    def zero_grad(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=False)  # the gradient buffers stay where allocate_early put them

    def scaler_state(self) -> dict | None:
        """fp16 loss scaling's state for the checkpoint (None when it is off)."""
        return self.scaler.state_dict() if self.scaler is not None and self.scaler.is_enabled() else None

    # --- around the loop

    def shared(self, value, what: str):
        """Process 0's `value`, on every process; `what` names the moment for the error if a peer is gone."""
        return distributed.broadcast_object(value, self.world, what)

    def heldout(self, fn: Callable):
        """`fn(model)` (the validation loss), computed by the first process and shared with the others."""
        return self.shared(fn(self.model) if self.world.main else None, "sharing the validation loss")

    def save_checkpoint(self, run_dir: Path, model, optimizer, scheduler, progress: dict) -> Path | None:
        """Write a checkpoint (the first process; the others hold the same weights); returns its folder."""
        if not self.world.main:
            return None
        return checkpoint.save_checkpoint(run_dir, self.unwrap(model), optimizer, scheduler, progress)

    def gather_trainables(self, model) -> dict[str, torch.Tensor] | None:
        """The trained weights, whole, when the model is sharded (every process takes part); None when each
        process holds the whole model already."""
        return None

    def release(self) -> None:
        """Drop what this mode holds of the model and optimiser (a sharded run's, before the reload)."""
        self.model = None
        self.params = []

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def lost_peers(self, exc: BaseException) -> bool:
        """Whether `exc` is a collective failing because another process went away."""
        return distributed.lost_peers(exc)


class Sharded(Parallel):
    """What FSDP and DeepSpeed ZeRO share: every process gathers weights with the others in each pass, so all
    run as many passes as the busiest; they reduce the gradients in the backward pass, as a mean."""

    def __init__(self, cfg: Config, world: World, accelerator, half: torch.dtype | None):
        super().__init__(cfg, world, accelerator, half)
        self.loss_scale = world.size  # their reduction is the mean of the processes' gradients; the loop wants the sum

    def refuse_unsupported(self, task: str, distilling: bool) -> None:
        distributed.refuse_unshardable(self.cfg, task, distilling)

    def passes(self, units):
        runs = super().passes(units)
        busiest = max(sum(owner == r for owner, _ in units) for r in range(self.world.size))
        return runs + [(*units[0][1], 0.0)] * (busiest - len(runs))  # zero-weight passes: gather, add nothing

    def reduce(self, step_nll: float, stop: bool) -> tuple[float, bool]:
        return distributed.sum_scalars(self.world, step_nll, stop, self.device)  # gradients: done in backward

    def heldout(self, fn: Callable):
        return self.shared(self.forward(fn), "sharing the validation loss")  # every process runs each pass

    def save_checkpoint(self, run_dir, model, optimizer, scheduler, progress):
        """Every process takes part in gathering the whole tensors; the first writes them."""
        return checkpoint.save_checkpoint(run_dir, self.unwrap(model), optimizer, scheduler, progress,
                                          write=self.world.main)

    def gather_trainables(self, model):
        return distributed.whole_trainables(model)
