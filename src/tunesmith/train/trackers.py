"""Experiment trackers (`logging.report_to`): TensorBoard, MLflow and Weights & Biases beside metrics.jsonl.

Each tracker is one small class with the same three methods, called by the training loop (train/loop.py) on the
first process only:

    start(params, config_yaml, resumed_at, previous)
                                             the resolved config as hyperparameters (dotted keys), once the run
                                             folder exists; on --resume, `resumed_at` is the checkpoint's step and
                                             `previous` what start returned before (kept in RUN/trackers.json)
    log(record)                              every metrics.jsonl record (MetricsLog.write), numbers only, at its step
    finish(summary, files, status)           the summary's numbers, the run's files (training.png, report.md,
                                             summary.json), and how it ended: "finished", "failed" or "killed"

Constructing one imports its library, so a missing package is a sentence before anything is loaded.  Local by
default, nothing leaves the machine unless the config or the environment says so:
- tensorboard: event files in RUN/tensorboard (torch.utils.tensorboard's SummaryWriter; reading them back needs the
  tensorboard package anyway, so tensorboardX would only add a second writer of the same format).
- mlflow: a SQLite store RUN/mlruns/mlflow.db with artifacts in RUN/mlruns/artifacts, unless logging.tracking_uri or
  MLFLOW_TRACKING_URI names another.  SQLite rather than MLflow's plain-file store: MLflow 3.x keeps that one in
  maintenance mode and refuses to open it unless MLFLOW_ALLOW_FILE_STORE is set (mlflow/store/tracking/file_store.py).
- wandb: offline mode, files in RUN/wandb/offline-run-*, unless logging.tracking_uri (a W&B server) or WANDB_MODE
  says otherwise; `wandb sync` uploads them later.

A resumed run continues the same tracker run where the library allows; the ids are kept in RUN/trackers.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

from tunesmith.config import Config, LoggingConfig, resolved_yaml
from tunesmith.errors import UserError
from tunesmith.fileio import atomic_write_json
from tunesmith.train.resumable import dotted_keys

log = logging.getLogger(__name__)

STATE_FILE = "trackers.json"  # in the run folder: the mlflow run id and the wandb run id, for --resume

# What to pip install for each tracker: the package, or all three with the extra.
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}


def _missing(name: str, exc: ImportError) -> UserError:
    return UserError(
        f"logging.report_to: {name} needs the {PACKAGES[name]} package, which is not installed here ({exc}); "
        f"install it with `pip install 'tunesmith[trackers]'` (or `pip install {PACKAGES[name]}`), "
        f"or take {name} out of logging.report_to."
    )


def scalars(record: dict) -> tuple[int, dict[str, float]]:
    """(step, {tag: value}) of a metrics.jsonl record: its numeric fields, named `train/loss`, `validation/loss`
    (a validation record's `val_` prefix dropped), ...; None, text and true/false are left out."""
    group = "validation" if record.get("type") == "validation" else record.get("type", "train")
    values = {}
    for key, value in record.items():
        if key in ("type", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = key[4:] if group == "validation" and key.startswith("val_") else key
        values[f"{group}/{name}"] = float(value)
    return int(record["step"]), values


def summary_numbers(summary: dict) -> dict[str, float]:
    """The summary's finite numbers as `summary/<dotted key>` (lists, such as eval_samples and advice, left out)."""
    out = {}
    for key, value in dotted_keys(summary).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"summary/{key}"] = float(value)
    return out


def _as_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class TensorBoardTracker:
    """Scalars, the config (as text and as HParams) and, at the end, the report and plot in RUN/tensorboard."""

    name = "tensorboard"

    def __init__(self, settings: LoggingConfig, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter  # raises ImportError without the tensorboard package
        except ImportError as exc:
            raise _missing(self.name, exc) from None
        self._writer_class = SummaryWriter
        self.folder = run_dir / "tensorboard"
        self.writer = None
        self.last_step = 0

    def start(self, params: dict, config_yaml: str, resumed_at: int | None, previous: dict | None) -> dict:
        from torch.utils.tensorboard.summary import hparams

        # purge_step: a resumed run redoes the steps after its checkpoint, so their earlier events are dropped
        self.writer = self._writer_class(str(self.folder), flush_secs=10,
                                         purge_step=resumed_at + 1 if resumed_at is not None else None)
        self.last_step = resumed_at or 0
        # TensorBoard's text plugin renders markdown: an indented block keeps the YAML as it is
        self.writer.add_text("config", "\n".join("    " + line for line in config_yaml.splitlines()), self.last_step)
        # HParams: the same three summaries SummaryWriter.add_hparams writes, but into this run's folder instead of
        # a new timestamped one beside it; the metric names are those the HParams table shows
        shown = {k: v if isinstance(v, (int, float, str, bool)) else _as_text(v) for k, v in params.items()}
        for summary in hparams(shown, {"train/loss": 0.0, "validation/loss": 0.0}):
            self.writer.file_writer.add_summary(summary)
        return {}

    def log(self, record: dict) -> None:
        step, values = scalars(record)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.last_step = max(self.last_step, step)

    def finish(self, summary: dict | None, files: list[Path], status: str) -> None:
        if self.writer is None:
            return
        for tag, value in (summary_numbers(summary) if summary else {}).items():
            self.writer.add_scalar(tag, value, self.last_step)
        for path in files:
            if path.suffix == ".png":
                import matplotlib.image

                image = matplotlib.image.imread(path)[..., :3]  # [H, W, RGB(A)] floats in 0..1
                self.writer.add_image(path.stem, image, self.last_step, dataformats="HWC")
            else:
                self.writer.add_text(path.name, path.read_text(encoding="utf-8") if path.suffix == ".md"
                                     else "\n".join("    " + line for line in path.read_text().splitlines()),
                                     self.last_step)
        if status != "finished":
            self.writer.add_text("status", status, self.last_step)
        self.writer.close()
        self.writer = None


class MlflowTracker:
    """One MLflow run: params, metrics by step, then summary metrics and the run's files as artifacts."""

    name = "mlflow"

    def __init__(self, settings: LoggingConfig, run_dir: Path):
        try:
            from mlflow.entities import Metric, Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise _missing(self.name, exc) from None
        self._Metric, self._Param, self._error = Metric, Param, MlflowException
        self._client_class = MlflowClient
        self.settings = settings
        self.store = run_dir / "mlruns"
        self.uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.local = self.uri is None
        if self.local:
            self.uri = f"sqlite:///{(self.store.resolve() / 'mlflow.db').as_posix()}"
        self.run_name = settings.run_name or run_dir.name
        self.client = self.run_id = None
        self.last_step = 0

    def start(self, params: dict, config_yaml: str, resumed_at: int | None, previous: dict | None) -> dict:
        if self.local:
            self.store.mkdir(parents=True, exist_ok=True)
        try:
            self.client = self._client_class(tracking_uri=self.uri)
            known = {}
            if previous and previous.get("tracking_uri") == self.uri and resumed_at is not None:
                try:
                    known = self.client.get_run(previous["run_id"]).data.params
                    self.run_id = previous["run_id"]
                    self.client.update_run(self.run_id, status="RUNNING")
                except self._error:
                    self.run_id = None  # gone from the store: a new run
            if self.run_id is None:
                experiment = self._experiment(self.settings.project or "tunesmith")
                self.run_id = self.client.create_run(experiment, run_name=self.run_name).info.run_id
            # A param cannot change in MLflow: a resumed run adds the keys it did not log yet (config.yaml, logged
            # again below, has the values it resumed with)
            rows = [self._Param(k, _as_text(v)[:6000]) for k, v in params.items() if k not in known]
            for i in range(0, len(rows), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=rows[i:i + 100])
            self.client.log_text(self.run_id, config_yaml, "config.yaml")
        except self._error as exc:
            raise UserError(f"logging.report_to: mlflow could not start its run at {self.uri} ({exc}); check "
                            "logging.tracking_uri (or MLFLOW_TRACKING_URI), or leave both unset for a store in "
                            "the run folder.") from None
        self.last_step = resumed_at or 0
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = (self.store / "artifacts").resolve().as_uri() if self.local else None
        return self.client.create_experiment(name, artifact_location=location)

    def _metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._Metric(k, v, now, step) for k, v in values.items()])

    def log(self, record: dict) -> None:
        step, values = scalars(record)
        self._metrics(values, step)
        self.last_step = max(self.last_step, step)

    def finish(self, summary: dict | None, files: list[Path], status: str) -> None:
        if self.run_id is None:
            return
        if summary:
            self._metrics(summary_numbers(summary), self.last_step)
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "killed": "KILLED"}.get(status, "FAILED"))
        self.run_id = None


