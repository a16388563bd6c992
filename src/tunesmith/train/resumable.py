"""Whether a run folder can be continued with `--resume`, and with which config.

A resumed run must be the run that was stopped: its checkpoint holds tensors shaped by the model, the method
and its rank, and a position in an order drawn from the data and the seeds.  So the config given for a resume
is compared with the run's own `config.yaml`, key by key; only keys that change how long the run goes on, how
often it saves or validates, how it is evaluated, how many processes share it, or which trackers get its
metrics may differ.  A finished run (its summary.json written) is not continued: that would rewrite its summary
and report.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import Config, load_config
from tunesmith.errors import UserError
from tunesmith.train.status import read_status

# Keys a resume may change, as dotted prefixes.  `distributed.*`: checkpoints hold whole tensors, so they load
# under any strategy and number of processes (tests/test_distributed.py resumes across them).
SAFE_TO_CHANGE = (
    "training.max_steps", "training.epochs", "training.save_steps", "training.save_total_limit",
    "training.eval_steps", "training.num_threads", "eval.", "distributed.", "output.dir",
    "logging.",  # where the metrics also go: a resume may add or drop a tracker
)


def dotted_keys(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested dict (a config's `model_dump`, a summary) as {"training.learning_rate": value, ...}: the keys
    `--set` takes; lists and empty dicts stay values."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_keys(saved: Config, given: Config) -> dict[str, tuple[object, object]]:
    """{dotted key: (the run's value, the given value)} for every key whose values differ."""
    a, b = dotted_keys(saved.model_dump(mode="json")), dotted_keys(given.model_dump(mode="json"))
    return {key: (a.get(key), b.get(key)) for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)}


def check_resumable(cfg: Config, run_dir: Path) -> None:
    """Refuse, with a sentence, a resume of a finished run or one whose config changed a key that shapes the
    checkpoint or the data order; say which changed keys are kept."""
    status = read_status(run_dir) or {}
    if status.get("state") == "finished" or (run_dir / "summary.json").is_file():
        raise UserError(
            f"--resume: {run_dir} is a finished run ({status.get('message') or 'its summary.json is written'}); "
            "nothing was changed. To train further, start a new run from its weights or with more steps: "
            f"tunesmith train {run_dir / 'config.yaml'} --output {run_dir}-longer --set training.epochs=N."
        )
    own = run_dir / "config.yaml"
    if not own.is_file():
        return  # a run stopped before its config was written has no checkpoint either; the loop says so
    saved = load_config(own)
    refused = {key: values for key, values in changed_keys(saved, cfg).items()
               if not any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in SAFE_TO_CHANGE)}
    if refused:
        shown = "; ".join(f"{key}: {old!r} in the run, {new!r} now" for key, (old, new) in list(refused.items())[:10])
        more = f" (and {len(refused) - 10} more)" if len(refused) > 10 else ""
        raise UserError(
            f"--resume: the config differs from {own} in keys a resumed run cannot change: {shown}{more}. "
            "A resume continues the same run; only these may change: "
            f"{', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in SAFE_TO_CHANGE)}. "
            "Resume with the run's own config (tunesmith train RUN/config.yaml --resume), or start a new run."
        )
