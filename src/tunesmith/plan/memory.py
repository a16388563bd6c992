"""How many bytes a training run holds at its peak, part by part, from the model's shape and the run's settings.

Pure arithmetic on a `ModelShape` (plan/shapes.py) and a `Workload`; `plan/estimate.py` fills both in from a
config and the machine, and the Edge AI Tuning Kit matrix (plan/matrix.py) from published model shapes.

The parts, and where each number comes from:
- **weights**: parameters x bytes of their precision.  QLoRA's 4-bit NF4 with double quantisation stores 0.5
  byte a weight, plus one 8-bit scale per 64-weight block and one fp32 scale per 256 of those (Dettmers et
  al., "QLoRA", 2023, section 3: 0.127 bits a weight for the scales); embeddings, norms and the output layer
  stay in the compute precision, as bitsandbytes leaves them.
- **adapter / gradients / optimiser state**: what trains holds its gradient and AdamW's two moments (fp32 for
  LoRA adapters, which PEFT keeps in fp32; the weights' own precision in full fine-tuning, as torch.optim.AdamW
  keeps its state in the parameter's dtype); bitsandbytes' 8-bit AdamW keeps 1 byte a moment.
- **activations**: what the backward pass needs, per token and decoder layer, counted tensor by tensor for the
  path that runs (`saved_per_token_layer`): tunesmith's fused CPU paths (models/fast) or the stock PEFT /
  transformers modules; with gradient checkpointing only each layer's input, plus one layer recomputed at a
  time.  A pass holds at most `pass_tokens` tokens when rows are packed (train/packing.py).
- **output layer + loss**: tunesmith never builds [tokens x vocab] logits (train/loss.py, LOSS_CHUNK_TOKENS at
  a time); a stock loop (Hugging Face Trainer) does, and upcasts them to fp32.
- **framework**: the process before the model (Python, torch, transformers, the tokenizer and the data) on a
  CPU; the CUDA context and kernels on a GPU.
- **allocator slack**: glibc keeps freed activations in its heap, so a CPU run's resident memory stays near the
  high-water mark of what one step allocates and frees (bench/RESULTS.md, "Peak memory of QLoRA vs LoRA");
  PyTorch's CUDA caching allocator likewise reserves more than it hands out.  Both are a factor on the
  per-step (transient) bytes, measured by bench/estimate_accuracy.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.plan.shapes import ModelShape

GIB = 2**30
# QLoRA's NF4 + double quantisation: 4 bits + 8-bit absmax per 64 + fp32 second-level scale per 64*256 weights
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
# train/loss.py's LOSS_CHUNK_TOKENS: rows of the output projection computed at once
LOSS_CHUNK_TOKENS = 256

# Calibrated on this project's CPUs with bench/estimate_accuracy.py (built-in model, LoRA / QLoRA / full, two
# micro-batch sizes, checkpointing on and off); see bench/RESULTS.md, "Estimate vs measured".
CPU_FRAMEWORK_BYTES = int(0.36 * GIB)  # RSS of a training process before its model loads
CPU_HEAP_SLACK = 1.6  # resident bytes per byte of per-step (transient) allocation under glibc's allocator
# glibc serves blocks below its mmap threshold from the heap and keeps them after free(); the threshold rises
# with the blocks freed, up to 32 MiB on 64-bit (malloc/malloc.c, DEFAULT_MMAP_THRESHOLD_MAX).  QLoRA on a CPU
# dequantises every 4-bit weight for each matmul, so the fp32 copies of the weights below that size stay
# resident as heap, about this share of them (measured on the built-in model, whose weights are all < 4 MiB).
MMAP_THRESHOLD_MAX = 32 * 2**20
CPU_DEQUANTIZED_RETAINED = 0.75
# A GPU process: the CUDA context, cuBLAS/cuDNN workspaces and kernels (about 0.5-1 GiB on recent drivers;
# PyTorch's "Understanding CUDA Memory Usage" notes); the caching allocator's fragmentation as a factor.
GPU_CONTEXT_BYTES = int(0.8 * GIB)
GPU_ALLOCATOR_SLACK = 1.15


@dataclass
class Workload:
    """What a run does to memory, beyond the model's shape."""

    method: str  # lora, qlora, dora, rslora, adalora, full
    device: str  # cpu, cuda, xpu, mps
    weight_bytes: int  # bytes a stored (unquantised) weight takes: 4 fp32, 2 bf16/fp16
    activation_bytes: int  # bytes an activation element takes (2 under autocast or 16-bit weights)
    trainable: int  # parameters that train
    adapter_targets: int = 0  # linear layers an adapter attaches to
    rank: int = 0
    optimizer: str = "adamw"  # adamw, adamw_8bit, paged_adamw_8bit
    pass_tokens: int = 512  # tokens in the biggest forward/backward pass
    longest_row: int = 512  # tokens in the longest row (attention works row by row)
    checkpointing: bool = False
    fused: bool = True  # tunesmith's fused CPU paths (training.fast_kernels: auto on a CPU)
    chunked_loss: bool = True  # tunesmith's loss; False: full [tokens x vocab] logits as a stock loop makes them
    four_bit: bool = True  # qlora's 4-bit can run here (else it trains as lora)
    processes: int = 1
    sharded: bool = False  # FSDP / ZeRO-3: weights, gradients and optimiser state split over the processes
    checkpoint_bytes: int | None = None  # the model's weight files on disk (default: every weight in weight_bytes)