class WandbTracker:
    """One W&B run, offline unless told otherwise: config, history by step, summary, and the run's files."""

    name = "wandb"

    def __init__(self, settings: LoggingConfig, run_dir: Path):
        try:
            import wandb
        except ImportError as exc:
            raise _missing(self.name, exc) from None
        self._wandb = wandb
        self.settings = settings
        self.run_dir = run_dir
        self.run = None

    def start(self, params: dict, config_yaml: str, resumed_at: int | None, previous: dict | None) -> dict:
        wandb, s = self._wandb, self.settings
        options = {"console": "off", "silent": True, "disable_git": True, "save_code": False,
                   "x_save_requirements": False}  # no console capture (the progress bar), no copies of the code
        mode = None  # WANDB_MODE, when set, is wandb's to read
        if s.tracking_uri:
            options["base_url"] = s.tracking_uri
        elif not os.environ.get("WANDB_MODE"):
            mode = "offline"
        if mode == "offline" or os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
            # the system-stats and metadata threads probe cloud metadata addresses: nothing on the network offline
            options.update(x_disable_stats=True, x_disable_meta=True)
        run_id = previous.get("id") if previous and resumed_at is not None else None
        if run_id:
            self._next_second(run_id)
        # wandb puts its files in dir/wandb/; offline, a resumed run is a second offline-run-* folder with the same
        # id, which `wandb sync` adds to the first
        try:
            self.run = wandb.init(
                dir=str(self.run_dir), project=s.project or "tunesmith", name=s.run_name or self.run_dir.name,
                config=params, id=run_id, resume="allow" if run_id else None,
                mode=mode, settings=wandb.Settings(**options),
            )
        except wandb.errors.Error as exc:
            raise UserError(f"logging.report_to: wandb could not start its run ({exc}); check logging.tracking_uri "
                            "and WANDB_API_KEY, or set WANDB_MODE=offline.") from None
        return {"id": self.run.id}

    def _next_second(self, run_id: str) -> None:
        """wandb names a run's folder offline-run-<start time to the second>-<id>: a resume started within the same
        second as the part before it would write into that part's folder, over its .wandb file.  Wait until the
        name is a new one (a second at most)."""
        used = {folder.name.split("-")[-2] for folder in (self.run_dir / "wandb").glob(f"*run-*-{run_id}")}
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and {time.strftime("%Y%m%d_%H%M%S", time.localtime()),
                                                time.strftime("%Y%m%d_%H%M%S", time.gmtime())} & used:
            time.sleep(0.05)

    def log(self, record: dict) -> None:
        step, values = scalars(record)
        self.run.log(values, step=step)

    def finish(self, summary: dict | None, files: list[Path], status: str) -> None:
        if self.run is None:
            return
        if summary:
            self.run.summary.update(summary_numbers(summary))
        # The files go in the run's own files folder (W&B uploads it with the run); a W&B Artifact would be staged
        # in the user's cache folder, outside the run folder
        for path in files:
            copy = Path(self.run.dir) / path.name
            shutil.copyfile(path, copy)
            self.run.save(str(copy), base_path=self.run.dir, policy="now")
        self.run.finish(exit_code={"finished": 0, "killed": 255}.get(status, 1))
        self.run = None


