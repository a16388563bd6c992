"""Intel's Edge AI Tuning Kit support matrix, estimated from the models' published shapes alone.

The kit publishes which real 0.5-8B models trained (✅) or not (❌) with LoRA and QLoRA on an Intel Arc A770
(16 GB) and B580 (12 GB), one card or several (../shared/data/edge-ai-tuning-kit-matrix.md, from the kit's
documentation).  `estimate_matrix` predicts each cell from the model's config.json numbers
(plan/reference_models.py, built on the meta device: no weights) and `plan/memory.py`'s part-by-part model with
a GPU `Workload`, and counts the cells where the estimate and the kit agree.

What the kit runs (its training worker, open-edge-platform/edge-ai-tuning-kit,
backend/workers/llm-finetuning-node/training: trainer/modules/lora.py, qlora.py, templates/fsdp.yaml, app.py),
and so what profile="kit" assumes:
- Hugging Face Trainer (TRL's SFTTrainer) with PEFT on Intel XPU in bf16, weights loaded in bf16; LoRA r=8,
  alpha 16, dropout 0.05 on every linear layer ("all-linear"); AdamW (adamw_torch); rows padded to the batch's
  longest, no packing.  So: the stock PEFT / transformers modules (fused=False) and the whole
  [tokens x vocab] logits upcast to fp32 for the loss (chunked_loss=False).
- LoRA loads the model with attn_implementation="eager": each layer materialises its [heads x seq x seq]
  attention probabilities (softmax in fp32, kept with a bf16 copy for the backward), which memory.py's
  SDPA-shaped count leaves out; `stack_extras` adds them.  QLoRA does not pass attn_implementation (SDPA).
- Gradient checkpointing: QLoRA's prepare_model_for_kbit_training turns it on; for LoRA the kit leaves it to
  TRL's SFTConfig, whose default (TRL >= 0.20; the kit pins trl >= 1.6) is on.  `checkpointing` can say otherwise.
- QLoRA (one GPU only): NF4 *without* double quantisation on one GPU (an fp32 scale per 64 weights; memory.py
  assumes double quantisation), and prepare_model_for_kbit_training upcasts every tensor that is not 4-bit
  (embeddings, output layer, norms, biases) to fp32, which memory.py does not count on a GPU.
- Several GPUs, LoRA only: `accelerate launch` with the kit's FSDP template (FULL_SHARD, mixed precision bf16,
  one process per card).  Each card holds 1/N of the bf16 weights (accelerate upcasts to fp32 only the flat
  parameters that train, here PEFT's fp32 adapters already), plus the layer being gathered (and the one
  prefetched) and the root unit (embeddings, output layer) gathered for the whole step.  It is not DDP: the
  matrix itself shows B580 multi fitting where B580 single does not, which data parallelism alone cannot do.

Not published by the kit, so parameters here with stated defaults: the rows' length in tokens (`seq_len`), the
LoRA rank the run used (`rank`, the kit's code says 8), the number of cards in "multi" (`multi_gpus`), and what
of a card's memory a process can use (`reserve_gib` below its size).  `agreement_sweep` shows how the count of
agreeing cells moves with them.  profile="tunesmith" answers the same cells for tunesmith's own GPU path
(stock modules, its chunked loss, SDPA, checkpointing as `training.gradient_checkpointing: auto` decides, FSDP
in bf16 for several cards).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.hardware import detect_device, four_bit_status, memory_info, resolve_dtype
from tunesmith.plan.memory import GIB, GPU_ALLOCATOR_SLACK, NF4_BYTES_PER_WEIGHT, Workload, memory_parts
from tunesmith.plan.reference_models import reference_shape, short_name
from tunesmith.plan.shapes import ModelShape, lora_trainable, targeted_names


@dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    memory_bytes: int
    device: str = "xpu"


# Intel's product pages: Arc A770 16 GB GDDR6, Arc B580 12 GB GDDR6 (binary gigabytes on the board)
KIT_GPUS = {
    "A770": Gpu("A770", "Intel Arc A770 16 GB", 16 * GIB),
    "B580": Gpu("B580", "Intel Arc B580 12 GB", 12 * GIB),
}
MODES = ("single", "multi")

# The kit's published support matrix (../shared/data/edge-ai-tuning-kit-matrix.md): True trained, False did not.
# LoRA: (A770 single, A770 multi, B580 single, B580 multi); QLoRA is single-GPU only: (A770, B580).
KIT_LORA = {
    "meta-llama/Llama-3.2-1B-Instruct": (True, True, True, True),
    "meta-llama/Llama-3.2-3B-Instruct": (True, True, True, True),
    "Qwen/Qwen2.5-0.5B-Instruct": (True, True, True, True),
    "Qwen/Qwen2.5-1.5B-Instruct": (True, True, True, True),
    "Qwen/Qwen2.5-3B-Instruct": (True, True, False, True),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": (True, True, False, True),
}
KIT_QLORA = {
    "meta-llama/Llama-3.1-8B-Instruct": (True, True),
    "meta-llama/Llama-3.2-1B-Instruct": (True, True),
    "meta-llama/Llama-3.2-3B-Instruct": (True, True),
    "Qwen/Qwen2.5-0.5B-Instruct": (True, True),
    "Qwen/Qwen2.5-1.5B-Instruct": (True, True),
    "Qwen/Qwen2.5-3B-Instruct": (True, True),
    "Qwen/Qwen2.5-7B-Instruct": (True, False),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": (True, True),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": (True, True),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": (True, True),
    "mistralai/Mistral-7B-Instruct-v0.3": (True, True),
}

# The stated assumptions (see the module docstring); bench/RESULTS.md reports the sweep over them.
# Tokens per row after padding to the longer of the micro-batch's two rows.  The kit trains on question/answer
# pairs (one pair a row, from its dataset pages and synthetic generator), a few hundred tokens with the system
# prompt; 512 is the assumption, 256-2048 are swept (its UI caps rows at 2048).
DEFAULT_SEQ_LEN = 512
DEFAULT_RANK = 8  # the kit's LoraConfig(r=8, ...) in lora.py and qlora.py
DEFAULT_MICRO_BATCH = 2  # the kit's documented default training batch size
DEFAULT_MULTI_GPUS = 2  # the kit's FSDP template says num_processes: 2 before it writes the detected count
DEFAULT_RESERVE_GIB = 0.5  # of the card's memory not available to PyTorch (driver, display); a guess, swept
# bench/estimate_accuracy.py finds the CPU estimate within about 10% of measured peaks; a cell nearer than 5% to
# the card's memory is a close call either way
CLOSE_CALL = 0.05


@dataclass(frozen=True)
class Assumptions:
    seq_len: int = DEFAULT_SEQ_LEN
    rank: int = DEFAULT_RANK
    micro_batch: int = DEFAULT_MICRO_BATCH
    multi_gpus: int = DEFAULT_MULTI_GPUS
    reserve_gib: float = DEFAULT_RESERVE_GIB
    checkpointing: bool | None = None  # None: as the profile does (kit: on; tunesmith: its auto rule)
    profile: str = "kit"  # "kit": the Edge AI Tuning Kit's stack; "tunesmith": tunesmith's GPU path

    def sentence(self) -> str:
        multi = f"{self.multi_gpus} cards in 'multi'"
        ckpt = {None: "as the stack decides", True: "on", False: "off"}[self.checkpointing]
        return (f"rows of {self.seq_len} tokens, micro-batch {self.micro_batch}, LoRA rank {self.rank}, {multi}, "
                f"{self.reserve_gib:g} GiB of each card unusable, gradient checkpointing {ckpt}, profile {self.profile}")


@dataclass
class Cell:
    model: str
    method: str  # lora, qlora
    gpu: str  # A770, B580 (or "here")
    mode: str  # single, multi
    published: bool | None  # the kit's ✅ / ❌; None where it publishes nothing
    peak_bytes: int
    usable_bytes: int
    parts: dict = field(default_factory=dict)  # bytes by part: memory.py's and `stack_extras`'
    checkpointing: bool = False

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    @property
    def agrees(self) -> bool | None:
        return None if self.published is None else self.published == self.fits

    @property
    def close(self) -> bool:
        """Within CLOSE_CALL of the usable memory: nearer than the estimate's own accuracy can tell."""
        return abs(self.peak_bytes - self.usable_bytes) <= CLOSE_CALL * self.usable_bytes


