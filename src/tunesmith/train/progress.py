"""Where a training run stands: its position in the data, its running totals and its validation record.

All of it goes into every checkpoint (as `progress` in `state.json`, through `to_dict`/`from_dict`), so a
resumed run continues at the same micro-batch with the same totals and the same early-stopping record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

OPTIONAL_KEYS = ("window", "grad_scaler")  # left out of the JSON while unset, as the loop always did


@dataclass
class Progress:
    step: int = 0  # optimiser steps taken
    epoch: int = 0  # the epoch being trained
    window_start: int = 0  # the next step's first micro-batch in the epoch's order
    first_loss: float | None = None
    final_loss: float | None = None
    trained_tokens: int = 0  # tokens the loss counted (unmasked), over all steps
    all_tokens: int = 0  # every token the passes ran, masked ones included
    train_time: float = 0.0  # seconds spent in optimiser steps
    val_records: list[dict] = field(default_factory=list)  # every validation, as written to metrics.jsonl
    best_val: float | None = None
    best_step: int | None = None
    bad_validations: int = 0  # validations since the best one
    stopped_early: bool = False
    base_eval: dict = field(default_factory=dict)  # the base model's scores, computed once before training
    window: int | None = None  # micro-batches per optimiser step over all processes, kept on resume
    grad_scaler: dict | None = None  # fp16 loss scaling's state (torch.amp.GradScaler), when it is used

    def to_dict(self) -> dict:
        """The JSON-able form checkpoints store (the keys the loop has always written)."""
        return {k: v for k, v in asdict(self).items() if not (k in OPTIONAL_KEYS and v is None)}

    @classmethod
    def from_dict(cls, saved: dict) -> Progress:
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def add_validation(self, record: dict, threshold: float, patience: int | None) -> bool:
        """Append a validation record and update the best one; True when early stopping says stop (after
        `patience` validations in a row that did not beat the best by more than `threshold`)."""
        self.val_records.append(record)
        loss = record["val_loss"]
        if self.best_val is None or loss < self.best_val - threshold:
            self.best_val, self.best_step, self.bad_validations = loss, self.step, 0
            return False
        self.bad_validations += 1
        if patience is not None and self.bad_validations >= patience:
            self.stopped_early = True
            return True
        return False

    def train_stats(self, per_epoch: int) -> dict:
        """The `train` section of summary.json."""
        return {
            "first_loss": self.first_loss,
            "final_loss": self.final_loss,
            "steps": self.step,
            "epochs": round(self.step / per_epoch, 4),
            "trained_tokens": self.trained_tokens,
            "trained_tokens_per_s": self.trained_tokens / self.train_time if self.train_time else 0.0,
            "all_tokens_per_s": self.all_tokens / self.train_time if self.train_time else 0.0,
            "wall_s": self.train_time,
            "stopped_early": self.stopped_early,
        }
