"""`tunesmith sweep`: a hyperparameter search with Optuna, each trial a normal run folder.

    result = run_sweep("examples/quickstart.yaml", "examples/sweep-space.yaml", trials=8)
    result["trials"]     # ranked rows: trial, state, value (validation loss), params, note, run folder
    result["best"]       # the best trial, and best.yaml: the config with its parameters

How it goes:

- The sweep's folder (`output`, default `runs/sweep-<config name>`, no time in it so that the same command
  finds it again) holds `sweep.json` (what the sweep is: the config's SHA-256, the --set lines, the space,
  the study's name), the study (`study.db`, SQLite, unless `storage` names another database), a run folder
  per trial (`trial-0000`, ... numbered as Optuna numbers its trials, from 0) with its output in
  `logs/trial-NNNN.log`, and at the end `trials.csv`, `best.yaml`, `history.png` and `importance.png`.
  Running the same command again continues the sweep in it; a folder that holds a different sweep (another
  config text, space, --set lines or --eval) is refused with a sentence, never mixed.
- Each trial: Optuna's TPE sampler draws the space's values (seeded with training.seed), the config with
  them must load, and `plan.estimate` must say it fits (one that will not is *skipped*: recorded as pruned
  with the reason, and it counts towards `trials`); then `tunesmith train` runs it as a child process
  into its folder with the values as `--set` lines.  Trials train with `eval.enabled=false` (the
  before/after comparison costs generation time and is not what the search ranks by) unless `eval_after`.
- The objective is the validation loss of the weights the trial kept: its last validation loss, or its
  best with training.load_best_at_end.  Each validation is reported to Optuna's median pruner, which stops
  a trial (SIGINT: checkpoint, then stop) whose loss is worse than the median of earlier trials at the same
  step.  Where the config sets no training.eval_steps but knows its training.max_steps, the trials
  validate every max_steps / 4 steps (EVALUATIONS_PER_TRIAL) so there is something to prune on; otherwise
  at each epoch's end.  A config with no validation rows is refused: there would be nothing to rank.
- `trials` counts finished trials: complete, pruned, skipped, and failed ones (a trial whose training
  failed says why in the table; two failures before anything finished stop the sweep).  A trial that was
  running when the sweep was stopped (Ctrl-C, SIGTERM, kill -9) does not count: its folder is left as it
  is, it is marked failed ("lost") in the study, and its values run again as a new trial.  Ctrl-C stops the
  running trial with a checkpoint and raises SweepInterrupted; a trial's process dies with the sweep
  however the sweep ends (Linux: PR_SET_PDEATHSIG).  One sweep process works in a folder at a time (its
  lock, as a run folder's).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from tunesmith.config import Config, load_config, resolved_yaml, set_line
from tunesmith.errors import UserError, visible
from tunesmith.fileio import atomic_write_file, atomic_write_json, atomic_write_text
from tunesmith.plan.estimate import estimate_if_possible
from tunesmith.plan.space import Param, check_space, read_space
from tunesmith.train.child import RunProcess, spawn
from tunesmith.train.folder_lock import LOCK_FILE, hold_run_folder, refuse_if_in_use, refuse_if_used

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
STUDY_FILE = "study.db"
TABLE_FILE = "trials.csv"
BEST_FILE = "best.yaml"
HISTORY_FILE = "history.png"
IMPORTANCE_FILE = "importance.png"

# Validations per trial when the sweep picks training.eval_steps: enough for the pruner to stop a bad trial
# before its last quarter, few enough that validating costs little next to training.
EVALUATIONS_PER_TRIAL = 4
# The median pruner compares a trial with the trials finished before it; with fewer than two there is no
# median worth stopping a trial for (Optuna's own default, 5, would prune nothing in a sweep of 4 to 6 trials).
PRUNER_STARTUP_TRIALS = 2
# TPE draws its first trials at random before it models the results: Optuna's default is 10; a short sweep
# gets half its trials random (at least 2), so TPE has a few trials left to choose.
TPE_STARTUP_TRIALS = 10
# A stopped trial saves a checkpoint before it ends; after this long it is killed instead.
STOP_WAIT_S = 120
# Failed trials, with none finished yet, after which the sweep stops: the config (its data, its model) is the
# likelier cause than the trials' values.
FAILURES_BEFORE_GIVING_UP = 2

# PED-ANOVA (importance.png) scores every key 0 until the complete trials outnumber its 2 "top" trials
# (optuna/importance/_ped_anova/evaluator.py: min_n_top_trials).
IMPORTANCE_MIN_TRIALS = 3

# The words the table uses for a trial's state (a failed trial is "lost" when the sweep, not its training,
# ended it).
COMPLETE, PRUNED, SKIPPED, FAILED, LOST, RUNNING = "complete", "pruned", "skipped", "failed", "lost", "running"
STOPPED = "stopped"  # read_sweep: running in the table, and no sweep process holds the folder (it was killed)


class SweepInterrupted(UserError):
    """Ctrl-C or SIGTERM stopped the sweep: the running trial was stopped with a checkpoint, and the same
    command continues the sweep (in `sweep_dir`)."""

    def __init__(self, message: str, sweep_dir: Path):
        super().__init__(message)
        self.sweep_dir = sweep_dir


def default_sweep_dir(config_path: str | Path) -> Path:
    return Path("runs") / f"sweep-{Path(config_path).stem}"


def trial_command(config_path: str | Path, run_dir: Path, overrides: Sequence[str], nproc: int,
                  memory_limit: int | None = None) -> list[str]:
    """The trial's training command: `tunesmith train` into `run_dir`, as `api.start_run` starts one, without
    the fit check (the sweep made it: the same config and `memory_limit`, which the trial still records)."""
    return ([sys.executable, "-m", "tunesmith.cli", "train", str(config_path), "--output", str(run_dir),
             "--nproc", str(nproc), "--no-fit-check"]
            + (["--memory-limit", str(memory_limit)] if memory_limit is not None else [])
            + [x for item in overrides for x in ("--set", item)])


def run_sweep(config_path: str | Path, space_path: str | Path, trials: int, output: str | Path | None = None,
              overrides: Sequence[str] = (), nproc_per_trial: int = 1, storage: str | None = None,
              memory_limit: int | None = None, eval_after: bool = False) -> dict:
    """Search the space in `space_path` over the config at `config_path` (with `overrides`) until `trials`
    trials have finished, continuing the sweep already in the folder if there is one (see the module
    docstring).  `memory_limit` (bytes) is what the fit check assumes the device has.  Returns
    `sweep_result`'s summary; raises SweepInterrupted on Ctrl-C or SIGTERM, UserError on bad input."""
    if trials < 1:
        raise UserError(f"--trials {trials}: give the number of trials to finish, 1 or more.")
    if nproc_per_trial < 1:
        raise UserError(f"--nproc-per-trial {nproc_per_trial}: give 1 or more processes.")
    overrides = list(overrides)
    cfg = load_config(config_path, overrides)
    _refuse_unsweepable(cfg, config_path)
    space = read_space(space_path)
    check_space(space, space_path, config_path, overrides)
    _refuse_without_validation(cfg, config_path, space)
    sweep_dir = Path(output or default_sweep_dir(config_path))
    record = _sweep_record(config_path, overrides, space_path, space, eval_after, sweep_dir, storage)
    refuse_if_in_use(sweep_dir)
    with hold_run_folder(sweep_dir, "sweeping"), _quiet_optuna(), _sigterm_as_interrupt():
        if not (sweep_dir / SWEEP_FILE).is_file():
            atomic_write_json(sweep_dir / SWEEP_FILE, record)
        study = _open_study(record, sweep_dir, storage, cfg.training.seed, trials)
        _requeue_lost_trials(study)
        settings = _trial_settings(cfg, space, eval_after)
        while (done := _counted(study.get_trials(deepcopy=False))) < trials:
            _refuse_failing_sweep(study, sweep_dir)
            log.info(f"tunesmith sweep: trial {done + 1} of {trials}")
            try:
                _run_trial(study, space, config_path, [*overrides, *settings], sweep_dir, nproc_per_trial,
                           memory_limit, cfg.training.load_best_at_end)
            finally:
                write_table(study, space, sweep_dir)
        return sweep_result(study, space, sweep_dir, config_path, overrides)


