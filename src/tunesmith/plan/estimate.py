"""Will this run fit, and how long will it take?  (Being written; the interface below is what callers use.)"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.config import Config


@dataclass
class Estimate:
    fits: bool = True
    peak_bytes: int = 0
    available_bytes: int | None = None
    time_s: float | None = None
    parts: dict[str, int] = field(default_factory=dict)
    advice: list[str] = field(default_factory=list)

    def sentence(self) -> str:
        return "fits"

    def to_json(self) -> dict:
        return {"fits": self.fits, "peak_bytes": self.peak_bytes}


def estimate(cfg: Config, memory_limit: int | None = None, probe: bool = False, nproc: int = 1) -> Estimate:
    """The run's memory and time on this machine (or with `memory_limit` bytes, as if it had only that)."""
    return Estimate(available_bytes=memory_limit)