Tracker = TensorBoardTracker | MlflowTracker | WandbTracker


def open_trackers(settings: LoggingConfig, run_dir: Path) -> list[Tracker]:
    """The trackers `logging.report_to` names, their libraries imported (a missing one: a UserError); nothing is
    written until `start_trackers`."""
    made = []
    for name in dict.fromkeys(settings.report_to):  # each once, in the order given
        if name == "tensorboard":
            made.append(TensorBoardTracker(settings, run_dir))
        elif name == "mlflow":
            made.append(MlflowTracker(settings, run_dir))
        elif name == "wandb":
            made.append(WandbTracker(settings, run_dir))
    return made


def start_trackers(trackers: list[Tracker], cfg: Config, run_dir: Path, resumed_at: int | None) -> None:
    """Each tracker's run begun with the resolved config (continued, on --resume, where the ids were kept)."""
    if not trackers:
        return
    state_path = run_dir / STATE_FILE
    previous = json.loads(state_path.read_text()) if resumed_at is not None and state_path.is_file() else {}
    params = dotted_keys(cfg.model_dump(mode="json"))
    config_yaml = resolved_yaml(cfg)
    state = {}
    for tracker in trackers:
        state[tracker.name] = tracker.start(params, config_yaml, resumed_at, previous.get(tracker.name))
    atomic_write_json(state_path, state)


def log_to_trackers(trackers: list[Tracker], record: dict) -> None:
    """One metrics.jsonl record to each tracker.  A tracker that fails mid-run (a server gone, a disk full) is
    dropped with a warning and its run closed as failed: the training goes on, and metrics.jsonl has every record."""
    for tracker in list(trackers):
        try:
            tracker.log(record)
        except Exception as exc:
            log.warning(f"logging.report_to: {tracker.name} failed at step {record.get('step')} ({exc}); the run goes "
                        "on without it (metrics.jsonl keeps every record)")
            trackers.remove(tracker)
            finish_trackers([tracker], None, [], "failed")


def finish_trackers(trackers: list[Tracker], summary: dict | None, files: list[Path], status: str) -> None:
    """Each tracker told how the run ended (`summary` and `files` when it finished).  One that fails to close is a
    warning: the run itself is done and saved by then."""
    for tracker in trackers:
        try:
            tracker.finish(summary, [path for path in files if path.is_file()], status)
        except Exception as exc:
            log.warning(f"logging.report_to: {tracker.name} did not close its run cleanly ({exc})")
