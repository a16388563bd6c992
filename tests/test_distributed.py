"""Several processes (gloo on CPU): the same steps as one process with the same global batch, a checkpoint
that resumes on one process, a killed process that ends the whole job with a sentence."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import save_tiny_model_folder
from safetensors.torch import load_file

from tunesmith import api
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.train import distributed

ROWS = [
    {"instruction": f"Repeat the word {w} {'twice' if i % 2 else 'three times'}.", "input": "",
     "output": " ".join([w] * (2 if i % 2 else 3))}
    for i, w in enumerate(["river", "stone", "cloud", "apple", "green", "music", "paper", "light", "house", "water",
                           "field", "chair", "bread", "sugar"])
]


def _overrides(model_dir, data, **extra):
    settings = {
        "model.name": model_dir, "data.path": data, "data.validation_split": 0.15, "eval.enabled": "false",
        "training.batch_size": 2, "training.max_steps": 6, "training.epochs": 100, "training.save_steps": 3,
        "training.learning_rate": 3e-3, "training.eval_steps": 3,
        "lora.dropout": 0.1,  # dropout masks must also be the ones one process draws
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


def _cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env, **kw)


def _set(overrides):
    return [x for item in overrides for x in ("--set", item)]


def _train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}


def _adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _launch(root, run_dir, overrides, extra=()):
    return subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "train", str(root / "cfg.yaml"), "--nproc", "2",
                             "--output", str(run_dir), *_set(overrides), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stopped_at_step_3(run_dir, stopped):
    """`stopped`: `run_dir` as if it had been killed after its step-3 checkpoint (config, metrics, that checkpoint)."""
    (stopped / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", stopped / "config.yaml")
    shutil.copy(run_dir / "metrics.jsonl", stopped / "metrics.jsonl")
    shutil.copytree(run_dir / "checkpoints" / "step-00000003", stopped / "checkpoints" / "step-00000003")
    return stopped


def _resume_from_step_3(run_dir, stopped, nproc, extra, losses, adapter):
    """`run_dir` stopped after its step-3 checkpoint, resumed on `nproc` processes: steps 4-6 and the adapter must be
    the uninterrupted run's (`losses`, `adapter`)."""
    _stopped_at_step_3(run_dir, stopped)
    result = _cli(["train", str(stopped / "config.yaml"), "--resume", "--nproc", nproc, "--output", str(stopped), *extra])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed_losses = _train_losses(stopped)
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(losses[step], abs=1e-4), (stopped.name, step)
    resumed = _adapter(stopped)
    for key, value in adapter.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-6)


@contextlib.contextmanager
def _long_job(root, run_dir, model_dir, data, **extra):
    """A 2-process run of 2000 steps (it is stopped long before): the launcher, killed on the way out if still alive."""
    launcher = _launch(root, run_dir, _overrides(model_dir, data, **{
        "training.max_steps": 2000, "training.save_steps": 2, "training.eval_steps": "null", **extra}))
    try:
        yield launcher
    finally:
        if launcher.poll() is None:
            launcher.kill()


