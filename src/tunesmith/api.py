"""tunesmith's public functions: what the CLI, the studio and a notebook call.

Every front end goes through here; none holds training, evaluation or export logic of its own.

    from tunesmith import api
    cfg = api.load_config("examples/quickstart.yaml", ["training.max_steps=20"])
    run_dir = api.new_run_dir("examples/quickstart.yaml", cfg)
    summary = api.train(cfg, run_dir)                 # in this process, with the before/after evaluation
    run = api.start_run("examples/quickstart.yaml")   # or as a child process ...
    for event in run.events():                        # ... followed from its run folder
        print(event.kind, event.data.get("loss", ""), event.message or "")
    run.stop()                                        # checkpoint and stop, as Ctrl-C does; api.resume(run.run_dir)
    api.evaluate(run_dir); api.merge(run_dir, "merged"); api.export(run_dir, "model.gguf")

Progress lines and notices go through `logging` (the `tunesmith` logger, see tunesmith.logs).
A run folder holds `status.json` once its training process ends: {"state": "finished" | "failed" |
"interrupted", "message": the sentence, ...}; `follow` reads it, with `metrics.jsonl`, to report a run's events.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tunesmith import config as _config
from tunesmith.config import Config
from tunesmith.convert import Conversion, convert_file, write_conversion
from tunesmith.data import format_inspection, inspect_file
from tunesmith.distill.run import run_distillation
from tunesmith.doctor import doctor_report, format_doctor
from tunesmith.errors import UserError
from tunesmith.evaluate.runner import evaluate_run
from tunesmith.evaluate.suite import BeforeAfter
from tunesmith.hardware import detect_device
from tunesmith.models import BUILTIN_MODELS, load_tokenizer, resolve_model_source
from tunesmith.models.run_folder import open_run
from tunesmith.models.validated import format_matrix, load_matrix
from tunesmith.plan.estimate import Estimate, estimate_if_possible, parse_size
from tunesmith.plan.estimate import estimate as _estimate
from tunesmith.plan.matrix import MatrixResult, agreement_sweep, estimate_matrix, matrix_json, matrix_report
from tunesmith.plan.matrix import models_summary as estimated_matrix_summary
from tunesmith.plan.sweep import SweepInterrupted, read_sweep, run_sweep
from tunesmith.prefer import make_recipe
from tunesmith.ship.chat import chat_repl, load_for_chat, stream_reply
from tunesmith.ship.gguf_export import export_gguf
from tunesmith.ship.merge import merge_run
from tunesmith.ship.serve import ModelServer, build_app, is_loopback, load_generator, make_server
from tunesmith.train import distributed
from tunesmith.train.checkpoint import list_checkpoints
from tunesmith.train.child import RunEvent, RunProcess, follow, last_sentence, spawn, stop
from tunesmith.train.folder_lock import (
    HELD_BY_LAUNCHER,
    disk_full_sentence,
    hold_run_folder,
    out_of_space,
    refuse_if_in_use,
    refuse_if_used,
    remove_unstarted_run,
)
from tunesmith.train.loop import TrainingInterrupted, run_training
from tunesmith.train.resumable import check_resumable
from tunesmith.train.status import STATUS_FILE, read_status, write_status

log = logging.getLogger(__name__)
__all__ = [
    "Config", "Launch", "RunEvent", "RunProcess", "UserError", "BUILTIN_MODELS",
    "load_config", "load_config_text", "estimate", "check_fit", "Estimate", "parse_size", "new_run_dir", "train", "train_job", "start_run", "follow", "stop", "resume", "distill",
    "evaluate", "merge", "export", "inspect_data", "format_inspection", "doctor", "format_doctor", "validated_matrix",
    "format_matrix", "read_status", "existing_run_dir", "JobResult", "load_chat", "reply", "chat_repl",
    "serving_app", "load_base_chat", "last_sentence", "make_server", "ModelServer", "is_loopback", "process_rank", "end_process",
    "TrainingInterrupted",
    "sweep", "SweepInterrupted", "read_sweep",
    "estimate_matrix", "MatrixResult", "agreement_sweep", "matrix_report", "matrix_json", "estimated_matrix_summary",
    "convert_config", "Conversion",
]


# --- configs and run folders

def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The config in `path` (None: every default) with `--set`-style overrides, validated; a UserError names the
    key, what was given and what is allowed."""
    return _config.load_config(path, list(overrides))


