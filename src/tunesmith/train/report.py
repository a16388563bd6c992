"""What a finished run says about itself: training.png, a health verdict and report.md (with the advice of
train/advice.py)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def health_check(train_records: list[dict]) -> dict:
    """Plain-words checks on the step records: loss falling, gradient norm stable, no NaN, memory flat."""
    losses = [r["loss"] for r in train_records]
    findings: list[str] = []
    ok = True
    if not losses:
        return {"healthy": False, "findings": ["no training step finished."]}
    if any(not math.isfinite(x) for x in losses):
        return {"healthy": False, "findings": ["the loss became NaN or infinite: lower training.learning_rate."]}
    # Compare the mean of the first and last tenth of steps (at least one step each): single steps are noisy.
    k = max(1, len(losses) // 10)
    first, last = _mean(losses[:k]), _mean(losses[-k:])
    if last < first:
        findings.append(f"loss fell from {first:.3f} to {last:.3f} ({100 * (1 - last / first):.0f}% lower).")
    else:
        ok = False
        findings.append(
            f"loss did not fall ({first:.3f} at the start, {last:.3f} at the end): "
            "try a higher training.learning_rate or more steps."
        )
    norms = [r["grad_norm"] for r in train_records if r.get("grad_norm") is not None]
    if norms:
        median = statistics.median(norms)
        spikes = [n for n in norms if not math.isfinite(n) or (median > 0 and n > 10 * median)]
        if spikes:
            ok = False
            findings.append(
                f"gradient norm spiked {len(spikes)} time(s) above 10x its median ({median:.3g}): "
                "consider a lower learning rate or training.max_grad_norm."
            )
        else:
            findings.append(f"gradient norm stayed stable (median {median:.3g}, max {max(norms):.3g}).")
    rss = [r["rss_bytes"] for r in train_records if "rss_bytes" in r]
    if len(rss) >= 4:
        half = len(rss) // 2
        early, late = max(rss[:half]), max(rss[half:])
        growth = (late - early) / max(early, 1)
        if growth > 0.25:
            ok = False
            findings.append(f"memory kept growing ({early / 2**30:.2f} GiB -> {late / 2**30:.2f} GiB): a leak?")
        else:
            findings.append(f"memory stayed flat (about {late / 2**30:.2f} GiB resident).")
    return {"healthy": ok, "findings": findings}


# The panels a preference or reward objective adds below the loss, learning rate and gradient norm: its title and
# the metrics.jsonl keys drawn in it (each panel only when the run logged one of them).
OBJECTIVE_PANELS = (
    ("implicit rewards", ("reward_chosen", "reward_rejected", "reward_margin", "reward_desirable", "reward_undesirable")),
    ("preference accuracy", ("reward_accuracy",)),
    ("reward (mean and spread within groups)", ("reward_mean", "reward_spread")),
    ("KL to the reference", ("kl",)),
    ("answer length (tokens)", ("completion_length",)),
)


def plot_training(train_records: list[dict], val_records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in train_records]
    extra = [(title, keys) for title, keys in OBJECTIVE_PANELS if any(k in r for r in train_records for k in keys)]
    rows = 1 + (len(extra) + 2) // 3
    fig, grid = plt.subplots(rows, 3, figsize=(14, 4 * rows), squeeze=False)
    axes = grid[0]
    axes[0].plot(steps, [r["loss"] for r in train_records], label="train loss", linewidth=1)
    if val_records:
        axes[0].plot([r["step"] for r in val_records], [r["val_loss"] for r in val_records], "o-", label="validation loss")
    axes[0].set_xlabel("step")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in train_records], color="tab:green")
    axes[1].set_xlabel("step")
    axes[1].set_title("learning rate")
    axes[2].plot(steps, [r.get("grad_norm") or float("nan") for r in train_records], color="tab:red", linewidth=1)
    axes[2].set_xlabel("step")
    axes[2].set_title("gradient norm")
    # a preference or reward objective's own numbers (prefer/): rewards, accuracy, KL, answer length
    for ax, (title, keys) in zip(grid[1:].flat, extra):
        for key in keys:
            values = [r.get(key) for r in train_records]
            if any(v is not None for v in values):
                ax.plot(steps, [float("nan") if v is None else v for v in values], label=key.replace("_", " "), linewidth=1)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
    for ax in list(grid[1:].flat)[len(extra):]:
        ax.set_visible(False)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_report(summary: dict, samples: list[dict]) -> str:
    """A short human-readable report.md."""
    train = summary["train"]
    health = summary["health"]
    lines = [
        f"# tunesmith run: {summary['run_dir']}",
        "",
        f"Model `{summary['model']['name']}`, method `{summary['method']}`, "
        f"{summary['model']['trainable_parameters']:,} of {summary['model']['parameters']:,} parameters trained, "
        f"on {summary['hardware']['device']} in {summary['hardware']['dtype']}.",
        "",
        "## Did training look healthy?",
        "",
        ("**Yes.** " if health["healthy"] else "**Not entirely.** ") + " ".join(health["findings"]),
        "",
        f"{train['steps']} steps in {train['wall_s']:.0f} s; loss {train['first_loss']:.4f} -> {train['final_loss']:.4f}; "
        f"{train['trained_tokens_per_s']:.1f} trained tokens/s; peak memory "
        f"{summary['memory']['peak_rss_bytes'] / 2**30:.2f} GiB resident.",
    ]
    est = summary.get("estimate")
    if est and est.get("peak_bytes"):
        lines += ["", "## Estimate vs measured", "", "| | estimated before the run | measured | measured / estimated |",
                  "| --- | --- | --- | --- |",
                  f"| peak memory | {est['peak_bytes'] / 2**30:.2f} GiB | {est['measured_peak_bytes'] / 2**30:.2f} GiB | "
                  f"{est['peak_ratio']:.2f} |"]
        if est.get("time_s"):
            lines.append(f"| time | {est['time_s']:.0f} s ({est.get('time_source') or 'model'}) | "
                         f"{est['measured_s']:.0f} s | {est['time_ratio']:.2f} |")
    if summary.get("validation"):
        val = summary["validation"]
        extra = ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in val.items() if k not in ("loss", "perplexity"))
        lines += ["", f"Final validation loss {val['loss']:.4f}"
                  + (f" (perplexity {val['perplexity']:.2f})" if val.get("perplexity") is not None else "")
                  + (f"; {extra}" if extra else "") + "."]
    ev = summary.get("eval")
    if ev:
        names = [k for k in ev["base"] if k != "rows"]
        lines += [
            "",
            f"## Before and after, on {ev['base'].get('rows', '?')} held-out rows",
            "",
            "| metric | base | tuned |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {name} | {_fmt(ev['base'][name])} | {_fmt(ev['tuned'].get(name))} |" for name in names]
        for sample in samples:
            lines += [
                "",
                "**Prompt:** " + sample["prompt"].replace("\n", " "),
                "",
                f"- reference: {sample['reference']}",
                f"- base: {sample['base']}",
                f"- tuned: {sample['tuned']}",
            ]
    lines += _advice_lines(summary.get("advice"))
    lines += ["", "## Next", ""] + [f"    {cmd}" for cmd in summary["next_commands"]] + [""]
    return "\n".join(lines)


def _advice_lines(advice: list[dict] | None) -> list[str]:
    """report.md's "What to try next": each item of summary.json's `advice` (train/advice.py) with its command."""
    if advice is None:  # a summary written before advice existed
        return []
    lines = ["", "## What to try next", ""]
    if not advice:
        return lines + ["Nothing in the curves calls for a change."]
    for item in advice:
        lines += [f"- **{item['rule'].replace('_', ' ')}**: {item['why']}", "", f"      {item['command']}", ""]
    return lines[:-1]
