"""What to try next, read from a run's own curves: a short list of config changes, each with the command to run.

`advise(records, cfg, run_dir)` takes metrics.jsonl's records (train steps and validations) and the run's config,
and returns items `{rule, why, set: {dotted key: value}, command}`; summary.json keeps them as `advice`, report.md
prints them under "What to try next" and the studio's run page shows them.  Each rule is a plain function of the
curves (`Curves`, worked out once) and the config that returns its items (none when its pattern is absent):

    too_few_steps    fewer than MIN_STEPS steps: nothing below can be read from so few points; train longer
    loss_diverged    a NaN/infinite loss, or the smoothed loss jumped well above its lowest point: lower the
                     learning rate, warm up longer
    grad_spikes      gradient norms above SPIKE x their median: a lower learning rate, and clipping near the
                     usual norm
    overfitting      validation loss rising from its best while training loss falls: stop sooner, keep the best
                     weights, regularise
    still_falling    training loss still falling fast over the last quarter: train longer
    plateau_lr_high  the loss learned, then went flat while the learning rate stayed high: a lower peak, decayed
    underfitting     the loss went flat having barely fallen, with no spikes: a higher learning rate (full
                     fine-tuning, or LoRA below its usual rates), else more adapter rank and no dropout (LoRA)

The thresholds are constants below, each with where it comes from; where no source gives a number, it is ours and
says so.  The values proposed are rounded to three significant digits, so the `--set` line reads back as the
value in `set`.
"""

from __future__ import annotations

import itertools
import math
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.config import Config, set_line

# Ours: under 20 optimiser steps the last quarter of the run is at most 5 points, too few to tell a trend from
# batch-to-batch noise.  TARGET_STEPS is what too_few_steps proposes instead: enough for a warmup and a readable
# curve on a small data set, still minutes on a CPU for a small model.
MIN_STEPS = 20
TARGET_STEPS = 100
# Ours: the fitted fall of the training loss over the last quarter of the steps, as a share of its level there.
# Above STILL_FALLING the run ended while learning fast; below FLAT it had stopped (a curve that decays to its floor
# by mid-run falls ~1-2% there; one still on its way falls 10% or more).
STILL_FALLING = 0.05
FLAT = 0.02
# Ours: the loss "learned" when its last tenth is at least 10% below its first tenth (health_check's windows).
LEARNED = 0.9
# Ours: the learning rate is "still high" when the last step's is at least half the peak (a cosine or linear
# schedule is below that for the last third of the run; a constant one never is).
LR_HIGH = 0.5
# Prechelt, "Early Stopping - But When?" (1998): the generalisation loss GL = val / best val - 1; GL above 5% (his
# GL_5 criterion) says the run is past its best.  Three validations at least, to have a best before the last.
GL_ALPHA = 0.05
MIN_VALIDATIONS = 3
# health_check's (report.py): a gradient norm above 10x the median is a spike.  The clipping threshold proposed is
# CLIP_OVER_MEDIAN x the median norm, which leaves ordinary steps alone and caps the spikes; clipping at a level
# taken from the run's own norm history is AutoClip's idea (Seetharaman et al., 2020).
SPIKE = 10.0
CLIP_OVER_MEDIAN = 3.0
# Ours: the smoothed training loss ending above its lowest point by more than a quarter of its starting level
# (and staying there since it passed that bar) is a divergence, not noise (smoothing: the mean of the last SMOOTH_SHARE of the steps, at least 3).
JUMP = 0.25
SMOOTH_SHARE = 0.05

LORA_METHODS = ("lora", "qlora", "dora", "rslora", "adalora")
# LoRA's usual peak learning rates: 2e-4 (LoRA, Hu et al. 2021, GPT-3 runs; QLoRA, Dettmers et al. 2023, appendix B,
# for models up to 13B) and 1e-4 (QLoRA, larger models).  Below LORA_LR_LOW a LoRA run that barely learned wants a
# higher learning rate before it wants a higher rank.
LORA_LR_LOW = 1e-4