def _ranks_once_a_checkpoint_exists(launcher, run_dir) -> dict:
    """{rank: psutil.Process} of the launcher's children, once the run has saved a checkpoint."""
    deadline = time.time() + 300
    while not (run_dir / "checkpoints").is_dir() or not any((run_dir / "checkpoints").glob("step-*")):
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    return {int(p.environ().get("RANK", -1)): p for p in psutil.Process(launcher.pid).children()}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One tiny model and data set; a 2-process run (micro-batch 2, accumulation 1) through `--nproc 2`."""
    root = tmp_path_factory.mktemp("ddp")
    model_dir, data = save_tiny_model_folder(root, ROWS)
    config = root / "cfg.yaml"
    config.write_text("{}\n")
    run_dir = root / "two"
    result = _cli(["train", str(config), "--nproc", "2", "--output", str(run_dir),
                   *_set(_overrides(model_dir, data, **{"training.gradient_accumulation": 1}))])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, model_dir, data, run_dir, result


def test_two_processes_take_the_steps_of_one_process_with_the_same_global_batch(two_process_run, tmp_path):
    root, model_dir, data, run_dir, result = two_process_run
    assert "global batch = micro-batch 2 x accumulation 1 x 2 processes = 4 rows per optimiser step" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["distributed"] == {"processes": 2, "strategy": "ddp", "global_batch_rows": 4,
                                      "micro_batches_per_step": 2}

    one = tmp_path / "one"
    api.train(load_config(None, _overrides(model_dir, data, **{"training.gradient_accumulation": 2})), one)

    two_losses, one_losses = _train_losses(run_dir), _train_losses(one)
    assert sorted(two_losses) == sorted(one_losses) == list(range(1, 7))
    for step in one_losses:
        assert two_losses[step] == pytest.approx(one_losses[step], abs=1e-4), step
    assert one_losses[6] < one_losses[1]  # it learned: the comparison is between runs that did something
    a, b = _adapter(run_dir), _adapter(one)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    # The validation loss the first process computed and shared is the one-process run's.
    assert summary["validation"]["loss"] == pytest.approx(
        json.loads((one / "summary.json").read_text())["validation"]["loss"], abs=1e-4)


def test_a_checkpoint_from_two_processes_resumes_on_one(two_process_run, tmp_path):
    root, model_dir, data, run_dir, _ = two_process_run
    stopped = _stopped_at_step_3(run_dir, tmp_path / "stopped")

    cfg = load_config(stopped / "config.yaml")
    assert cfg.training.gradient_accumulation == 1  # one process alone would take half the rows per step...
    resumed = api.train(cfg, stopped, resume=True)  # ...but the checkpoint's steps are kept

    assert resumed["train"]["steps"] == 6
    two_losses, resumed_losses = _train_losses(run_dir), _train_losses(stopped)
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(two_losses[step], abs=1e-4), step
    a, b = _adapter(run_dir), _adapter(stopped)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


def _two_machines(root, tmp_path, run_dir, overrides):
    """`tunesmith train` on two "machines" of one process each, started as on a real cluster (the same command
    with --machine-rank 0 and 1), each with its own TUNESMITH_HOME (tmp_path/home0, home1) as each machine has its
    own disk: [(stdout, stderr)] of machine 0 and machine 1, both asserted to have succeeded."""
    port = distributed._free_port()
    machines = [subprocess.Popen(
        [sys.executable, "-m", "tunesmith.cli", "train", str(root / "cfg.yaml"), "--output", str(run_dir),
         "--nproc", "1", "--num-machines", "2", "--machine-rank", str(rank), "--main-process-ip", "127.0.0.1",
         "--main-process-port", str(port), *_set(overrides)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env=dict(os.environ, TUNESMITH_HOME=str(tmp_path / f"home{rank}"), PYTHONUNBUFFERED="1")) for rank in (0, 1)]
    outputs = [launcher.communicate(timeout=600) for launcher in machines]
    assert [launcher.returncode for launcher in machines] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    return outputs


def test_two_machines_each_tokenising_into_its_own_cache_take_the_steps_of_one(two_process_run, tmp_path):
    """Two "machines" on this host, one process each, joined through --num-machines/--machine-rank/
    --main-process-ip as on a real cluster; each has its own TUNESMITH_HOME, as each machine has its own disk."""
    root, model_dir, data, ddp_dir, _ = two_process_run
    run_dir = tmp_path / "run"
    (out0, err0), (out1, err1) = _two_machines(root, tmp_path, run_dir, _overrides(model_dir, data, **{
        "training.gradient_accumulation": 1}))
    for out in (out0, out1):
        assert "starting 1 of the job's 2 training processes on this machine" in out
    # Machine 0's first process prints for the job; machine 1 says nothing past its launcher's line.
    assert "global batch = micro-batch 2 x accumulation 1 x 2 processes = 4 rows per optimiser step" in out0
    assert "global batch" not in out1 and "Traceback" not in err0 + err1
    for home in (tmp_path / "home0", tmp_path / "home1"):  # each machine tokenised the data into its own cache
        assert len(list((home / "tokenized").iterdir())) >= 1, home
    # The job is the --nproc 2 job on one machine: the same steps and adapter.
    losses, ddp_losses = _train_losses(run_dir), _train_losses(ddp_dir)
    assert sorted(losses) == sorted(ddp_losses) == list(range(1, 7))
    for step in ddp_losses:
        assert losses[step] == pytest.approx(ddp_losses[step], abs=1e-4), step
    final = _adapter(run_dir)
    for name, value in _adapter(ddp_dir).items():
        torch.testing.assert_close(final[name], value, rtol=1e-4, atol=1e-6)
    # A resume on machine 1 without the run folder is stopped with a sentence that says what machine 1 lacks.
    result = _cli(["train", str(root / "cfg.yaml"), "--output", str(tmp_path / "elsewhere"), "--resume",
                   "--nproc", "1", "--num-machines", "2", "--machine-rank", "1", "--main-process-ip", "127.0.0.1"])
    assert result.returncode == 2
    assert "machine 1 needs the run folder at the same path as machine 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_gguf_model_is_converted_on_each_machine_before_the_job_starts(two_process_run, tmp_path):
    """A .gguf (or built-in) model is dequantised into each machine's cache. Machine 1's process is process 1 of
    the job, and transformers saves a model only from process 0 once a process group is up: the conversion must
    come first, or machine 1's cache gets a folder with no weights."""
    from tunesmith.ship.gguf_export import export_gguf

    root, model_dir, data, _, _ = two_process_run
    gguf = tmp_path / "tiny.gguf"
    export_gguf(model_dir, gguf, quant="f16")
    outputs = _two_machines(root, tmp_path, tmp_path / "run", _overrides(gguf, data, **{
        "training.max_steps": 2, "training.save_steps": "null", "training.eval_steps": "null"}))
    for rank, (out, err) in enumerate(outputs):
        assert "converting tiny.gguf to a safetensors folder" in out, rank
        assert "Traceback" not in err
        converted = list((tmp_path / f"home{rank}" / "models").glob("gguf-tiny-*"))
        assert len(converted) == 1 and (converted[0] / "config.json").is_file(), rank
        assert list(converted[0].glob("*.safetensors")), rank
    assert sorted(_train_losses(tmp_path / "run")) == [1, 2]


