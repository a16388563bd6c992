"""Several training processes, on one machine or several: their place in the job, the collectives the loop
uses, and the launcher.

How the processes share a step (each runs its part of the step's micro-batches, and the gradients are summed)
is one mode object per strategy in train/parallel/: `ddp.py` (why not torch's DistributedDataParallel is said
there), `fsdp.py` and `zero.py` (DeepSpeed).

Processes start either from `tunesmith train CONFIG --nproc N` (the `launch` below: one machine, or each
machine of several with `--num-machines/--machine-rank/--main-process-ip`) or from `torchrun` /
`accelerate launch --multi_gpu -m tunesmith.cli train CONFIG`; all of them set RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT, and accelerate's `PartialState` opens the process group from those (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from tunesmith.errors import UserError
from tunesmith.hardware import cpu_threads
from tunesmith.train.child import die_with_parent

log = logging.getLogger(__name__)

DEEPSPEED_INSTALL = "pip install 'tunesmith[deepspeed]'"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """This process's place in the job, from what torchrun, accelerate launch and `launch` set."""
    def number(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        return int(value) if value.strip().isdigit() else default

    size = number("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    return World(rank=number("RANK", 0), size=size, local_rank=number("LOCAL_RANK", 0),
                 local_size=number("LOCAL_WORLD_SIZE", size))


def start(device: str, timeout_s: float) -> World:
    """Open the process group (once per process) when this process is one of several; returns its place."""
    world = world_from_env()
    if world.size == 1:
        return world
    import torch.distributed as dist
    from accelerate import PartialState

    if not dist.is_initialized():
        # accelerate picks the backend: gloo for CPU processes, NCCL for CUDA ones.
        PartialState(cpu=device == "cpu", timeout=datetime.timedelta(seconds=timeout_s))
    return world


def leave(code: int) -> int:
    """End this process of several with `code`, once its command has returned or failed.

    The process group is taken down on success; then the process exits at once, without Python's and C++'s
    teardown: gloo's and DeepSpeed's threads can still be joinable then (and after a lost peer, stuck), and
    their destructors abort the process ("terminate called without an active exception", exit code 134),
    which would hide the code and the sentence that ended the run.  A process alone returns `code`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return code
    if code == 0:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def collective(what: str, call):
    """Run a collective; a peer that died or hung becomes a sentence instead of a gloo/NCCL traceback."""
    try:
        return call()
    except (RuntimeError, ValueError) as exc:  # DistBackendError is a RuntimeError
        raise lost(what, exc) from None


def lost(what: str, exc: BaseException) -> UserError:
    """The sentence for a collective that failed because another process went away or hung."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"lost the other processes of this run while {what} ({first[:160]}); another process stopped "
                     "(its own message says why) or the network between them failed.")