# --- what a sweep is, and where it is kept

def _refuse_unsweepable(cfg: Config, config_path: str | Path) -> None:
    if cfg.teacher.name:
        raise UserError(f"{visible(str(config_path), 300)}: teacher.name is set, so this is a distillation config; "
                        "tunesmith sweep runs tunesmith train trials (remove the teacher: section to sweep it).")


def _refuse_without_validation(cfg: Config, config_path: str | Path, space: Sequence[Param]) -> None:
    """A sweep ranks trials by validation loss, so the config must hold some validation rows back."""
    swept = {p.key for p in space}
    if cfg.data.validation_split == 0 and not cfg.data.validation_path and "data.validation_split" not in swept:
        raise UserError(f"{visible(str(config_path), 300)}: data.validation_split is 0 and there is no "
                        "data.validation_path, so a trial has no validation loss to be ranked by; hold some rows "
                        "back (e.g. --set data.validation_split=0.1).")


def _sweep_record(config_path, overrides: list[str], space_path, space: Sequence[Param], eval_after: bool,
                  sweep_dir: Path, storage: str | None) -> dict:
    """sweep.json's content for this command; when the folder holds a sweep already, the one it holds, after
    checking it is the same sweep (else a sentence); a folder with other things in it is refused."""
    config_text = Path(config_path).read_bytes()
    record = {
        "config": str(config_path), "config_sha256": hashlib.sha256(config_text).hexdigest(),
        "overrides": list(overrides), "space_file": str(space_path), "space": {p.key: p.to_json() for p in space},
        "eval": eval_after, "study": f"{sweep_dir.name}-{uuid.uuid4().hex[:8]}",
        "storage": _shown_url(storage) if storage else None, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    held = _read_record(sweep_dir)
    if held is None:
        if sweep_dir.exists() and (not sweep_dir.is_dir() or any(e.name != LOCK_FILE for e in sweep_dir.iterdir())):
            raise UserError(f"{sweep_dir} already exists and holds no sweep (it has no {SWEEP_FILE}); a sweep never "
                            "writes among other files. Give another --output DIR.")
        return record
    differ = [what for key, what in (("config_sha256", f"the text of {held.get('config')}"),
                                     ("overrides", "the --set lines"), ("space", "the space"), ("eval", "--eval"))
              if held.get(key) != record[key]]
    if differ:
        raise UserError(f"{sweep_dir} holds another sweep (of {visible(str(held.get('config')), 200)}, started "
                        f"{held.get('created')}): {', '.join(differ)} differ from this command's. To continue "
                        "that sweep, run its own command; to start a new one, give another --output DIR (or "
                        "remove that folder).")
    if storage and held.get("storage") != _shown_url(storage):
        raise UserError(f"{sweep_dir}: this sweep's study is kept in {held.get('storage') or STUDY_FILE + ' there'}, "
                        f"not in {_shown_url(storage)}; leave --storage out, or give the same URL.")
    return held


def _read_record(sweep_dir: Path) -> dict | None:
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        return None
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read ({exc}); it says what sweep the folder holds. Give another "
                        "--output DIR, or remove that folder to start over.") from None
    if not isinstance(held, dict) or not isinstance(held.get("study"), str):
        raise UserError(f"{path} is not a sweep's record; give another --output DIR.")
    return held


