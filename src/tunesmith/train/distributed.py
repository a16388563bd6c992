"""Data-parallel training on several processes, on one machine or several.

How a step is shared.  The optimiser step's window of micro-batches (`gradient_accumulation` x world size
of them, `training.batch_size` rows each) is built from the same seeded order on every process, and process
r runs micro-batches r, r + W, r + 2W, ... of it.  Every process counts the trained tokens of the whole
window, so each divides its summed NLL by the same global count; after its backward passes one all-reduce
sums the gradients of all processes, and every process takes the same optimiser step from the same
gradients.  The sum over processes is then exactly the gradient one process computes when it runs the whole
window itself, which is why W processes with accumulation A match one process with accumulation A x W.

That is DistributedDataParallel's arithmetic without its wrapper: the loss in `train/loss.py` runs the
backbone and the output projection separately (to avoid the full logits), which would go around DDP's
forward, and DDP reduces nothing unless its own forward ran.  Here the gradients are reduced explicitly, in
buckets of at most `BUCKET_ELEMENTS`, with the step's summed NLL and the stop flag riding in the first.

Processes start either from `tunesmith train CONFIG --nproc N` (the `launch` below: one machine, or each
machine of several with `--num-machines/--machine-rank/--main-process-ip`) or from `torchrun` /
`accelerate launch --multi_gpu -m tunesmith.cli train CONFIG`; all of them set RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT, and accelerate's `PartialState` opens the process group from those (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import socket
import subprocess
import sys
import time
import types
from dataclasses import dataclass

import torch

from tunesmith.errors import UserError
from tunesmith.models.parts import decoder_and_head
from tunesmith.train import zero
from tunesmith.hardware import cpu_threads
from tunesmith.train.zero import import_deepspeed

BUCKET_ELEMENTS = 1 << 24  # 64 MB of fp32 per all-reduce: large enough to amortise a call, small enough to copy


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


def _collective(what: str, call):
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
    _collective(what, lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def barrier(world: World, what: str) -> None:
    if world.size > 1:
        import torch.distributed as dist

        _collective(what, dist.barrier)


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
            _collective("sharing the starting weights", lambda: dist.broadcast(p.data, src=0))
    torch.set_rng_state(broadcast_object(torch.get_rng_state(), world, "sharing the random-number state"))


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive gradients of one dtype and device, at most BUCKET_ELEMENTS together (or one larger one)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        last = buckets[-1] if buckets else None
        if last is None or size + g.numel() > BUCKET_ELEMENTS or (g.dtype, g.device) != (last[0].dtype, last[0].device):
            buckets.append([g])
            size = g.numel()
        else:
            last.append(g)
            size += g.numel()
    return buckets


def sum_gradients(params: list[torch.nn.Parameter], world: World, step_nll: float, stop: bool) -> tuple[float, bool]:
    """Sum each parameter's gradient over the processes, in place; returns (the step's NLL summed over the
    processes, whether any process was asked to stop)."""
    import torch.distributed as dist

    for bucket in _buckets([p.grad for p in params]):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        _collective("summing gradients", lambda: dist.all_reduce(flat))
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    # The two numbers travel on their own, in float64 (a bf16 bucket would round the loss), on the device the
    # backend wants (NCCL takes CUDA tensors only).
    return sum_scalars(world, step_nll, stop, params[0].device if params else torch.device("cpu"))


# --- FSDP (distributed.strategy: fsdp)
#
# FSDP2's `fully_shard` keeps each parameter as a DTensor holding 1/N of its rows and gathers a layer's rows
# only while that layer runs (its forward hooks), reduce-scattering the gradients in the backward pass.  The
# loss here does not call the model's own forward (train/loss.py reaches the decoder and the output projection
# directly), so the whole loss computation runs as one registered "forward method" of the root module,
# `tunesmith_call`: FSDP's hooks then gather and release the root's own weights (embeddings, final norm, output
# projection) around it and reduce their gradients, as they do around a forward.  Every process must run the
# same number of such calls per step (each gathers weights with the others); the loop pads a short share with
# zero-weight passes.  Saving gathers the full tensors (every process takes part; process 0 writes).


def strategy_from_launcher(cfg, report=print):
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
        report("accelerate launch chose " + ", ".join(f"distributed.{k}: {v}" for k, v in chosen.items())
               + " (the config said " + ", ".join(f"{v}" for v in said.values()) + "); the run follows the launcher")
    return cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update=chosen)})


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


def shard(model: torch.nn.Module, world: World, device: torch.device) -> None:
    """Shard `model` in place over the processes: each decoder layer a unit, the rest one root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method


    decoder, _ = decoder_and_head(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError("distributed.strategy: fsdp shards a causal LM layer by layer, and tunesmith cannot find "
                        "this model's decoder layers; use distributed.strategy: ddp.")
    mesh = init_device_mesh(device.type, (world.size,))
    # bitsandbytes' 4-bit weights (QLoRA) carry their quantisation state beside the packed bytes, which FSDP2
    # cannot cut into shards: they stay whole in every process, and everything else is sharded.
    whole = {p for p in model.parameters() if getattr(p, "quant_state", None) is not None} or None
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=whole)
    fully_shard(model, mesh=mesh, ignored_params=whole)
    model.tunesmith_call = types.MethodType(_call, model)
    register_fsdp_forward_method(model, "tunesmith_call")


def _call(self, fn, *args):
    return fn(self, *args)


def is_sharded(model: torch.nn.Module) -> bool:
    return hasattr(model, "tunesmith_call")


def run(model: torch.nn.Module, fn, *args):
    """`fn(model, *args)`, inside FSDP's gather/release of the root's weights when the model is sharded."""
    return model.tunesmith_call(fn, *args) if is_sharded(model) else fn(model, *args)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (every process must call this together); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def whole_trainables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters by name, whole whatever shards them (every process must call this together)."""

    gathered = zero.whole_trainables(model)
    if gathered is not None:
        return gathered
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
    _collective("summing the step's loss", lambda: dist.all_reduce(extra))
    return float(extra[0]), bool(extra[1] > 0)


# --- the launcher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when the launcher dies, so no rank outlives the job."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


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
                                         start_new_session=True, preexec_fn=_die_with_parent))

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
