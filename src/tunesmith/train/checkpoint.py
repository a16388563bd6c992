"""Checkpoints: everything an exact resume needs, in safetensors and JSON (no pickle).

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
- `trainable.safetensors`: the parameters that train (the adapter, or the whole model),
- `optimizer.safetensors` + the optimiser's hyper-parameters in `state.json`,
- `rng.safetensors`: torch's CPU (and CUDA) generator states, for dropout,
- `method.safetensors` (AdaLoRA only): what the method keeps outside the weights, its
  importance scores; the chosen ranks go into `state.json`,
- `state.json`: step, epoch and batch position in the epoch's order, the scheduler, Python's
  RNG state, running totals, the early-stopping record, and a SHA-256 of every file above.
It is written into a temporary folder and renamed, so a crash never leaves a half-written
checkpoint under the final name; a folder whose files do not match their checksums is
reported and skipped on resume.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import UserError
from tunesmith.fileio import atomic_write_dir, sha256_file
from tunesmith.models.adapters import load_method_state, method_state
from tunesmith.train.distributed import full, shard_like, whole_trainables
from tunesmith.train.folder_lock import disk_full_sentence, out_of_space

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
TENSOR_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")
METHOD_FILE = "method.safetensors"  # written only by methods with state beyond weights (AdaLoRA)


def _optimizer_tensors(saved: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser's `state_dict()` into tensors (for safetensors) and plain values (for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    for index, slots in saved["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = full(value.detach()).contiguous().cpu()
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": saved["param_groups"], "plain_state": plain}


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, slots in meta["plain_state"].items():
        state.setdefault(int(index), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            states[f"torch_cuda_{i}"] = torch.cuda.get_rng_state(i)
    return states


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, progress: dict, write: bool = True,
                    trainable: dict[str, torch.Tensor] | None = None, optimizer_state: dict | None = None) -> Path | None:
    """Write checkpoints/step-NNNNNNNN atomically; `progress` is the loop's JSON-able position and totals.
    A sharded (FSDP) model's processes all call this, to gather the tensors; the one with `write` writes.
    `trainable` and `optimizer_state` (whole tensors; torch's `state_dict()` layout) are given by a caller whose
    model and optimiser do not hold them whole themselves (DeepSpeed ZeRO's: train/parallel/zero.py)."""
    folder = run_dir / "checkpoints" / f"step-{progress['step']:08d}"
    whole = whole_trainables(model) if trainable is None else trainable
    trainable = {name: value.contiguous().cpu() for name, value in whole.items()}
    opt_tensors, opt_meta = _optimizer_tensors(optimizer_state if optimizer_state is not None else optimizer.state_dict())
    if not write:
        return None

    def fill(tmp: Path) -> None:
        save_file(trainable, tmp / "trainable.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(_rng_tensors(), tmp / "rng.safetensors")
        files = list(TENSOR_FILES)
        method_tensors, method_values = method_state(model)
        if method_tensors or method_values:
            save_file(method_tensors, tmp / METHOD_FILE)
            files.append(METHOD_FILE)
        py_state = random.getstate()
        state = {
            "progress": progress,
            "optimizer": opt_meta,
            "scheduler": scheduler.state_dict(),
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
            "method": method_values,
            "sha256": {name: sha256_file(tmp / name) for name in files},
        }
        (tmp / STATE_FILE).write_text(json.dumps(state))

    try:
        atomic_write_dir(folder, fill)  # a partial folder is removed before the error goes on
    except Exception as exc:  # OSError, or safetensors' own error type for a full disk
        if not out_of_space(exc):
            raise
        tensors = [*trainable.values(), *opt_tensors.values()]
        raise UserError(_no_space(run_dir, folder, sum(t.numel() * t.element_size() for t in tensors))) from None
    return folder


def _no_space(run_dir: Path, folder: Path, needed: int) -> str:
    """The sentence for a checkpoint the disk had no room for: what it needs, what is free, how to go on."""
    free = shutil.disk_usage(run_dir).free
    return disk_full_sentence(run_dir, f"checkpoint {folder.name} needs about {_mib(needed)} and {_mib(free)} is "
                                       "free, so it was not written", list_checkpoints(run_dir))


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it is complete and intact."""
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        return "it has no state.json (written partly?)"
    try:
        state = json.loads(state_path.read_text())
        expected = state["sha256"]
    except (ValueError, KeyError):
        return "its state.json is unreadable"
    for name in dict.fromkeys([*TENSOR_FILES, *expected]):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != expected.get(name):
            return f"{name} does not match its checksum (corrupt)"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temporary folders start with a dot and are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def newest_valid_checkpoint(run_dir: Path) -> Path | None:
    for folder in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log.info(f"skipping checkpoint {folder}: {problem}.")
    return None


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimiser, scheduler and RNGs from `folder`; returns the saved progress."""
    state = json.loads((folder / STATE_FILE).read_text())
    load_trainable(folder, model)
    if (folder / METHOD_FILE).is_file():
        load_method_state(model, load_file(folder / METHOD_FILE), state.get("method") or {})
    device_of = {id(p): p.device for p in model.parameters()}
    opt_state = _optimizer_state_dict(load_file(folder / "optimizer.safetensors"), state["optimizer"])
    optimizer.load_state_dict(opt_state)
    for group in optimizer.param_groups:  # keep optimiser state beside its parameter (GPU runs)
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and key != "step":
                    optimizer.state[p][key] = shard_like(value.to(device_of[id(p)]), p)
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    for name, value in rng.items():
        if name.startswith("torch_cuda_") and torch.cuda.is_available():
            torch.cuda.set_rng_state(value, int(name.rsplit("_", 1)[1]))
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state["progress"]


def load_trainable(folder: Path, model) -> None:
    set_trainable(model, load_file(folder / "trainable.safetensors"))


def set_trainable(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors (by parameter name) into `model`'s parameters, sharded or not."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(shard_like(value.to(params[name].device, params[name].dtype), params[name]))


def prune_checkpoints(run_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Delete all but the newest `keep` checkpoints (never `protect`, the best one)."""
    folders = list_checkpoints(run_dir)
    for folder in folders[:-keep] if keep else folders:
        if protect is not None and folder.resolve() == protect.resolve():
            continue
        shutil.rmtree(folder, ignore_errors=True)