@dataclass
class MatrixResult:
    assumptions: Assumptions
    cells: list[Cell]

    @property
    def compared(self) -> list[Cell]:
        return [c for c in self.cells if c.published is not None]

    @property
    def agree(self) -> int:
        return sum(1 for c in self.compared if c.agrees)

    @property
    def disagreements(self) -> list[Cell]:
        return [c for c in self.compared if not c.agrees]

    def same_shape_conflicts(self) -> list[tuple[Cell, Cell]]:
        """Pairs of cells the kit answers differently for models of identical shape (same card, method and
        mode): no estimate from shapes can agree with both."""
        found = []
        for i, c in enumerate(self.compared):
            for d in self.compared[i + 1:]:
                same_cell = (c.method, c.gpu, c.mode) == (d.method, d.gpu, d.mode)
                if same_cell and c.published != d.published and _shape_key(c.model) == _shape_key(d.model):
                    found.append((c, d))
        return found

    def cell(self, model: str, method: str, gpu: str, mode: str = "single") -> Cell:
        for c in self.cells:
            if (short_name(c.model), c.method, c.gpu, c.mode) == (short_name(model), method, gpu, mode):
                return c
        raise KeyError((model, method, gpu, mode))


def _shape_key(model: str) -> tuple:
    s = reference_shape(model)
    return (s.layers, s.hidden, s.intermediate, s.heads, s.kv_heads, s.head_dim, s.vocab, s.tied_embeddings,
            s.total_params)