def _shown_url(url: str) -> str:
    """The database URL with its password hidden (it is written into sweep.json and printed)."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise UserError(f"--storage {visible(url, 200)}: not a database URL; write it like "
                        "sqlite:///sweep.db or postgresql://user@host:5432/name.") from None


def _with_driver(url: str) -> str:
    """A postgresql:// URL with the PostgreSQL driver tunesmith depends on (psycopg 3, as the studio uses it);
    SQLAlchemy's default for the bare scheme is psycopg2, which is not installed."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def _open_study(record: dict, sweep_dir: Path, storage: str | None, seed: int, trials: int) -> optuna.Study:
    """The sweep's study, made or loaded: TPE seeded with the config's training.seed (plus the trials already
    in it, so a continued sweep does not draw its first values again) and the median pruner."""
    held = record.get("storage")
    if storage is None and held:
        if "***" in held:
            raise UserError(f"{sweep_dir}: this sweep's study is kept in {held}; give --storage with its URL "
                            "(and password) again to continue it.")
        storage = held
    url = storage or f"sqlite:///{(sweep_dir / STUDY_FILE).resolve()}"
    try:
        study = optuna.create_study(
            storage=_with_driver(url), study_name=record["study"], direction="minimize", load_if_exists=True,
            pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=0),
        )
        before = len(study.get_trials(deepcopy=False))
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError, ValueError) as exc:
        raise UserError(f"{_shown_url(url)}: the study cannot be opened ({visible(str(exc).splitlines()[0], 300)}); "
                        "check the --storage URL and that the database is reachable.") from None
    startup = min(TPE_STARTUP_TRIALS, max(2, trials // 2))
    study.sampler = optuna.samplers.TPESampler(seed=(seed + before) % 2**32, n_startup_trials=startup)
    return study


# --- the trials

def _trial_settings(cfg: Config, space: Sequence[Param], eval_after: bool) -> list[str]:
    """The --set lines the sweep adds to every trial (before the trial's own values, which win)."""
    settings = [] if eval_after else ["eval.enabled=false"]
    swept = {p.key: p for p in space}
    t = cfg.training
    if t.eval_steps is None and "training.eval_steps" not in swept:
        steps = swept.get("training.max_steps")
        candidates = steps.edge_values() if steps is not None else [t.max_steps]
        shortest = min((v for v in candidates if isinstance(v, int) and not isinstance(v, bool)), default=None)
        if shortest:
            settings.append(f"training.eval_steps={max(1, shortest // EVALUATIONS_PER_TRIAL)}")
    return settings


def _counted(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count towards the sweep's number: all that finished, failed ones included; not those lost
    when the sweep stopped, nor those running or queued."""
    return sum(trial_state(t) in (COMPLETE, PRUNED, SKIPPED, FAILED) for t in trials)


def trial_state(trial: FrozenTrial) -> str:
    if trial.state == TrialState.COMPLETE:
        return COMPLETE
    if trial.state == TrialState.PRUNED:
        return SKIPPED if "skipped" in trial.user_attrs else PRUNED
    if trial.state == TrialState.FAIL:
        return FAILED if "failed" in trial.user_attrs else LOST
    return RUNNING if trial.state == TrialState.RUNNING else trial.state.name.lower()


def _requeue_lost_trials(study: optuna.Study) -> None:
    """Trials still marked running were running when an earlier sweep process died (this one holds the folder's
    lock, so no other is running them): marked failed, their folders left as they are, their values queued."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        log.info(f"tunesmith sweep: trial {trial.number} was running when the sweep stopped; its folder "
                 f"{trial.user_attrs.get('run_dir', '')} is left as it is, and its values run again as a new trial.")


def _refuse_failing_sweep(study: optuna.Study, sweep_dir: Path) -> None:
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if trial_state(t) == FAILED]
    if len(failed) >= FAILURES_BEFORE_GIVING_UP and not any(trial_state(t) in (COMPLETE, PRUNED) for t in trials):
        last = failed[-1]
        raise UserError(f"the sweep in {sweep_dir} stopped: its first {len(failed)} trials failed and none finished. "
                        f"Trial {last.number}: {last.user_attrs['failed']} Fix that and start a new sweep "
                        "(another --output DIR, or remove that folder).")


def _run_trial(study: optuna.Study, space: Sequence[Param], config_path, overrides: list[str], sweep_dir: Path,
               nproc: int, memory_limit: int | None, best_at_end: bool) -> None:
    """Ask the study for a trial, run it, tell the study how it ended.  On Ctrl-C the trial is lost (its values
    queued again) and SweepInterrupted is raised."""
    trial = study.ask()
    run_dir = sweep_dir / f"trial-{trial.number:04d}"
    try:
        params = {p.key: p.suggest(trial) for p in space}
        lines = [*overrides, *(set_line(key, value) for key, value in params.items())]
        shown = ", ".join(f"{key}={_value_text(value)}" for key, value in params.items())
        log.info(f"tunesmith sweep: trial {trial.number}: {shown} -> {run_dir}")
        try:
            fit = estimate_if_possible(load_config(config_path, lines), memory_limit, nproc, who="this trial")
        except UserError as exc:
            _fail(study, trial, str(exc))
            return
        if fit is not None and not fit.fits:
            trial.set_user_attr("skipped", fit.sentence())
            study.tell(trial, state=TrialState.PRUNED)
            log.info(f"tunesmith sweep: trial {trial.number} skipped: {fit.sentence()}")
            return
        refuse_if_used(run_dir)
        trial.set_user_attr("run_dir", str(run_dir))  # a trial that gets this far has a run folder
        write_table(study, space, sweep_dir)  # the table shows it running
        log_file = sweep_dir / "logs" / f"{run_dir.name}.log"
        run = _start(trial_command(config_path, run_dir, lines, nproc, memory_limit), run_dir, log_file)
        _follow_trial(study, trial, run, best_at_end)
    except KeyboardInterrupt:
        _lose(study, trial)
        done = _counted(study.get_trials(deepcopy=False))
        kept = (f" (its folder {run_dir} is left as it is, with a checkpoint if it reached one)"
                if run_dir.exists() else "")
        raise SweepInterrupted(f"the sweep in {sweep_dir} was stopped during trial {trial.number}{kept}; the study "
                               f"keeps its finished trials ({done}). Run the same command again to continue: trial "
                               f"{trial.number}'s values run again as a new trial.", sweep_dir) from None


def _follow_trial(study: optuna.Study, trial: optuna.Trial, run: RunProcess, best_at_end: bool) -> None:
    """Report each validation loss to the pruner (and stop the trial when it says so) until the run ends."""
    losses: list[float] = []
    pruned_at = None
    end = None
    try:
        for event in run.events():
            if event.kind == "validation" and pruned_at is None:
                loss, step = event.data["val_loss"], event.data["step"]
                losses.append(loss)
                trial.report(loss, step)
                if trial.should_prune():
                    pruned_at = step
                    run.stop()
            elif event.final:
                end = event
    except BaseException:
        _end_process(run)
        raise
    run.wait()
    if pruned_at is not None:
        trial.set_user_attr("pruned_at", pruned_at)
        study.tell(trial, state=TrialState.PRUNED)
        log.info(f"tunesmith sweep: trial {trial.number} pruned at step {pruned_at}: validation loss "
                 f"{losses[-1]:.4f} is worse than the median of the trials before it there.")
    elif end is not None and end.kind == "finished" and losses:
        value = min(losses) if best_at_end else losses[-1]
        study.tell(trial, value)
        log.info(f"tunesmith sweep: trial {trial.number} finished: validation loss {value:.4f}")
    elif end is not None and end.kind == "finished":
        _fail(study, trial, "it finished without a validation loss (no validation rows, or "
                            "training.eval_each_epoch is false and training.eval_steps never came).")
    else:
        why = (end.message if end is not None else None) or "its training process ended without saying why"
        _fail(study, trial, f"{why} (its output: {run.log_file})")


def _fail(study: optuna.Study, trial: optuna.Trial, why: str) -> None:
    trial.set_user_attr("failed", why)
    study.tell(trial, state=TrialState.FAIL)
    log.info(f"tunesmith sweep: trial {trial.number} failed: {why}")


def _lose(study: optuna.Study, trial: optuna.Trial) -> None:
    """The sweep stopped during `trial`: failed without a reason of its own (so not counted), values queued."""
    with contextlib.suppress(ValueError):  # told already (it ended as the sweep stopped)
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def _start(argv: list[str], run_dir: Path, log_file: Path) -> RunProcess:
    """Start a trial's training: in a session of its own, so a Ctrl-C at the terminal reaches the sweep only
    (which stops the trial with one SIGINT: a second would skip its checkpoint), and killed with the sweep."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    return spawn(argv, run_dir, log_file, detach=True, die_with_starter=True)


def _end_process(run: RunProcess) -> None:
    """Stop a trial's training (a checkpoint first) and wait for it; killed when it takes too long or a second
    Ctrl-C comes."""
    run.stop()
    try:
        run.wait(STOP_WAIT_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        run.process.kill()
        run.process.wait()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the sweep as Ctrl-C does (in the main thread, where signals are handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs each trial it is told about; the sweep says it in its own words, so Optuna says only warnings."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


# --- the results

def _value_text(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def ranked_rows(study: optuna.Study, space: Sequence[Param]) -> list[dict]:
    """Every trial that ran or is running, best first: complete trials by validation loss, then pruned ones by
    their last reported loss, then skipped, failed, lost and running ones by number."""
    order = [COMPLETE, PRUNED, SKIPPED, FAILED, LOST, RUNNING]
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = trial_state(t)
        if state not in order:
            continue  # queued, not yet run
        note = {PRUNED: f"pruned at step {t.user_attrs.get('pruned_at')}",
                SKIPPED: f"skipped: {t.user_attrs.get('skipped')}", FAILED: f"failed: {t.user_attrs.get('failed')}",
                LOST: "the sweep stopped during it; its values ran again as a new trial"}.get(state, "")
        if "retry_of" in t.user_attrs:
            note = f"values of trial {t.user_attrs['retry_of']} again" + (f"; {note}" if note else "")
        value = t.value if state in (COMPLETE, PRUNED) else None
        rows.append({"trial": t.number, "state": state, "value": value,
                     "params": {p.key: t.params[p.key] for p in space if p.key in t.params},
                     "note": note, "run_dir": t.user_attrs.get("run_dir", "")})
    rows.sort(key=lambda r: (order.index(r["state"]),
                             r["value"] if r["value"] is not None and math.isfinite(r["value"]) else math.inf,
                             r["trial"]))
    rank = 0
    for row in rows:
        rank += row["state"] == COMPLETE
        row["rank"] = rank if row["state"] == COMPLETE else None
    return rows


def write_table(study: optuna.Study, space: Sequence[Param], sweep_dir: Path) -> Path:
    """trials.csv: the ranked table (rewritten after each trial, so it shows how the sweep stands)."""
    keys = [p.key for p in space]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["rank", "trial", "state", "validation_loss", *keys, "run_dir", "note"])
    for row in ranked_rows(study, space):
        writer.writerow([row["rank"] or "", row["trial"], row["state"],
                         "" if row["value"] is None else repr(row["value"]),
                         *(row["params"].get(key, "") for key in keys), row["run_dir"], row["note"]])
    path = sweep_dir / TABLE_FILE
    atomic_write_text(path, text.getvalue())
    return path


def read_sweep(sweep_dir: str | Path) -> dict:
    """A sweep's folder as it stands, read from its files only (no database: a study kept elsewhere may need a
    password): {"sweep_dir", "record": sweep.json, "trials": trials.csv's ranked rows (each trial's `run_dir`
    its folder inside this one), "best_config": best.yaml's text or None, "plots": the PNG names present,
    "running": whether a sweep process holds the folder now}.  A folder without sweep.json is a UserError."""
    sweep_dir = Path(sweep_dir)
    try:
        is_sweep = (sweep_dir / SWEEP_FILE).is_file()
    except (OSError, ValueError) as exc:  # a name too long, a NUL character
        raise UserError(f"{visible(str(sweep_dir), 300)}: cannot look at this path ({visible(str(exc), 200)}); give "
                        "the folder `tunesmith sweep` wrote into.") from None
    if not is_sweep:
        raise UserError(f"{visible(str(sweep_dir), 300)} is not a tunesmith sweep folder (it has no {SWEEP_FILE}); "
                        "give the folder `tunesmith sweep` wrote into (its --output, default runs/sweep-<config name>).")
    record = _read_record(sweep_dir)
    rows = []
    try:
        with open(sweep_dir / TABLE_FILE, newline="", encoding="utf-8") as handle:
            for line in csv.DictReader(handle):
                extra = set(line) - {"rank", "trial", "state", "validation_loss", "run_dir", "note"}
                rows.append({
                    "rank": int(line["rank"]) if line.get("rank") else None, "trial": int(line["trial"]),
                    "state": line["state"], "value": float(line["validation_loss"]) if line.get("validation_loss") else None,
                    "params": {key: _csv_value(line[key]) for key in record["space"] if key in extra and line[key] != ""},
                    "note": line.get("note") or "",
                    "run_dir": str(sweep_dir / Path(line["run_dir"]).name) if line.get("run_dir") else "",
                })
    except FileNotFoundError:
        pass  # no trial has ended yet
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{sweep_dir / TABLE_FILE} cannot be read ({visible(str(exc), 200)}).") from None
    best = sweep_dir / BEST_FILE
    try:
        refuse_if_in_use(sweep_dir)
        running = False
    except UserError:
        running = True
    for row in rows:
        if row["state"] == RUNNING and not running:  # the sweep's process ended during it (kill -9)
            row["state"] = STOPPED
            row["note"] = "the sweep stopped during it; the same command runs its values again as a new trial"
    return {"sweep_dir": str(sweep_dir), "record": record, "trials": rows,
            "best_config": best.read_text(errors="replace") if best.is_file() else None,
            "plots": [name for name in (HISTORY_FILE, IMPORTANCE_FILE) if (sweep_dir / name).is_file()],
            "running": running}


def _csv_value(text: str):
    """A value trials.csv holds as text, back as the number it was (a choice that is text stays text)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def sweep_result(study: optuna.Study, space: Sequence[Param], sweep_dir: Path, config_path,
                 overrides: Sequence[str]) -> dict:
    """The end of a sweep: trials.csv, best.yaml (the config with the best trial's values, every key written
    out, output.dir left empty; the sweep's own trial settings are not in it), history.png and importance.png.
    Returns {"sweep_dir", "trials": the ranked rows, "best": {...} or None, "files": {...}, "notes": [...]}."""
    rows = ranked_rows(study, space)
    files = {"table": str(write_table(study, space, sweep_dir))}
    notes: list[str] = []
    best = next((row for row in rows if row["state"] == COMPLETE), None)
    if best is not None:
        cfg = load_config(config_path, [*overrides, *(set_line(k, v) for k, v in best["params"].items())])
        cfg.output.dir = None
        header = (f"# The best trial of the sweep in {sweep_dir}: trial {best['trial']}, validation loss "
                  f"{best['value']:.6g} ({best['run_dir']}).\n# {config_path} with its values; train it with: "
                  f"tunesmith train {sweep_dir / BEST_FILE}\n")
        atomic_write_text(sweep_dir / BEST_FILE, header + resolved_yaml(cfg))
        files["best_config"] = str(sweep_dir / BEST_FILE)
        best = {**best, "config": str(sweep_dir / BEST_FILE)}
    else:
        notes.append("no trial completed, so there is no best config.")
    for name, drawn in ((HISTORY_FILE, _draw_history(study, sweep_dir / HISTORY_FILE)),
                        (IMPORTANCE_FILE, _draw_importance(study, space, sweep_dir / IMPORTANCE_FILE))):
        if drawn is None:
            files[name.split(".")[0]] = str(sweep_dir / name)
        else:
            notes.append(f"{name} not drawn: {drawn}")
    return {"sweep_dir": str(sweep_dir), "trials": rows, "best": best, "files": files, "notes": notes,
            "finished": _counted(study.get_trials(deepcopy=False))}