def lost_peers(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another process went away (FSDP's and DeepSpeed's
    collectives run inside the forward and backward passes, outside `_collective`)."""
    text = str(exc)
    return isinstance(exc, torch.distributed.DistError) or (
        isinstance(exc, RuntimeError) and any(word in text for word in ("gloo", "NCCL", "Connection reset", "Connection closed")))


def broadcast_object(value, world: World, what: str):
    """Rank 0's `value`, on every process; `what` names the moment for the error if a peer is gone."""
    if world.size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    collective(what, lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def barrier(world: World, what: str) -> None:
    if world.size > 1:
        import torch.distributed as dist

        collective(what, dist.barrier)


@contextlib.contextmanager
def first_on_each_machine(world: World, what: str):
    """The block runs on each machine's first process, then on the others (which read what it cached)."""
    if world.size > 1 and world.local_rank != 0:
        barrier(world, what)
    yield
    if world.size > 1 and world.local_rank == 0:
        barrier(world, what)


def align(params: list[torch.nn.Parameter], world: World) -> None:
    """Every process starts from rank 0's trained weights and random-number state.

    The weights agree anyway (same seed, same initialisation); copying them makes that certain.  The
    generator state matters because each step draws its dropout seed from it, and rank 0 may have drawn
    differently before training (it alone evaluates the base model).
    """
    if world.size == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            collective("sharing the starting weights", lambda p=p: dist.broadcast(p.data, src=0))
    torch.set_rng_state(broadcast_object(torch.get_rng_state(), world, "sharing the random-number state"))


def strategy_from_launcher(cfg):
    """`cfg`, with the strategy `accelerate launch --use_deepspeed [--zero_stage S]` or `--use_fsdp` chose (the
    launcher's flags come last, so they win); other launchers leave `cfg` as it is."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
        stage = int(stage) if stage.isdigit() else cfg.distributed.zero_stage
        if stage not in (2, 3):
            raise UserError(f"accelerate launch --zero_stage {stage}: tunesmith runs DeepSpeed ZeRO stage 2 or 3; "
                            "launch with --zero_stage 2 or 3.")
        chosen = {"strategy": "deepspeed", "zero_stage": stage}
    elif env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        chosen = {"strategy": "fsdp"}  # FSDP2 always; accelerate's other FSDP_* settings are not read
    else:
        return cfg
    said = {key: getattr(cfg.distributed, key) for key in chosen}
    if said != chosen:
        log.info("accelerate launch chose " + ", ".join(f"distributed.{k}: {v}" for k, v in chosen.items())
                 + " (the config said " + ", ".join(f"{v}" for v in said.values()) + "); the run follows the launcher")
    return cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update=chosen)})


def import_deepspeed():
    """DeepSpeed, imported and quietened, or a sentence saying how to install it."""
    try:
        import deepspeed
    except ImportError as exc:
        raise UserError(f"distributed.strategy: deepspeed needs DeepSpeed, which is not installed "
                        f"({exc}); install it with {DEEPSPEED_INSTALL}, or use distributed.strategy: fsdp.") from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would drown the run's log
    # DeepSpeed calls torch collectives that torch has renamed; the notice is for DeepSpeed, not the user.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                            category=FutureWarning)
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # On the CPU DeepSpeed compiles a shared-memory all-reduce kernel when its process group opens; only its
        # inference all-reduce uses it, and compiling needs a C++ toolchain the machine may lack: not wanted.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def refuse_unshardable(cfg, task: str | None = None, distilling: bool = False) -> None:
    """What the sharding strategies (fsdp, deepspeed) do not do, said before anything loads (`task` None: not
    known yet)."""
    what = cfg.distributed.strategy + (f" (ZeRO stage {cfg.distributed.zero_stage})" if cfg.distributed.strategy == "deepspeed" else "")
    why = None
    if distilling or task not in (None, "causal_lm"):
        why = f"it shards causal language models being fine-tuned, and this is a {task} {'distillation' if distilling else 'run'}"
    elif cfg.method == "qlora" and (cfg.distributed.strategy == "fsdp" or cfg.distributed.zero_stage == 2):
        pass  # the 4-bit base stays whole in each process: FSDP leaves it out, ZeRO-2 shards only what trains
    elif cfg.method == "qlora":  # ZeRO-3 would cut the 4-bit weights into shards
        raise UserError(f"distributed.strategy: {what}: method qlora's 4-bit weights cannot be sharded; use "
                        "distributed.zero_stage: 2 (or distributed.strategy: fsdp), which keep them whole in each process.")
    elif cfg.method == "adalora":
        why = "method adalora keeps state that cannot be sharded here (AdaLoRA's rank budget reads whole weights)"
    elif cfg.training.optimizer != "adamw":
        why = f"training.optimizer {cfg.training.optimizer} (bitsandbytes) cannot step sharded parameters"
    if why:
        raise UserError(f"distributed.strategy: {what}: {why}; use distributed.strategy: ddp.")
    if cfg.distributed.strategy == "deepspeed":
        import_deepspeed()  # installed, or a sentence saying how


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (every process must call this together); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def whole_trainables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters by name, whole also where FSDP shards them (every process must call this
    together); DeepSpeed ZeRO-3 gathers its own (train/parallel/zero.py)."""
    return {name: full(p.detach()) for name, p in model.named_parameters() if p.requires_grad}


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor, the same on every process) cut the way `like` is sharded; no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def sum_scalars(world: World, step_nll: float, stop: bool, device: torch.device) -> tuple[float, bool]:
    """(the step's NLL summed over the processes, whether any was asked to stop), in float64."""
    import torch.distributed as dist

    extra = torch.tensor([step_nll, 1.0 if stop else 0.0], dtype=torch.float64, device=device)
    collective("summing the step's loss", lambda: dist.all_reduce(extra))
    return float(extra[0]), bool(extra[1] > 0)


# --- the launcher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _exit_words(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"stopped with exit code {code}"


def launch(argv: list[str], nproc: int, num_machines: int = 1, machine_rank: int = 0,
           main_process_ip: str | None = None, main_process_port: int | None = None,
           after_failure=None) -> int:
    """Run `tunesmith <argv>` as `nproc` processes on this machine (machine `machine_rank` of `num_machines`)
    and wait for them.  When one fails, the others are stopped at once (a collective cannot go on without
    it) and a sentence says which; `after_failure()` may add what to do next.  Returns the job's exit code."""
    if num_machines > 1 and not main_process_ip:
        raise UserError("--num-machines above 1 needs --main-process-ip: the address of machine 0, which every "
                        "machine can reach.")
    if not 0 <= machine_rank < num_machines:
        raise UserError(f"--machine-rank {machine_rank} is outside 0..{num_machines - 1} (--num-machines {num_machines}).")
    world_size = nproc * num_machines
    port = main_process_port or (_free_port() if num_machines == 1 else 29500)

    threads = str(max(1, cpu_threads() // nproc))
    children: list[subprocess.Popen] = []
    for local in range(nproc):
        env = dict(os.environ)
        env.update(RANK=str(machine_rank * nproc + local), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR=main_process_ip or "127.0.0.1", MASTER_PORT=str(port),
                   PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", threads)  # the cores are shared out, not oversubscribed
        children.append(subprocess.Popen([sys.executable, "-m", "tunesmith.cli", *argv], env=env,
                                         start_new_session=True, preexec_fn=die_with_parent))

    def forward(signum, frame):  # Ctrl-C reaches only us (the children have their own session): pass it on
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    def failure():  # 130 is a stop on request: the others stop at the same step, and process 0 saves first
        return next(((i, c.returncode) for i, c in enumerate(children) if c.returncode not in (None, 0, 130)), None)

    try:
        failed = None
        while any(child.poll() is None for child in children):
            failed = failure()
            if failed is not None:
                break
            time.sleep(0.1)
        else:
            failed = failure()
        if failed is None:
            return 130 if any(c.returncode == 130 for c in children) else 0
        # A process that dies takes the others' collectives down with it within moments, and they exit too
        # (code 2, "lost the other processes"): give them a second, then name the one that went first if it
        # was killed, rather than a survivor that noticed first.
        grace = time.time() + 1.0
        while time.time() < grace and any(child.poll() is None for child in children):
            time.sleep(0.05)
        exited = {i: c.returncode for i, c in enumerate(children) if c.poll() is not None and c.returncode not in (0, 130)}
        by_signal = [i for i, code in exited.items() if code < 0]
        index = by_signal[0] if by_signal else failed[0]
        code = exited[index]
        for child in children:
            if child.poll() is None:
                child.kill()
        for child in children:
            child.wait()
        rank = machine_rank * nproc + index
        message = (f"tunesmith: process {rank} of {world_size} {_exit_words(code)}; the other processes on this "
                   "machine were stopped with it.")
        extra = after_failure() if after_failure else None
        print(message + (" " + extra if extra else ""), file=sys.stderr, flush=True)
        return code if code > 0 else 128 - code
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