def kit_cells() -> list[tuple[str, str, str, str, bool]]:
    """Every cell the kit publishes: (model, method, gpu, mode, trained)."""
    cells = []
    for model, row in KIT_LORA.items():
        for (gpu, mode), ok in zip([(g, m) for g in KIT_GPUS for m in MODES], row):
            cells.append((model, "lora", gpu, mode, ok))
    for model, row in KIT_QLORA.items():
        for gpu, ok in zip(KIT_GPUS, row):
            cells.append((model, "qlora", gpu, "single", ok))
    return cells


def _check(assumptions: Assumptions) -> None:
    a = assumptions
    if a.profile not in ("kit", "tunesmith"):
        raise UserError(f"profile {a.profile!r}: use kit (the Edge AI Tuning Kit's stack) or tunesmith.")
    for name, value in (("sequence length", a.seq_len), ("rank", a.rank), ("micro-batch", a.micro_batch),
                        ("number of cards", a.multi_gpus)):
        if int(value) < 1:
            raise UserError(f"the {name} must be 1 or more (got {value}).")
    if a.multi_gpus < 2:
        raise UserError(f"'multi' means two cards or more (got {a.multi_gpus}).")
    if a.reserve_gib < 0:
        raise UserError(f"the reserve is memory a card cannot use: 0 GiB or more (got {a.reserve_gib}).")


def _adapter(shape: ModelShape, method: str, rank: int, profile: str) -> tuple[int, int]:
    """(trainable parameters, adapted layers): the kit targets all-linear, tunesmith its family's default."""
    targets = "all-linear" if profile == "kit" else "auto"
    cfg = load_config(None, [f"method={method}", f"lora.r={rank}", f"lora.target_modules={targets}"])
    return lora_trainable(shape, cfg), len(targeted_names(shape, cfg))