def saved_per_token_layer(shape: ModelShape, work: Workload) -> float:
    """Elements one decoder layer keeps for the backward pass, per token, without checkpointing.

    Llama-style layer (norm, q/k/v, attention, o, norm, gated MLP); h hidden, q = heads x head_dim, kv =
    kv_heads x head_dim, I intermediate, r the adapter rank, t adapters in the layer:
    - both paths keep each norm's input and output (4h), q, k, v and the attention output for the attention
      backward (2q + 2kv), and each adapter's rank-r activation (r t);
    - tunesmith's fused gated MLP keeps x, gate(x) and up(x) and recomputes the product (models/fast/lora.py):
      2I; the stock MLP also keeps act(gate) and act(gate) * up: 4I;
    - stock PEFT LoRA copies each adapter's input through dropout and keeps the copy and a byte mask
      (q/k/v each copy h, o copies q, gate/up copy h each, down copies I), which the fused path does not;
    - full fine-tuning keeps the input of every linear layer for its weight gradient: the norm outputs and
      attention output already counted, plus the MLP product (I), with the stock MLP (4I).
    """
    h, q, kv, inter = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    per_layer_adapters = work.adapter_targets / max(shape.layers, 1)
    common = 4 * h + 2 * q + 2 * kv
    if work.method == "full":
        return common + 4 * inter
    adapters = work.rank * per_layer_adapters
    if work.fused:
        return common + 2 * inter + adapters
    dropout_copies = (5 * h + q + inter) * (1 + 1 / work.activation_bytes)  # the copy and its bool mask
    return common + 4 * inter + adapters + dropout_copies


def memory_parts(shape: ModelShape, work: Workload) -> dict[str, int]:
    """Bytes per part of the run's peak (see the module docstring); `peak` is their sum as the run holds them."""
    quantized = work.method == "qlora" and work.four_bit
    cpu = work.device == "cpu"
    linear = shape.linear_params
    if quantized:
        # PEFT's prepare_model_for_kbit_training (models/adapters.py) upcasts what stays unquantised (embeddings,
        # output layer, norms) to fp32
        weights = linear * NF4_BYTES_PER_WEIGHT + (shape.total_params - linear) * 4
    else:
        weights = shape.total_params * work.weight_bytes
    full = work.method == "full"
    trained_bytes = work.weight_bytes if full else 4  # PEFT keeps adapters in fp32
    moment_bytes = 1 if work.optimizer in ("adamw_8bit", "paged_adamw_8bit") else trained_bytes
    adapter = 0 if full else work.trainable * 4
    gradients = work.trainable * trained_bytes
    optimizer = 2 * work.trainable * moment_bytes
    gathered = 0
    if work.sharded and work.processes > 1:
        # FSDP / ZeRO-3 split what trains and the unquantised weights (QLoRA's 4-bit weights stay whole: config.py,
        # distributed.strategy), and gather one layer's weights at a time to compute with them
        n = work.processes
        adapter, gradients, optimizer = adapter / n, gradients / n, optimizer / n
        if not quantized:
            gathered = weights / max(shape.layers, 1)
            weights = weights / n

    a = work.activation_bytes
    tokens = work.pass_tokens
    per_layer = saved_per_token_layer(shape, work)
    if work.checkpointing:
        # every layer's input, and one layer recomputed during the backward pass; on a CPU its activations and
        # their gradients are both counted (glibc keeps the first block's pages while the second is taken: measured
        # with bench/estimate_accuracy.py), on a GPU the caching allocator reuses the freed block
        recomputed = 2 if cpu else 1
        saved = tokens * (shape.layers * shape.hidden + recomputed * per_layer) * a
    else:
        saved = tokens * shape.layers * per_layer * a
    saved += tokens * 2 * shape.hidden * a  # embeddings' output and the final norm's
    if work.chunked_loss:
        # per chunk: the logits and their gradient in fp32 (the softmax is taken in place); and the
        # [tokens x hidden] gradient kept for the backward pass
        loss = 2 * LOSS_CHUNK_TOKENS * shape.vocab * 4 + tokens * shape.hidden * 4
    else:
        # the whole [tokens x vocab] logits in the compute precision, their fp32 copy, log-softmax and its gradient
        loss = tokens * shape.vocab * (a + 3 * 4)
    dequantized = 0
    if quantized:  # each 4-bit weight is dequantised for its matmul (forward and backward)
        sizes = [i * o * work.weight_bytes for i, o in shape.linear_shapes.values()]
        dequantized = 2 * max(sizes, default=0)
        if work.device == "cpu":
            dequantized += CPU_DEQUANTIZED_RETAINED * sum(b for b in sizes if b < MMAP_THRESHOLD_MAX) / CPU_HEAP_SLACK

    transient = saved + loss + dequantized
    slack = CPU_HEAP_SLACK if cpu else GPU_ALLOCATOR_SLACK
    framework = CPU_FRAMEWORK_BYTES if cpu else GPU_CONTEXT_BYTES
    resident = weights + adapter + gradients + optimizer + gathered
    train_peak = framework + resident + transient * slack
    # Loading for QLoRA on a CPU reads every weight in the compute precision before quantising it, and the
    # file's pages stay resident meanwhile: the load, not training, can set the peak.  On a GPU bitsandbytes
    # quantises each tensor as it arrives, so the card never holds both.
    read = work.checkpoint_bytes if work.checkpoint_bytes else shape.total_params * work.weight_bytes
    load_peak = framework + (read + weights if quantized and cpu else weights)
    parts = {
        "framework": framework,
        "weights": weights,
        "adapter": adapter,
        "gradients": gradients,
        "optimizer": optimizer,
        "gathered": gathered,
        "activations": saved * slack,
        "loss": loss * slack,
        "dequantized": dequantized * slack,
        "load_peak": load_peak,
        "peak": max(train_peak, load_peak),
    }
    return {name: int(value) for name, value in parts.items()}