def load_config_text(text: str, overrides: Sequence[str] = (), source: str = "config") -> Config:
    """`load_config` for YAML held as text (the studio's config view), with the same checks as a file."""
    return _config.load_config_text(text, list(overrides), source)


def convert_config(path: str | Path, out: str | Path, tool: str | None = None, model: str | None = None,
                   data: Sequence[str] = (), force: bool = False) -> Conversion:
    """Convert an axolotl or LLaMA-Factory training YAML (`tool`: "axolotl" or "llamafactory"; None tells it from
    the keys) into a tunesmith config written to `out` (validated first; an existing `out` only with `force`, the
    source never).  `model` replaces the model it names, `data` the paths of its data sets in order.  The result
    lists the keys not carried over, with the reasons, and the values that took a judgement."""
    conversion = convert_file(path, tool, model, list(data))
    write_conversion(conversion, out, force)
    return conversion


def _default_run_dir(config_path: str | Path | None) -> Path:
    stem = Path(config_path).stem if config_path else "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(config_path: str | Path | None, cfg: Config, output: str | Path | None = None) -> Path:
    """Where a new run goes: `output`, else the config's output.dir, else runs/<config name>-<time>.
    An existing run is never written over."""
    run_dir = Path(output or cfg.output.dir or _default_run_dir(config_path))
    refuse_if_in_use(run_dir)
    refuse_if_used(run_dir)
    return run_dir


def existing_run_dir(cfg: Config, output: str | Path | None = None, machine_rank: int = 0) -> Path:
    """The folder of the run to continue (`--resume`): `output`, else the config's output.dir."""
    if not (output or cfg.output.dir):
        raise UserError("--resume needs the run folder: give --output DIR, or the run's own config.yaml.")
    run_dir = Path(output or cfg.output.dir)
    if not run_dir.is_dir():
        elsewhere = (f" Every machine of the job reads the checkpoint, so machine {machine_rank} needs the run "
                     "folder at the same path as machine 0 (a shared file system, or a copy of it)."
                     if machine_rank else "")
        raise UserError(f"--resume: {run_dir} does not exist; give the folder of the run to continue.{elsewhere}")
    refuse_if_in_use(run_dir)
    if not machine_rank:
        check_resumable(cfg, run_dir)
    return run_dir


# --- training

def train(cfg: Config, run_dir: str | Path, resume: bool = False, estimate: Estimate | None = None) -> dict:
    """Train in this process as `cfg` says into `run_dir` (continue from its newest checkpoint with `resume`),
    with the base-vs-tuned evaluation when `eval.enabled`; returns the summary written to summary.json.
    The run folder is locked while it trains (a second writer gets a sentence naming this process); a new run
    that fails before its first step leaves no folder behind.  status.json says how the run ended (finished,
    interrupted or failed, with the sentence).  `estimate` (from `api.estimate`) goes into summary.json and
    report.md beside what the run measured."""
    run_dir = Path(run_dir)
    cfg.output.dir = str(run_dir)
    main = distributed.world_from_env().rank == 0
    with _writing(run_dir, "resuming a run" if resume else "training", resume, main):
        if main and resume:
            check_resumable(cfg, run_dir)
            (run_dir / STATUS_FILE).unlink(missing_ok=True)  # the stopped run's; this one writes its own
        try:
            recipe, evaluation = make_recipe(cfg)  # objective dpo, kto, grpo ...: the loop's hooks; sft: None
            summary = run_training(cfg, run_dir, resume=resume, evaluation=evaluation or BeforeAfter,
                                   estimate=estimate.to_json() if estimate is not None else None, recipe=recipe)
        except TrainingInterrupted as exc:
            _final_status(main, run_dir, "interrupted", str(exc))
            raise
        except UserError as exc:
            _final_status(main, run_dir, "failed", str(exc))
            raise
        except BaseException as exc:  # our bug, or Ctrl-C twice: the folder says so, the traceback stays
            if out_of_space(exc):  # a full disk is not our bug: a sentence (written where there is room)
                sentence = _disk_full(run_dir, exc)
                _final_status(main, run_dir, "failed", sentence)
                raise UserError(sentence) from None
            _final_status(main, run_dir, "failed", f"{type(exc).__name__}: {exc}")
            raise
        _final_status(main, run_dir, "finished", f"finished: {summary['train']['steps']} steps", summary="summary.json")
    return summary