def gpu_workload(shape: ModelShape, method: str, mode: str, a: Assumptions, device: str = "xpu",
                 checkpointing: bool = True) -> Workload:
    """The Workload of one cell: bf16 weights and activations on a GPU, the profile's loss and sharding."""
    trainable, targets = _adapter(shape, method, a.rank, a.profile)
    multi = mode == "multi"
    tokens = a.micro_batch * a.seq_len
    return Workload(
        method=method, device=device, weight_bytes=2, activation_bytes=2,  # bf16 weights, bf16 autocast
        trainable=trainable, adapter_targets=targets, rank=a.rank, optimizer="adamw",
        pass_tokens=tokens, longest_row=a.seq_len, checkpointing=checkpointing, fused=False,
        chunked_loss=a.profile == "tunesmith", four_bit=True,
        processes=a.multi_gpus if multi else 1, sharded=multi,
    )


def stack_extras(shape: ModelShape, work: Workload, a: Assumptions) -> dict[str, int]:
    """Bytes the stack holds that memory.py's parts leave out (each explained in the module docstring)."""
    extras: dict[str, float] = {}
    slack = GPU_ALLOCATOR_SLACK
    if work.method == "qlora":
        # (memory.py counts what prepare_model_for_kbit_training keeps in fp32: embeddings, output layer, norms)
        if a.profile == "kit":  # one GPU: bnb_4bit_use_double_quant=False, an fp32 absmax per 64-weight block
            extras["nf4_scales"] = shape.linear_params * (0.5 + 4 / 64 - NF4_BYTES_PER_WEIGHT)
    if a.profile == "kit" and work.method == "lora":
        # eager attention: per layer kept, batch x heads x seq^2 probabilities in fp32 (softmax output) and bf16
        # (its copy for the weighted sum); one more softmax's forward/backward transients (bf16 scores, fp32
        # copy, gradients: ~10 bytes an element); with checkpointing only the layer being recomputed keeps them
        scores = a.micro_batch * shape.heads * a.seq_len**2
        kept = 1 if work.checkpointing else shape.layers
        extras["eager_attention"] = scores * (6 * kept + 10) * slack
    if work.sharded and work.processes > 1:
        # FSDP gathers each decoder layer's weights in bf16 as it runs (memory.py counts that one; add the
        # prefetched next), and the root unit (embeddings, output layer, final norm) stays gathered for the step
        layer = shape.linear_params / max(shape.layers, 1)
        extras["fsdp_gathered"] = (layer + shape.embedding_params) * 2
    return {name: int(value) for name, value in extras.items()}


def gpu_peak(parts: dict[str, int], extras: dict[str, int]) -> int:
    """The training peak on a GPU: memory.py's parts plus the extras (memory.py's GPU `load_peak` is never the
    larger: bitsandbytes quantises each tensor as it arrives)."""
    names = ("framework", "weights", "adapter", "gradients", "optimizer", "gathered", "activations", "loss",
             "dequantized")
    return sum(parts[n] for n in names) + sum(extras.values())


def _checkpointing(shape: ModelShape, method: str, mode: str, a: Assumptions, usable: int) -> bool:
    if a.checkpointing is not None:
        return a.checkpointing
    if a.profile == "kit" or method == "qlora":
        return True  # TRL's SFTConfig default / prepare_model_for_kbit_training; tunesmith: auto is on for qlora
    # tunesmith's auto rule (train/compute.py): on when one pass's activations would take over half the memory
    bare = memory_parts(shape, gpu_workload(shape, method, mode, a, checkpointing=False))
    return bare["activations"] > usable / 2


def cell_estimate(model: str, method: str, gpu: str, mode: str, a: Assumptions,
                  published: bool | None = None) -> Cell:
    """One cell: the peak of `model` trained with `method` on `gpu` (one card or `a.multi_gpus`)."""
    card = KIT_GPUS[gpu]
    shape = reference_shape(model)
    usable = int(card.memory_bytes - a.reserve_gib * GIB)
    work = gpu_workload(shape, method, mode, a, card.device, _checkpointing(shape, method, mode, a, usable))
    parts = memory_parts(shape, work)
    extras = stack_extras(shape, work, a)
    peak = gpu_peak(parts, extras)
    shown = {k: v for k, v in parts.items() if k not in ("peak", "load_peak")} | extras
    return Cell(model, method, gpu, mode, published, peak, usable, shown, work.checkpointing)