@dataclass
class Curves:
    """What the rules read, from metrics.jsonl's records."""

    steps: list[int]
    losses: list[float]
    lrs: list[float]
    grad_norms: list[float | None]  # None: not finite (or not logged)
    tokens: int  # trained tokens, all steps
    epoch_end: float  # the last step's epoch (fractional)
    validations: list[dict] = field(default_factory=list)  # {"step", "val_loss", ...}

    @property
    def n(self) -> int:
        return len(self.losses)

    def level(self, which: str) -> float:
        """The mean loss of the first or last tenth of the steps (at least one)."""
        k = max(1, self.n // 10)
        part = self.losses[:k] if which == "start" else self.losses[-k:]
        return sum(part) / len(part)

    def recent_fall(self) -> float:
        """The least-squares line's fall across the last quarter of the steps, as a share of the mean loss there
        (positive: falling)."""
        q = max(5, self.n // 4)
        xs, ys = list(range(q)), self.losses[-q:]
        slope = statistics.linear_regression(xs, ys).slope
        level = sum(ys) / q
        return -slope * (q - 1) / level if level > 0 else 0.0

    def smoothed(self) -> list[float]:
        w = max(3, round(self.n * SMOOTH_SHARE))
        return [sum(self.losses[max(0, i - w + 1):i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(self.n)]

    def steps_per_epoch(self) -> float | None:
        return self.n / self.epoch_end if self.epoch_end > 0 else None


def read_curves(records: list[dict]) -> Curves:
    train = [r for r in records if r.get("type") == "train"]
    return Curves(
        steps=[r["step"] for r in train],
        losses=[float(r["loss"]) if r.get("loss") is not None else math.nan for r in train],
        lrs=[float(r.get("lr") or 0.0) for r in train],
        grad_norms=[r.get("grad_norm") for r in train],
        tokens=sum(int(r.get("trained_tokens") or 0) for r in train),
        epoch_end=float(train[-1].get("epoch") or 0.0) if train else 0.0,
        validations=[r for r in records if r.get("type") == "validation" and r.get("val_loss") is not None],
    )


def _round(value: float) -> float:
    return float(f"{value:.3g}")


def _item(rule: str, why: str, settings: dict) -> dict:
    return {"rule": rule, "why": why, "set": settings}


def _limited_by_max_steps(curves: Curves, cfg: Config) -> bool:
    return cfg.training.max_steps is not None and curves.n >= cfg.training.max_steps


def _longer(curves: Curves, cfg: Config, steps: int) -> dict:
    """Settings that make the run about `steps` optimiser steps long: max_steps when it was what ended the run
    (with epochs raised too where training.epochs would stop the run first), else epochs (the run's own steps per
    epoch)."""
    per_epoch = curves.steps_per_epoch()
    if _limited_by_max_steps(curves, cfg):
        settings: dict = {"training.max_steps": steps}
        if per_epoch and steps > per_epoch * cfg.training.epochs + 0.5:  # the quickstart: 40 of 72 steps an epoch
            settings["training.epochs"] = math.ceil(steps / per_epoch)
        return settings
    epochs = math.ceil(steps / per_epoch) if per_epoch else cfg.training.epochs * 2
    return {"training.epochs": max(epochs, math.floor(cfg.training.epochs) + 1)}


def _finite(curves: Curves) -> bool:
    return all(math.isfinite(x) for x in curves.losses)


def _jump(curves: Curves) -> tuple[float, int] | None:
    """(how far the smoothed loss ends above its lowest point, the step from which it stayed more than JUMP x the
    starting level above it) when it ends so, else None.  A rise the loss comes back down from is a spike (a hard
    batch of a mixed data set, say: grad_spikes' business), not a divergence."""
    smooth = curves.smoothed()
    if smooth[0] <= 0:
        return None  # no level to measure a jump against
    bar = JUMP * smooth[0]
    lowest = list(itertools.accumulate(smooth, min))  # the lowest point up to each step
    if smooth[-1] - lowest[-1] <= bar:
        return None
    at = len(smooth) - 1
    while at > 0 and smooth[at - 1] - lowest[at - 1] > bar:
        at -= 1
    return smooth[-1] - lowest[-1], curves.steps[at]


def _generalisation_loss(curves: Curves) -> tuple[float, dict] | None:
    """(GL, the best validation) when validation loss rose more than GL_ALPHA above its best while the training
    loss kept falling after that best; else None."""
    vals = curves.validations
    if len(vals) < MIN_VALIDATIONS:
        return None
    best = min(vals, key=lambda r: r["val_loss"])
    gl = vals[-1]["val_loss"] / best["val_loss"] - 1 if best["val_loss"] > 0 else 0.0
    if best is vals[-1] or gl <= GL_ALPHA:
        return None
    after = [loss for step, loss in zip(curves.steps, curves.losses) if step > best["step"]]
    before = [loss for step, loss in zip(curves.steps, curves.losses) if step <= best["step"]]
    k = max(1, len(after) // 4)
    if not after or not before or sum(after[-k:]) / k >= sum(before[-k:]) / min(k, len(before)):
        return None  # the training loss did not fall either: not overfitting
    return gl, best


# --- the rules: each (curves, config) -> its items


def too_few_steps(curves: Curves, cfg: Config) -> list[dict]:
    if curves.n >= MIN_STEPS:
        return []
    return [_item("too_few_steps",
                  f"only {curves.n} optimiser step(s) ({curves.tokens:,} trained tokens): too few to tell a trend "
                  f"from noise (the other rules need {MIN_STEPS}); train for about {TARGET_STEPS} steps.",
                  _longer(curves, cfg, TARGET_STEPS))]


def loss_diverged(curves: Curves, cfg: Config) -> list[dict]:
    t = cfg.training
    if curves.n == 0:
        return []
    if _finite(curves):
        jump = _jump(curves)
        if jump is None:
            return []
        rise, step = jump
        what = (f"the training loss jumped up at step {step} and stayed up, ending {rise:.3g} above its lowest "
                "point (smoothed over a few steps)")
    else:
        what = "the loss became NaN or infinite"
    settings = {"training.learning_rate": _round(t.learning_rate * 0.5)}
    if t.warmup_steps:
        settings["training.warmup_steps"] = t.warmup_steps * 2
    elif t.warmup_ratio < 0.1:
        settings["training.warmup_ratio"] = 0.1
    # Loss spikes of large runs are met with a lower learning rate (PaLM, Chowdhery et al. 2022, sec. 5.1);
    # a gradual warmup is what keeps the first large steps stable (Goyal et al. 2017, "Accurate, Large Minibatch SGD")
    return [_item("loss_diverged",
                  f"{what}: the learning rate ({t.learning_rate:g}) is too high for this run, or it arrives too soon; "
                  "halve it and warm up over the first tenth of the steps.", settings)]


def grad_spikes(curves: Curves, cfg: Config) -> list[dict]:
    norms = [x for x in curves.grad_norms if x is not None and math.isfinite(x)]
    if len(norms) < 5:
        return []
    median = statistics.median(norms)
    # a norm that was not finite (logged as None) is left out, as health_check does: with fp16 loss scaling an
    # overflowing step is skipped and the scale lowered, which is the scaler working, not a spike
    spikes = sum(1 for x in norms if median > 0 and x > SPIKE * median)
    if not spikes:
        return []
    t = cfg.training
    clip = _round(CLIP_OVER_MEDIAN * median)
    settings = {"training.learning_rate": _round(t.learning_rate * 0.7)}
    if t.max_grad_norm is None or clip < t.max_grad_norm:
        settings["training.max_grad_norm"] = clip
        how = (f"lower the learning rate by 30% and clip gradients at {clip:g} ({CLIP_OVER_MEDIAN:g}x the median), "
               "which leaves ordinary steps alone")
    else:  # clipping already bites below that
        how = f"clipping is already at {t.max_grad_norm:g}; lower the learning rate by 30%"
    return [_item("grad_spikes",
                  f"the gradient norm spiked {spikes} time(s) above {SPIKE:g}x its median ({median:.3g}): {how}.",
                  settings)]


def overfitting(curves: Curves, cfg: Config) -> list[dict]:
    found = _generalisation_loss(curves)
    if found is None:
        return []
    gl, best = found
    t, last = cfg.training, curves.validations[-1]
    sooner = ({"training.max_steps": best["step"]} if _limited_by_max_steps(curves, cfg) else
              {"training.epochs": max(1, math.ceil(best["step"] / curves.steps_per_epoch()))}
              if curves.steps_per_epoch() else {})
    items = [_item("overfitting",
                   f"validation loss rose {100 * gl:.0f}% above its best ({best['val_loss']:.4g} at step {best['step']}"
                   f", {last['val_loss']:.4g} at step {last['step']}) while the training loss kept falling: the run "
                   "went past its best (Prechelt's GL>5% criterion). Stop about there and keep the best weights.",
                   {**sooner, "training.load_best_at_end": True})]
    if cfg.method in LORA_METHODS and cfg.lora.dropout < 0.1:
        # QLoRA used LoRA dropout 0.1 for models up to 13B (Dettmers et al. 2023, appendix B)
        items.append(_item("overfitting", f"or regularise: LoRA dropout {cfg.lora.dropout:g} -> 0.1.",
                           {"lora.dropout": 0.1}))
    elif t.weight_decay < 0.1:
        items.append(_item("overfitting", f"or regularise: weight decay {t.weight_decay:g} -> 0.1.",
                           {"training.weight_decay": 0.1}))
    return items


def still_falling(curves: Curves, cfg: Config) -> list[dict]:
    if curves.n < MIN_STEPS or not _finite(curves) or _generalisation_loss(curves) is not None:
        return []
    fall = curves.recent_fall()
    if fall < STILL_FALLING:
        return []
    return [_item("still_falling",
                  f"the training loss was still falling at the end ({100 * fall:.0f}% over the last quarter of the "
                  f"steps, {curves.tokens:,} tokens in all): the run stopped while learning; train about twice as long.",
                  _longer(curves, cfg, 2 * curves.n))]


def plateau_lr_high(curves: Curves, cfg: Config) -> list[dict]:
    if curves.n < MIN_STEPS or not _finite(curves) or _jump(curves) is not None:
        return []
    peak, end = max(curves.lrs), curves.lrs[-1]
    learned = curves.level("end") < LEARNED * curves.level("start")
    if not learned or abs(curves.recent_fall()) >= FLAT or peak <= 0 or end < LR_HIGH * peak:
        return []
    t = cfg.training
    settings = {"training.learning_rate": _round(t.learning_rate * 0.8)}
    if t.lr_scheduler == "constant":
        settings["training.lr_scheduler"] = "cosine"
    return [_item("plateau_lr_high",
                  f"the loss fell to {curves.level('end'):.4g}, then went flat while the learning rate was still "
                  f"{100 * end / peak:.0f}% of its peak: steps that big keep it bouncing above its floor; 20% lower, "
                  + ("and decayed along a cosine." if t.lr_scheduler == "constant" else "for the same steps."),
                  settings)]


def underfitting(curves: Curves, cfg: Config) -> list[dict]:
    if curves.n < MIN_STEPS or not _finite(curves) or _jump(curves) is not None or grad_spikes(curves, cfg):
        return []  # an unstable run (jumps, spikes) that did not learn wants smaller steps, not more capacity
    start, end = curves.level("start"), curves.level("end")
    if end < LEARNED * start or abs(curves.recent_fall()) >= FLAT:
        return []
    why = (f"the loss went flat at {end:.4g}, less than {100 * (1 - LEARNED):.0f}% below where it started "
           f"({start:.4g}): the run cannot learn more as set up")
    if cfg.method in LORA_METHODS and cfg.training.learning_rate < LORA_LR_LOW:
        settings = {"training.learning_rate": _round(cfg.training.learning_rate * 2)}
        how = (f"a learning rate of {cfg.training.learning_rate:g} is below LoRA's usual {LORA_LR_LOW:g} to 2e-4; "
               "double it.")
    elif cfg.method in LORA_METHODS:
        # A higher rank closes more of LoRA's gap to full fine-tuning (Biderman et al. 2024, "LoRA Learns Less and
        # Forgets Less"); alpha moves with r so that alpha/r, the update's scale, stays the same.
        settings = {"lora.r": cfg.lora.r * 2, "lora.alpha": _round(cfg.lora.alpha * 2)}
        if cfg.lora.dropout > 0:
            settings["lora.dropout"] = 0.0
        how = f"give the adapter twice the rank ({cfg.lora.r} -> {cfg.lora.r * 2})" + (
            " and no dropout." if cfg.lora.dropout > 0 else ".")
    else:
        settings = {"training.learning_rate": _round(cfg.training.learning_rate * 2)}
        how = "double the learning rate."
    return [_item("underfitting", f"{why}; {how}", settings)]


RULES = (too_few_steps, loss_diverged, grad_spikes, overfitting, still_falling, plateau_lr_high, underfitting)


def command(run_dir: str | Path, settings: dict) -> str:
    """The `tunesmith train` line that runs this run again, with `settings`, into RUN-next."""
    run_dir = str(run_dir)
    parts = ["tunesmith", "train", shlex.quote(str(Path(run_dir) / "config.yaml")), "--output",
             shlex.quote(f"{run_dir}-next")]
    for key, value in settings.items():
        parts += ["--set", shlex.quote(set_line(key, value))]
    return " ".join(parts)


def advise(records: list[dict], cfg: Config, run_dir: str | Path) -> list[dict]:
    """Every rule's items for this run, in RULES' order, each with its command.  GRPO's loss is a policy-gradient
    surrogate that sits near zero whether or not the rewards climb, so its runs get only the rules that do not
    read the loss's level (too few steps, gradient spikes)."""
    curves = read_curves(records)
    rules = RULES if cfg.objective.type != "grpo" else (too_few_steps, grad_spikes)
    return [{**item, "command": command(run_dir, item["set"])} for rule in rules for item in rule(curves, cfg)]