def _save_figure(axes, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
    figure.tight_layout()
    atomic_write_file(path, lambda tmp: figure.savefig(tmp, format="png", dpi=90))
    plt.close(figure)


@contextlib.contextmanager
def _plotting() -> Iterator[None]:
    """Optuna's matplotlib plots, drawn off screen (Agg), without their warnings (that they are experimental, that
    a few trials make a rough importance): the plot is a picture, the table says what is what."""
    import matplotlib

    matplotlib.use("Agg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _draw_history(study: optuna.Study, path: Path) -> str | None:
    """history.png: each complete trial's validation loss and the best so far; None, or why it was not drawn."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return "no trial completed."
    with _plotting():
        from optuna.visualization.matplotlib import plot_optimization_history

        _save_figure(plot_optimization_history(study, target_name="validation loss"), path)
    return None


def _draw_importance(study: optuna.Study, space: Sequence[Param], path: Path) -> str | None:
    """importance.png: how much each key mattered to the best validation losses (Optuna's PED-ANOVA: numpy only;
    its default, fANOVA, needs scikit-learn, which tunesmith does not depend on); None, or why it was not drawn."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < IMPORTANCE_MIN_TRIALS:
        return f"it needs {IMPORTANCE_MIN_TRIALS} complete trials, and {len(complete)} completed."
    if not any(len({json.dumps(t.params.get(p.key)) for t in complete}) > 1 for p in space):
        return "the complete trials all have the same values."
    with _plotting():
        from optuna.importance import PedAnovaImportanceEvaluator
        from optuna.visualization.matplotlib import plot_param_importances

        try:
            axes = plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator(),
                                          target_name="validation loss")
        except (ImportError, RuntimeError, ValueError) as exc:
            return f"Optuna could not compute the importances ({visible(str(exc), 200)})."
        _save_figure(axes, path)
    return None