def estimate_matrix(seq_len: int = DEFAULT_SEQ_LEN, rank: int = DEFAULT_RANK, micro_batch: int = DEFAULT_MICRO_BATCH,
                    multi_gpus: int = DEFAULT_MULTI_GPUS, reserve_gib: float = DEFAULT_RESERVE_GIB,
                    checkpointing: bool | None = None, profile: str = "kit") -> MatrixResult:
    """Every cell of the kit's matrix, estimated; `.agree` of `len(.compared)` cells agree with the kit."""
    a = Assumptions(seq_len, rank, micro_batch, multi_gpus, reserve_gib, checkpointing, profile)
    _check(a)
    cells = [cell_estimate(model, method, gpu, mode, a, ok) for model, method, gpu, mode, ok in kit_cells()]
    return MatrixResult(a, cells)


def agreement_sweep(seq_lens=(512, 1024, 2048), ranks=(8, 16, 64), **fixed) -> list[dict]:
    """How many cells agree for each (sequence length, rank): one row each."""
    rows = []
    for seq in seq_lens:
        for rank in ranks:
            result = estimate_matrix(seq_len=seq, rank=rank, **fixed)
            rows.append({"seq_len": seq, "rank": rank, "agree": result.agree, "compared": len(result.compared),
                         "disagree": [f"{short_name(c.model)} {c.method} {c.gpu} {c.mode}"
                                      for c in result.compared if not c.agrees]})
    return rows


# --- this machine

def here_matrix(seq_len: int = DEFAULT_SEQ_LEN, rank: int = DEFAULT_RANK, micro_batch: int = DEFAULT_MICRO_BATCH,
                device: str | None = None, available_bytes: int | None = None) -> tuple[list[Cell], str]:
    """The kit's models with LoRA and QLoRA on this machine's device as tunesmith would train them (its
    defaults: fused CPU paths and fp32 on a CPU, chunked loss, checkpointing as auto decides), against the memory
    free here; returns the cells and a line saying what 'here' is."""
    device = device or detect_device()
    dtype = resolve_dtype("auto", device)
    weight_bytes = 4 if str(dtype).endswith("float32") else 2
    available, where = _available_here(device) if available_bytes is None else (available_bytes, "given")
    four_bit = four_bit_status()[0]
    a = Assumptions(seq_len, rank, micro_batch, profile="tunesmith")
    cells = []
    for model in dict.fromkeys(list(KIT_LORA) + list(KIT_QLORA)):
        shape = reference_shape(model)
        for method in ("lora", "qlora"):
            work = gpu_workload(shape, method, "single", a, device, checkpointing=False)
            work = replace(work, weight_bytes=weight_bytes, activation_bytes=weight_bytes, four_bit=four_bit,
                           fused=device == "cpu" and weight_bytes == 4, chunked_loss=True,
                           checkpoint_bytes=2 * shape.total_params)  # the models publish bf16 safetensors
            bare = memory_parts(shape, work)
            if method == "qlora" or (available is not None and bare["activations"] > available / 2):
                work = replace(work, checkpointing=True)
            parts = memory_parts(shape, work)
            if device == "cpu":
                peak, extras = parts["peak"], {}
            else:
                extras = stack_extras(shape, work, a)
                peak = gpu_peak(parts, extras)
            shown = {k: v for k, v in parts.items() if k not in ("peak", "load_peak")} | extras
            cells.append(Cell(model, method, "here", "single", None, peak,
                              available if available is not None else 0, shown, work.checkpointing))
    qlora_note = "" if four_bit else " (no 4-bit kernels here: qlora would train as lora)"
    line = f"{device} ({str(dtype).replace('torch.', '')}), {where}{qlora_note}"
    return cells, line