def test_fsdp_takes_the_same_steps_and_its_sharded_checkpoint_resumes_sharded_or_not(two_process_run, tmp_path):
    root, model_dir, data, ddp_dir, _ = two_process_run
    fsdp_dir = tmp_path / "fsdp"
    overrides = _overrides(model_dir, data, **{"training.gradient_accumulation": 1, "distributed.strategy": "fsdp",
                                               "training.save_total_limit": 3})
    result = _cli(["train", str(root / "cfg.yaml"), "--nproc", "2", "--output", str(fsdp_dir), *_set(overrides)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "sharded over the processes (FSDP)" in result.stdout
    assert json.loads((fsdp_dir / "summary.json").read_text())["distributed"]["strategy"] == "fsdp"
    # The DDP run took one process's steps (the test above); FSDP takes the same ones.
    ddp_losses, fsdp_losses = _train_losses(ddp_dir), _train_losses(fsdp_dir)
    for step in ddp_losses:
        assert fsdp_losses[step] == pytest.approx(ddp_losses[step], abs=1e-4), step
    final = _adapter(fsdp_dir)
    for name, value in _adapter(ddp_dir).items():
        torch.testing.assert_close(final[name], value, rtol=1e-4, atol=1e-6)

    # Checkpoints hold whole tensors: step 3 resumes sharded on 2 processes and unsharded on one, to the same end.
    for name, nproc in (("again-fsdp", "2"), ("again-one", "1")):
        _resume_from_step_3(fsdp_dir, tmp_path / name, nproc, [], fsdp_losses, final)


def test_deepspeed_zero_2_and_3_take_the_same_steps_and_their_checkpoints_resume_anywhere(two_process_run, tmp_path):
    root, model_dir, data, ddp_dir, _ = two_process_run
    ddp_losses, ddp_adapter = _train_losses(ddp_dir), _adapter(ddp_dir)
    for stage in (2, 3):
        run_dir = tmp_path / f"zero{stage}"
        overrides = _set(_overrides(model_dir, data, **{"training.gradient_accumulation": 1}))
        train = ["train", str(root / "cfg.yaml"), "--output", str(run_dir), *overrides]
        if stage == 2:  # through the config and --nproc
            result = _cli([*train, "--nproc", "2", "--set", "distributed.strategy=deepspeed"])
        else:  # through accelerate's own flags, which the run follows
            result = subprocess.run(
                [str(Path(sys.executable).parent / "accelerate"), "launch", "--use_deepspeed", "--zero_stage", "3",
                 "--num_processes", "2", "--main_process_port", str(distributed._free_port()), "-m", "tunesmith.cli",
                 *train], capture_output=True, text=True, timeout=600)
            assert "accelerate launch chose distributed.strategy: deepspeed, distributed.zero_stage: 3" in result.stdout
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"DeepSpeed ZeRO stage {stage} shards" in result.stdout
        assert "Traceback" not in result.stderr
        ran = json.loads((run_dir / "summary.json").read_text())["distributed"]
        assert (ran["strategy"], ran["zero_stage"]) == ("deepspeed", stage)
        losses = _train_losses(run_dir)
        for step in ddp_losses:  # the DDP run took one process's steps (the first test); ZeRO takes the same ones
            assert losses[step] == pytest.approx(ddp_losses[step], abs=1e-4), (stage, step)
        final = _adapter(run_dir)
        for name, value in ddp_adapter.items():
            torch.testing.assert_close(final[name], value, rtol=1e-4, atol=1e-6, msg=lambda m, stage=stage: f"stage {stage}: {m}")

    # A ZeRO checkpoint holds whole tensors (weights, AdamW's moments): stage 3's resumes into stage 2's partitions
    # and on one process alone, and each ends where the uninterrupted run ended.  (Stage 2's into stage 3's is the
    # same code path the other way round: the checkpoint is written whole by either stage; left out for time.)
    for name, source, nproc, stage in (("again-zero2", "zero3", "2", "2"), ("again-one", "zero3", "1", "3")):
        _resume_from_step_3(tmp_path / source, tmp_path / name, nproc, ["--set", f"distributed.zero_stage={stage}"],
                            ddp_losses, ddp_adapter)


def test_qlora_under_fsdp_and_zero_2_takes_the_steps_of_one_process(two_process_run, tmp_path):
    """The 4-bit base stays whole in each process (FSDP leaves it out of its shards; ZeRO-2 shards only what
    trains); what trains is sharded, and the steps are one process's."""
    root, model_dir, data, _, _ = two_process_run
    settings = {"method": "qlora", "training.max_steps": 3, "training.save_steps": "null", "training.eval_steps": "null"}
    one = tmp_path / "one"
    api.train(load_config(None, _overrides(model_dir, data, **settings, **{"training.gradient_accumulation": 2})), one)
    one_losses, one_adapter = _train_losses(one), _adapter(one)
    for name, strategy in (("fsdp", {"distributed.strategy": "fsdp"}),
                           ("zero2", {"distributed.strategy": "deepspeed", "distributed.zero_stage": 2})):
        run_dir = tmp_path / name
        result = _cli(["train", str(root / "cfg.yaml"), "--nproc", "2", "--output", str(run_dir), *_set(_overrides(
            model_dir, data, **settings, **strategy, **{"training.gradient_accumulation": 1}))])
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        losses = _train_losses(run_dir)
        assert sorted(losses) == sorted(one_losses) == [1, 2, 3]
        for step in one_losses:
            assert losses[step] == pytest.approx(one_losses[step], abs=1e-4), (name, step)
        adapter = _adapter(run_dir)
        for key, value in one_adapter.items():
            torch.testing.assert_close(adapter[key], value, rtol=1e-4, atol=1e-6)


def test_fsdp_refuses_what_it_cannot_shard(two_process_run, tmp_path):
    root, model_dir, data, _, _ = two_process_run
    launcher = _launch(root, tmp_path / "q", _overrides(model_dir, data, **{"distributed.strategy": "fsdp",
                                                                             "method": "adalora"}))
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 2
    assert "distributed.strategy: fsdp: method adalora keeps state that cannot be sharded here" in err
    assert err.count("distributed.strategy: fsdp:") == 1  # said once, before any process started
    assert "use distributed.strategy: ddp" in err and "Traceback" not in err


def test_a_killed_process_ends_the_whole_job_with_a_sentence(two_process_run, tmp_path):
    root, model_dir, data, _, _ = two_process_run
    run_dir = tmp_path / "killed"
    with _long_job(root, run_dir, model_dir, data) as launcher:
        ranks = _ranks_once_a_checkpoint_exists(launcher, run_dir)
        assert sorted(ranks) == [0, 1]
        ranks[1].send_signal(signal.SIGKILL)
        # A hang guard, not a speed check: the collective timeout is 1800 s, so ending at all means the
        # launcher saw the death and stopped the other process rather than leaving it at the collective.
        _, err = launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    assert "process 1 of 2 was killed by SIGKILL; the other processes on this machine were stopped" in err
    assert f"continue with: tunesmith train {run_dir / 'config.yaml'} --resume --nproc 2" in err
    assert "Traceback" not in err
    assert not ranks[0].is_running() or ranks[0].status() == psutil.STATUS_ZOMBIE


def test_sigterm_stops_every_process_after_the_same_step_with_a_checkpoint(two_process_run, tmp_path):
    root, model_dir, data, _, _ = two_process_run
    run_dir = tmp_path / "stopped"
    with _long_job(root, run_dir, model_dir, data, **{"training.save_steps": 1000}) as launcher:
        deadline = time.time() + 300
        while len(_train_losses(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}) < 3:
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            assert time.time() < deadline, "three steps did not finish within 300 s"
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, err[-3000:]
    match = re.search(r"SIGTERM received: stopped after step (\d+) and saved (\S+)\. Continue with: "
                      r"tunesmith train (\S+) --resume --nproc 2", err)
    assert match, err[-3000:]
    step = int(match[1])
    assert match[2] == str(run_dir / "checkpoints" / f"step-{step:08d}") and Path(match[2]).is_dir()
    assert max(_train_losses(run_dir)) == step  # no process went on past the step the checkpoint holds
    assert "killed" not in err and "lost the other processes" not in err


def test_a_hung_process_is_given_up_after_the_timeout(two_process_run, tmp_path):
    root, model_dir, data, _, _ = two_process_run
    run_dir = tmp_path / "hung"
    with _long_job(root, run_dir, model_dir, data, **{"distributed.timeout_s": 10}) as launcher:
        ranks = _ranks_once_a_checkpoint_exists(launcher, run_dir)
        ranks[1].suspend()  # alive but silent: only the timeout can tell
        _, err = launcher.communicate(timeout=300)  # a hang guard: the 10 s collective timeout ends it
    assert launcher.returncode == 2
    assert "lost the other processes of this run while" in err  # summing gradients, or sharing the seed
    assert "process 0 of 2 stopped with exit code 2; the other processes on this machine were stopped" in err
    assert "The newest checkpoint is" in err and "Traceback" not in err
    assert not ranks[1].is_running() or ranks[1].status() == psutil.STATUS_ZOMBIE


def test_bad_input_stops_every_process_with_one_sentence(two_process_run, tmp_path, capsys):
    root, model_dir, data, _, _ = two_process_run
    missing = _overrides(model_dir, tmp_path / "missing.jsonl")
    # the launcher's fit check reads the data first: the sentence, and no process is started
    assert main(["train", str(root / "cfg.yaml"), "--nproc", "2", "--output", str(tmp_path / "early"),
                 *_set(missing)]) == 2
    said = capsys.readouterr().err
    assert f"tunesmith: data.path: {tmp_path / 'missing.jsonl'} does not exist" in said and "process 0" not in said
    # without it, each process finds the bad input and they all stop with one sentence
    launcher = _launch(root, tmp_path / "bad", missing, extra=["--no-fit-check"])
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 2
    assert f"tunesmith: data.path: {tmp_path / 'missing.jsonl'} does not exist" in err
    assert "process 0 of 2 stopped with exit code 2" in err and "Traceback" not in err