@contextlib.contextmanager
def _writing(run_dir: Path, doing: str, resume: bool, main: bool = True):
    """Hold the run folder's lock while the block writes into it (the first process of a job; the others work
    under its lock); a new run that fails before its first step leaves nothing behind."""
    if not main:
        yield
        return
    made = not run_dir.exists()
    with hold_run_folder(run_dir, doing):
        if not resume:  # another run may have got there between the caller's check and the lock
            refuse_if_used(run_dir)
        try:
            yield
        except BaseException:
            if not resume and not _trained_anything(run_dir):
                remove_unstarted_run(run_dir, made)
            raise


def _trained_anything(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return bool(list_checkpoints(run_dir)) or (metrics.is_file() and metrics.stat().st_size > 0)


def _final_status(main: bool, run_dir: Path, state: str, message: str, **extra) -> None:
    """Write status.json (the first process); a full disk must not turn the run's own sentence into a traceback."""
    if not main:
        return
    try:
        write_status(run_dir, state, message, **extra)
    except OSError as exc:
        log.warning(f"tunesmith: could not write {run_dir / STATUS_FILE} ({exc.strerror or exc})")


def _disk_full(run_dir: Path, exc: BaseException) -> str:
    what = f"writing {exc.filename} failed" if getattr(exc, "filename", None) else "a file of the run was not written"
    return disk_full_sentence(run_dir, what, list_checkpoints(run_dir))


def resume(run_dir: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Continue a stopped or crashed run in this process from its newest valid checkpoint."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides)
    return train(cfg, existing_run_dir(cfg, run_dir), resume=True)


@dataclass
class Launch:
    """How many training processes, on how many machines (`tunesmith train --nproc ... --num-machines ...`)."""

    nproc: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None
    memory_limit: int | None = None  # bytes the fit check assumes this machine has (default: what is free)
    fit_check: bool = True  # estimate first and stop with the sentence when the run will not fit


@dataclass
class JobResult:
    run_dir: Path
    exit_code: int
    summary: dict | None = None  # the first process's summary; None in the others and for a launcher
    main: bool = True


def train_job(config_path: str | Path | None, overrides: Sequence[str] = (), output: str | Path | None = None,
              resume: bool = False, launch: Launch | None = None) -> JobResult:
    """`tunesmith train`: load the config, pick the run folder, and train: in this process, as one process of a
    job started by torchrun / accelerate launch (the first process picks the folder and tells the others), or
    by starting `launch.nproc` processes on this machine and waiting for them."""
    launch = launch or Launch()
    cfg = load_config(config_path, overrides)
    if cfg.teacher.name:
        raise UserError(f"{config_path}: teacher.name is set, so this is a distillation config; run "
                        f"`tunesmith distill {config_path}` (or remove the teacher: section to fine-tune).")
    if launch.nproc < 1 or launch.num_machines < 1:
        raise UserError("--nproc and --num-machines count processes and machines: give 1 or more.")
    checked = None
    if not resume and distributed.world_from_env().size == 1 and (launch.fit_check or launch.memory_limit):
        checked = check_fit(cfg, launch.memory_limit, launch.nproc, refuse=launch.fit_check)
    if launch.nproc > 1 or launch.num_machines > 1:
        run_dir = _job_run_dir(config_path, cfg, output, resume, launch.machine_rank)
        if launch.machine_rank:  # machine 0's launcher holds the run folder
            return JobResult(run_dir, _launch_processes(config_path, overrides, cfg, run_dir, resume, launch), None)
        made = not run_dir.exists()
        with _writing(run_dir, f"training as {launch.nproc} processes", resume):
            os.environ[HELD_BY_LAUNCHER] = str(run_dir.resolve())  # the processes it starts work under its lock
            try:
                code = _launch_processes(config_path, overrides, cfg, run_dir, resume, launch)
            finally:
                os.environ.pop(HELD_BY_LAUNCHER, None)
            if code and not resume and not _trained_anything(run_dir):
                remove_unstarted_run(run_dir, made)
        return JobResult(run_dir, code, None)
    if distributed.world_from_env().size > 1:
        # A built-in or .gguf model is converted into this machine's cache before the process group starts
        # (transformers writes a model only from process 0 of a started group); the processes take turns.
        resolve_model_source(cfg.model.name)
    world = distributed.start(detect_device(), cfg.distributed.timeout_s)
    if world.size == 1:
        run_dir = _job_run_dir(config_path, cfg, output, resume, 0)
    else:  # the first process picks the folder (a default name holds the time) and tells the others
        choice: Path | UserError
        try:
            choice = _job_run_dir(config_path, cfg, output, resume, launch.machine_rank) if world.main else Path()
        except UserError as exc:
            choice = exc
        choice = distributed.broadcast_object(choice, world, "agreeing on the run folder")
        if isinstance(choice, UserError):
            if world.main:
                raise choice
            return JobResult(Path(), 2, None, main=False)
        run_dir = choice
    log.info(f"tunesmith: {'resuming' if resume else 'training into'} {run_dir}")
    summary = train(cfg, run_dir, resume=resume, estimate=checked)
    return JobResult(run_dir, 0, summary if world.main else None, main=world.main)


def estimate(config_path: str | Path | None = None, overrides: Sequence[str] = (), memory_limit: int | str | None = None,
             probe: bool = False, nproc: int = 1, cfg: Config | None = None) -> Estimate:
    """Will the run fit, and how long will it take (see tunesmith.plan.estimate)?  `memory_limit` (bytes or a
    size such as "8GiB") stands in for this machine's free memory; `probe` times a few real steps of the run."""
    cfg = cfg if cfg is not None else load_config(config_path, overrides)
    if isinstance(memory_limit, str):
        memory_limit = parse_size(memory_limit)
    return _estimate(cfg, memory_limit=memory_limit, run_probe=probe, nproc=nproc, config_path=config_path,
                     overrides=overrides)


def check_fit(cfg: Config, memory_limit: int | None = None, nproc: int = 1, refuse: bool = True) -> Estimate | None:
    """What `tunesmith train` does first: the estimate, said in one line; a run that will not fit stops here,
    before anything loads (unless `refuse` is off).  An estimate that cannot be made is a notice, not a stop:
    the run itself says what is wrong, if anything is."""
    est = estimate_if_possible(cfg, memory_limit, nproc)
    if est is None:
        return None
    log.info(f"tunesmith: estimate: {est.sentence()}")
    if refuse and not est.fits:
        raise UserError(f"{est.sentence()} Nothing was loaded. To try anyway: tunesmith train ... --no-fit-check.")
    return est


def _job_run_dir(config_path, cfg: Config, output, resume: bool, machine_rank: int) -> Path:
    if resume:
        return existing_run_dir(cfg, output, machine_rank)
    if machine_rank:  # machine 0 picks and writes the folder; its first process tells the others
        return Path(output or cfg.output.dir or _default_run_dir(config_path))
    return new_run_dir(config_path, cfg, output)


def _launch_processes(config_path, overrides: Sequence[str], cfg: Config, run_dir: Path, resume: bool,
                      launch: Launch) -> int:
    """This process starts `launch.nproc` training processes (this machine's share of the job) and waits."""
    if distributed.world_from_env().size > 1:
        raise UserError("--nproc: this process is already one of several (started by torchrun or accelerate "
                        "launch); leave --nproc and --num-machines out there.")
    if cfg.distributed.strategy != "ddp":
        distributed.refuse_unshardable(cfg)  # once here, rather than once from every process
    argv = ["train", str(config_path), "--output", str(run_dir)] + [x for item in overrides for x in ("--set", item)]
    argv += ["--resume"] if resume else []
    world_size = launch.nproc * launch.num_machines

    def after_failure() -> str:
        if launch.num_machines > 1 and launch.machine_rank != 0:
            return "Machine 0 holds the run folder and its checkpoints."
        if not (run_dir / "config.yaml").is_file():
            return ""  # it stopped before training began: its own message says why
        saved = list_checkpoints(run_dir)
        if not saved:
            return "No checkpoint was saved yet (training.save_steps); start the run again into a new --output folder."
        return (f"The newest checkpoint is {saved[-1]}; continue with: tunesmith train {run_dir / 'config.yaml'} "
                f"--resume --nproc {launch.nproc}"
                + (f" --num-machines {launch.num_machines} ..." if launch.num_machines > 1 else ""))

    log.info(f"tunesmith: starting {launch.nproc} of the job's {world_size} training processes on this machine")
    return distributed.launch(argv, launch.nproc, launch.num_machines, launch.machine_rank, launch.main_process_ip,
                              launch.main_process_port, after_failure)


def process_rank() -> int:
    """This process's number in a job of several (0 when alone)."""
    return distributed.world_from_env().rank


def end_process(code: int) -> int:
    """The exit code for a front end to return; one process of several leaves its process group here first
    (and ends at once, so no engine's thread can abort it at teardown)."""
    if "torch.distributed" in sys.modules:
        return distributed.leave(code)
    return code


# --- a run in a child process, followed from its folder (tunesmith.train.child)

def start_run(config_path: str | Path, overrides: Sequence[str] = (), output: str | Path | None = None,
              resume: bool = False, nproc: int = 1, log_file: str | Path | None = None,
              detach: bool = False) -> RunProcess:
    """Start `tunesmith train` in a child process and return at once; the run folder is chosen (and checked)
    here, so the caller knows where to follow it.  The child's output goes to `log_file` (appended; default a
    new temporary file).  With `detach` the child runs in a session of its own, so it keeps training when the
    caller ends, however it ends (the studio re-attaches to it by process id)."""
    cfg = load_config(config_path, overrides)
    run_dir = existing_run_dir(cfg, output) if resume else new_run_dir(config_path, cfg, output)
    argv = [sys.executable, "-m", "tunesmith.cli", "train", str(config_path), "--output", str(run_dir),
            "--nproc", str(nproc)] + [x for item in overrides for x in ("--set", item)]
    argv += ["--resume"] if resume else []
    return spawn(argv, run_dir, log_file, detach)


# --- a search over settings (tunesmith.plan.sweep)

def sweep(config_path: str | Path, space_path: str | Path, trials: int, output: str | Path | None = None,
          overrides: Sequence[str] = (), nproc_per_trial: int = 1, storage: str | None = None,
          memory_limit: int | None = None, eval_after: bool = False) -> dict:
    """`tunesmith sweep`: Optuna searches the space in `space_path` over the config until `trials` trials have
    finished, each a run folder under the sweep's folder (default runs/sweep-<config name>); the same call
    continues a stopped sweep.  Returns the ranked trials, the best one and the files written (see
    tunesmith.plan.sweep); Ctrl-C raises SweepInterrupted."""
    return run_sweep(config_path, space_path, trials, output, overrides, nproc_per_trial, storage, memory_limit,
                     eval_after)


# --- distil, evaluate, ship

def distill(cfg: Config, run_dir: str | Path, cache_teacher: bool = False) -> dict:
    """A teacher teaches a student as `cfg` says (see tunesmith.distill.run), with the before/after evaluation."""
    if distributed.world_from_env().size > 1:
        raise UserError("tunesmith distill runs as one process; start it without torchrun or accelerate launch.")
    if cfg.objective.type != "sft":
        raise UserError(f"objective.type: {cfg.objective.type}: tunesmith distill trains a student on its teacher's "
                        "outputs (objective sft); tune the distilled run with `tunesmith train` and that objective "
                        "afterwards, or remove objective from this config.")
    run_dir = Path(run_dir)
    cfg.output.dir = str(run_dir)
    with _writing(run_dir, "distilling", resume=False):
        return run_distillation(cfg, run_dir, cache_teacher=cache_teacher, evaluation=BeforeAfter)


def evaluate(run_dir: str | Path, data: str | None = None, limit: int | None = None,
             overrides: Sequence[str] = ()) -> dict:
    """Base vs tuned on the run's held-out rows (or every row of `data`); writes RUN_DIR/eval/ and returns
    {"base", "tuned", "notes", "eval_dir"}.  The run folder is locked meanwhile, as training locks it."""
    if not Path(run_dir).is_dir():  # evaluate_run says what is wrong with the path
        return evaluate_run(run_dir, data=data, limit=limit, overrides=list(overrides))
    with hold_run_folder(run_dir, "evaluating"):
        return evaluate_run(run_dir, data=data, limit=limit, overrides=list(overrides))


def merge(run_dir: str | Path, out_dir: str | Path, dtype: str = "auto") -> dict:
    """Fold the run's adapter into its base model and save a plain Hugging Face folder in `out_dir`."""
    return merge_run(run_dir, out_dir, dtype=dtype)


def export(run_dir: str | Path, out_file: str | Path, quant: str = "f16", ollama: bool = False) -> dict:
    """Write the run's model (adapter merged in) as one GGUF file, with an Ollama Modelfile when `ollama`."""
    return export_gguf(run_dir, out_file, quant=quant, ollama=ollama)


def load_chat(run_dir: str | Path):
    """(model, tokenizer, task, the run's system prompt) of a run folder or a merged model folder, loaded for
    answering; a masked-language model is refused with a sentence."""
    return load_for_chat(run_dir)


def load_base_chat(model_name: str):
    """(model, tokenizer, task, system prompt None) for a base model as the config's model.name gives it (the
    built-in name, a local folder, a .gguf file), untuned: the "base" side of a comparison."""
    return load_for_chat(resolve_model_source(model_name))


def reply(model, tokenizer, messages: list[dict], task: str = "causal_lm", max_new_tokens: int = 512,
          temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
    """The answer to a conversation, as text pieces while it is generated (greedy unless `temperature` > 0):
    the one generation path chat, generate, serve and eval share (tunesmith.models.generate)."""
    return stream_reply(model, tokenizer, messages, task, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, seed=seed)


def serving_app(run_dir: str | Path, api_key: str | None = None, model_id: str | None = None,
                max_tokens_limit: int = 1024, merged: bool = True):
    """The OpenAI-compatible FastAPI app for a run (what `tunesmith serve` runs under uvicorn), for mounting
    in another app or testing; its generation worker is `app.state.generator` (close it when done)."""
    handle = open_run(run_dir)
    generator = load_generator(handle, merged=merged)
    app = build_app(generator, model_id or handle.path.resolve().name, api_key, max_tokens_limit)
    app.state.generator = generator
    return app


# --- data and the machine

def inspect_data(file: str | Path, config_path: str | Path | None = None, overrides: Sequence[str] = (),
                 with_tokens: bool = True) -> dict:
    """A data file's detected format, rows, token lengths (with the config's model tokenizer) and problems."""
    cfg = load_config(config_path, overrides)
    tokenizer = load_tokenizer(resolve_model_source(cfg.model.name), cfg.model) if with_tokens else None
    return inspect_file(str(file), tokenizer, cfg.data)


def doctor() -> dict:
    """What this machine can do: devices, precision, 4-bit, memory, library versions."""
    return doctor_report()


def validated_matrix() -> dict:
    """The family x method matrix that `python -m tunesmith.models.validated --write` last recorded."""
    return load_matrix()
