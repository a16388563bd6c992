"""One process: the whole step here, through accelerate (device placement, backward, gradient clipping)."""

from __future__ import annotations

from tunesmith.train.parallel.base import Parallel


class OneProcess(Parallel):
    """The whole step in this process; nothing to share, nothing to reduce."""

    name = "one process"

    def place(self, model, window: int) -> None:
        """Nothing to say or share with one process."""

    def wrap(self, model, optimizer, scheduler, restore):
        # Only here: with several processes accelerate would wrap the model in DDP (train/parallel/ddp.py says
        # why not) and step the schedule once per process.
        model, optimizer, scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        return super().wrap(model, optimizer, scheduler, restore)

    def step(self, optimizer) -> float:
        self.scaler.unscale_(optimizer)
        norm = self.accelerator.clip_grad_norm_(self.params, self.max_norm)
        self.scaler.step(optimizer)  # a plain optimizer.step() when the scaler is off
        self.scaler.update()
        return float(norm)

    def stop_now(self, agreed: bool, signal: str | None) -> bool:
        return bool(signal)  # also a signal that came during this step's optimiser step

    def lost_peers(self, exc: BaseException) -> bool:
        return False  # no peers to lose