def _available_here(device: str) -> tuple[int | None, str]:
    info = memory_info()
    if device in ("cuda", "xpu"):
        gpus = [g for g in info["gpus"] if g["kind"] == device and g["total_bytes"]]
        if gpus:
            free = min(g["free_bytes"] or g["total_bytes"] for g in gpus)
            return free, f"{free / GIB:.1f} GiB free on {gpus[0]['name']}"
        return None, "free memory unknown"
    available, limit = info["ram_available_bytes"], info["ram_limit_bytes"]
    if limit is not None and (available is None or limit < available):
        available = limit
    if available is None:
        return None, "free memory unknown"
    return available, f"{available / GIB:.1f} GiB of RAM available"


# --- printing

def _mark(ok: bool | None) -> str:
    return {True: "✅", False: "❌", None: "·"}[ok]


def format_comparison(result: MatrixResult) -> str:
    """The kit's matrix beside the estimate: each cell 'kit/estimate peak', '≠' where they disagree."""
    a = result.assumptions
    lines = [f"Edge AI Tuning Kit support matrix (published) vs tunesmith's estimate ({a.sentence()}).",
             "Each cell: kit / estimate, the estimated peak per card in GiB against the usable "
             f"({', '.join(f'{g} {(c.memory_bytes / GIB - a.reserve_gib):g}' for g, c in KIT_GPUS.items())} GiB); "
             "'!=' marks a disagreement, '~' a peak within 5% of the usable memory.", ""]
    for method, columns in (("lora", [(g, m) for g in KIT_GPUS for m in MODES]),
                            ("qlora", [(g, "single") for g in KIT_GPUS])):
        models = list(KIT_LORA if method == "lora" else KIT_QLORA)
        width = max(len(short_name(m)) for m in models) + 2
        title = "LoRA" if method == "lora" else "QLoRA (one card; the kit has no multi-GPU QLoRA)"
        lines.append(title)
        lines.append(("model".ljust(width) + "".join(f"{g} {m}".ljust(19) for g, m in columns)).rstrip())
        for model in models:
            row = short_name(model).ljust(width)
            for gpu, mode in columns:
                c = result.cell(model, method, gpu, mode)
                flag = ("" if c.agrees else " !=") + (" ~" if c.close else "")
                row += f"{_mark(c.published)}/{_mark(c.fits)} {c.peak_bytes / GIB:5.1f}{flag}".ljust(19)
            lines.append(row.rstrip())
        lines.append("")
    close = sum(1 for c in result.disagreements if c.close)
    lines.append(f"{result.agree} of {len(result.compared)} cells agree"
                 + (f" ({close} of the {len(result.disagreements)} disagreements are within {CLOSE_CALL:.0%} of the "
                    "card's memory, marked ~)." if close else "."))
    for c, d in result.same_shape_conflicts():
        lines.append(f"The kit answers {short_name(c.model)} {_mark(c.published)} and {short_name(d.model)} "
                     f"{_mark(d.published)} for {c.method} on one {c.gpu}, yet the two have the same shape: no "
                     "estimate from shapes can agree with both.")
    return "\n".join(lines)


def format_estimated(result: MatrixResult, here: tuple[list[Cell], str] | None = None, title: str = "") -> str:
    """Only the estimate (fits / does not, peak GiB): the kit's cells for `result`'s profile, and this machine."""
    a = result.assumptions
    lines = [title or f"estimated ({a.sentence()}):"]
    columns = [("lora", g, m) for g in KIT_GPUS for m in MODES] + [("qlora", g, "single") for g in KIT_GPUS]
    models = list(dict.fromkeys(list(KIT_LORA) + list(KIT_QLORA)))
    width = max(len(short_name(m)) for m in models) + 2
    header = [f"{'LoRA' if m == 'lora' else 'QLoRA'} {g}{' x' + str(a.multi_gpus) if mode == 'multi' else ''}"
              for m, g, mode in columns]
    here_cells = {}
    if here is not None:
        header += ["LoRA here", "QLoRA here"]
        here_cells = {(c.model, c.method): c for c in here[0]}
    lines.append(("model".ljust(width) + "".join(h.ljust(13) for h in header)).rstrip())
    by_key = {(c.model, c.method, c.gpu, c.mode): c for c in result.cells}
    for model in models:
        row = short_name(model).ljust(width)
        for method, gpu, mode in columns:
            c = by_key.get((model, method, gpu, mode)) or cell_estimate(model, method, gpu, mode, a)
            row += f"{_mark(c.fits)} {c.peak_bytes / GIB:4.1f}".ljust(13)
        for method in ("lora", "qlora") if here is not None else ():
            c = here_cells[(model, method)]
            row += (f"{_mark(c.fits if c.usable_bytes else None)} {c.peak_bytes / GIB:4.1f}").ljust(13)
        lines.append(row.rstrip())
    if here is not None:
        lines.append(f"here = {here[1]}; tunesmith's own path for 'here' (its defaults on this device).")
    return "\n".join(lines)


def matrix_report(seq_len: int | None = None, rank: int | None = None, sweep: bool = False, here: bool = True) -> str:
    """What `tunesmith estimate --matrix` prints: the kit's matrix beside the estimate for the A770 and B580, what
    tunesmith itself would fit on them (and on this machine), and with `sweep` the agreement per assumption."""
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    rank = DEFAULT_RANK if rank is None else rank
    kit = estimate_matrix(seq_len=seq_len, rank=rank)
    own = estimate_matrix(seq_len=seq_len, rank=rank, profile="tunesmith")
    sections = [format_comparison(kit), "",
                format_estimated(own, here_matrix(seq_len, rank) if here else None,
                                 title=f"What tunesmith itself would fit ({own.assumptions.sentence()}):")]
    if sweep:
        lines = ["", "Agreement with the kit per assumption (the rest as above):",
                 "rows (tokens) | LoRA rank | cells agreeing", "--- | --- | ---"]
        for row in agreement_sweep(ranks=(8, 16, 64), seq_lens=(256, 512, 1024, 2048)):
            lines.append(f"{row['seq_len']} | {row['rank']} | {row['agree']} of {row['compared']}")
        sections.append("\n".join(lines))
    return "\n".join(sections)


def models_summary(seq_len: int | None = None, rank: int | None = None) -> str:
    """The brief version for `tunesmith models`: the estimated matrix for the kit's two GPUs (tunesmith's own
    path) and this machine, and the agreement count against the kit's published one."""
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    rank = DEFAULT_RANK if rank is None else rank
    kit = estimate_matrix(seq_len=seq_len, rank=rank)
    own = estimate_matrix(seq_len=seq_len, rank=rank, profile="tunesmith")
    table = format_estimated(own, here_matrix(seq_len, rank),
                             title=f"estimated matrix (real models from their config.json numbers; ✅ fits, peak GiB; "
                                   f"{own.assumptions.sentence()}):")
    return (f"{table}\nThe Edge AI Tuning Kit's published A770/B580 matrix against this estimate of its own stack: "
            f"{kit.agree} of {len(kit.compared)} cells agree (tunesmith estimate --matrix shows it cell by cell).")


def matrix_json(result: MatrixResult) -> dict:
    return {"assumptions": vars(result.assumptions), "agree": result.agree, "compared": len(result.compared),
            "cells": [{"model": c.model, "method": c.method, "gpu": c.gpu, "mode": c.mode, "kit": c.published,
                       "fits": c.fits, "agrees": c.agrees, "peak_bytes": c.peak_bytes, "usable_bytes": c.usable_bytes,
                       "gradient_checkpointing": c.checkpointing, "parts_bytes": c.parts} for c in result.cells]}
