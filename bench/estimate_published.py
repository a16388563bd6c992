"""The memory estimator's numbers for published GPU fine-tuning configurations, beside what was published.

No GPU is used: each estimate is `tunesmith.plan.memory.memory_parts` on the model's shape (built on the meta
device from its published config.json numbers, plan/reference_models.py) with a `device="cuda"` Workload.
What a source does not publish (micro-batch, row length, ...) is assumed and said in the table.

Two kinds of number are compared:
- "allocated": what PyTorch's allocator handed out (torch.cuda.max_memory_allocated, as axolotl logs it); the
  estimate then leaves out memory.py's CUDA context and its caching-allocator slack;
- "device": what the card has to hold (nvidia-smi, or a card's size when the claim is "fits on a 48 GB GPU");
  the estimate is memory.py's peak as it stands (context + allocated x slack on the transients).
A source that does not say which it is gets "device" and a note.

    .venv/bin/python bench/estimate_published.py          # markdown table on stdout, JSON in bench/results/

Sources (each row names its own):
- Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023 (arXiv:2305.14314): abstract and
  introduction: a 65B model finetunes on a single 48 GB GPU with QLoRA, where 16-bit finetuning of LLaMA-65B
  needs more than 780 GB of GPU memory; section 5: LoRA r=64, alpha 16 on every linear layer of the base model.
- Unsloth's documentation, "Unsloth Requirements" (unsloth.ai/docs), fine-tuning VRAM table: about 6 GB for an
  8B model with QLoRA and about 22 GB with 16-bit LoRA, "the absolute minimum"; configuration not stated.
- An axolotl run log (given in the issue): Llama-3-8B QLoRA r=64 on 4 A100s, peak 24.7 GiB allocated per
  device; its micro-batch and sequence length are not given, so axolotl's examples/llama-3/qlora.yml's are
  assumed (sequence_len 4096 with sample packing, micro_batch_size 2, paged_adamw_32bit, gradient checkpointing,
  flash attention).
- LLaMA-Factory's wiki, "Performance comparison" (April 2024): LLaMA2-7B on one A100 40GB, LoRA rank 8 on all
  modules; (a) micro-batch 4, max length 1024: 18 GB for 16-bit LoRA, 9 GB for 4-bit QLoRA; (b) 4-bit,
  micro-batch 1, FlashAttention2, lengths 1,024 to 32,768: 6, 7, 9, 12, 19, 32 GB.  It does not say how VRAM
  was read; "GB" is taken as GiB (nvidia-smi's MiB / 1024), which is within 7% of either reading.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tunesmith.config import load_config  # noqa: E402
from tunesmith.plan.memory import GIB, GPU_ALLOCATOR_SLACK, Workload, memory_parts  # noqa: E402
from tunesmith.plan.reference_models import reference_model, reference_shape  # noqa: E402
from tunesmith.plan.shapes import lora_trainable, targeted_names  # noqa: E402

OUT = ROOT / "bench" / "results" / "estimate_published.json"
TRANSIENT = ("activations", "loss", "dequantized")  # memory.py's parts that carry the allocator slack


@dataclass
class Row:
    config: str  # what ran, in words
    model: str
    method: str  # lora, qlora, full
    micro_batch: int
    seq_len: int
    rank: int
    published_gib: float
    relation: str  # "=": measured; "<=": it fits in this much; ">=": it needs more than this
    kind: str  # allocated or device
    source: str
    checkpointing: bool = True
    optimizer: str = "adamw"  # memory.py's names: adamw (32-bit moments) or adamw_8bit
    chunked_loss: bool = False  # False: the whole [tokens x vocab] logits in fp32 (Hugging Face's loss)
    processes: int = 1  # data parallel (DDP): every device holds the whole model
    notes: str = ""


def rows() -> list[Row]:
    llama65, llama3, llama2 = "huggyllama/llama-65b", "meta-llama/Meta-Llama-3-8B", "meta-llama/Llama-2-7b-hf"
    qlora_paper = "QLoRA paper (Dettmers et al. 2023), abstract/introduction"
    factory = "LLaMA-Factory wiki, Performance comparison (LLaMA2-7B, A100 40GB)"
    table = [
        Row("LLaMA-65B QLoRA, r=64 all linear layers, one 48 GB GPU", llama65, "qlora", 1, 512, 64, 48.0, "<=",
            "device", qlora_paper + ": 'a 65B parameter model on a single 48GB GPU'",
            optimizer="adamw", notes="paged AdamW 32-bit (qlora.py's default; its pages can move to CPU RAM, "
            "counted here as resident); rows: Guanaco's OASST1 scripts cap source+target at 16+512 tokens"),
        Row("LLaMA-65B 16-bit full fine-tuning", llama65, "full", 1, 512, 0, 780.0, ">=", "device",
            qlora_paper + ": 'from >780GB of GPU memory'",
            notes="memory.py keeps AdamW's moments in the bf16 weights' dtype (8 bytes a weight in all); "
            "780 GB is 12 bytes a weight (fp16 weights and gradients, fp32 moments)"),
        Row("Llama-3-8B QLoRA r=64, 4 x A100 (DDP), axolotl", llama3, "qlora", 2, 4096, 64, 24.7, "=", "allocated",
            "axolotl run log (in the issue): 24.7 GiB allocated per device", processes=4,
            notes="micro-batch and length assumed from axolotl's examples/llama-3/qlora.yml (2 x 4096 packed); "
            "paged_adamw_32bit; flash attention; axolotl casts embeddings back to bf16"),
        Row("Llama-3-8B QLoRA (Unsloth's minimum)", llama3, "qlora", 1, 512, 16, 6.0, "=", "device",
            "Unsloth docs, Unsloth Requirements: reported as about 6 GB for 8B QLoRA ('absolute minimum')",
            optimizer="adamw_8bit", chunked_loss=True,
            notes="configuration not published: assumed micro-batch 1 x 512, r=16 (its notebooks' rank), 8-bit "
            "AdamW, its fused (chunked) loss; Unsloth also offloads checkpointed activations to CPU RAM"),
        Row("Llama-3-8B 16-bit LoRA (Unsloth's minimum)", llama3, "lora", 1, 512, 16, 22.0, "=", "device",
            "Unsloth docs, Unsloth Requirements: reported as about 22 GB for 8B 16-bit LoRA",
            optimizer="adamw_8bit", chunked_loss=True, notes="as the row above"),
        Row("LLaMA2-7B 16-bit LoRA r=8, batch 4 x 1024", llama2, "lora", 4, 1024, 8, 18.0, "=", "device",
            factory + ": 18GB (HF)", notes="rows taken as full 1024 tokens; how VRAM was read not stated"),
        Row("LLaMA2-7B QLoRA r=8, batch 4 x 1024", llama2, "qlora", 4, 1024, 8, 9.0, "=", "device",
            factory + ": 9GB (HF, 4-bit)", notes="as above; LLaMA-Factory does not upcast embeddings to fp32"),
    ]
    for length, gib in ((1024, 6), (2048, 7), (4096, 9), (8192, 12), (16384, 19), (32768, 32)):
        table.append(Row(f"LLaMA2-7B QLoRA r=8, batch 1 x {length:,}, FlashAttention2", llama2, "qlora", 1, length,
                         8, float(gib), "=", "device", factory + f": {gib}GB at {length:,}",
                         notes="rows padded to the length"))
    return table


def workload(row: Row) -> tuple[Workload, object]:
    shape = reference_shape(row.model)
    if row.method == "full":
        trainable, targets = shape.total_params, 0
    else:
        cfg = load_config(None, [f"method={row.method}", f"lora.r={row.rank}", "lora.target_modules=all-linear"])
        trainable, targets = lora_trainable(shape, cfg), len(targeted_names(shape, cfg))
    work = Workload(method=row.method, device="cuda", weight_bytes=2, activation_bytes=2, trainable=trainable,
                    adapter_targets=targets, rank=row.rank, optimizer=row.optimizer,
                    pass_tokens=row.micro_batch * row.seq_len, longest_row=row.seq_len,
                    checkpointing=row.checkpointing, fused=False, chunked_loss=row.chunked_loss, four_bit=True,
                    processes=row.processes, sharded=False)
    return work, shape


def estimate(row: Row) -> dict:
    work, shape = workload(row)
    parts = memory_parts(shape, work)
    resident = sum(parts[k] for k in ("weights", "adapter", "gradients", "optimizer"))
    transient = sum(parts[k] for k in TRANSIENT)
    device = parts["framework"] + resident + transient  # memory.py's training peak (its load peak models a CPU)
    allocated = resident + transient / GPU_ALLOCATOR_SLACK
    value = allocated if row.kind == "allocated" else device
    return {"estimate_bytes": int(value), "allocated_bytes": int(allocated), "device_bytes": int(device),
            "parts_bytes": parts, "trainable": work.trainable}


def verdict(row: Row, est_gib: float) -> str:
    gap = (est_gib - row.published_gib) / row.published_gib
    if row.relation == "<=":
        return f"{'fits' if gap <= 0 else 'does not fit'}: {gap:+.0%} against the {row.published_gib:g} GiB"
    if row.relation == ">=":
        return f"{'agrees' if gap >= 0 else 'below the bound'}: {gap:+.0%} against {row.published_gib:g} GiB"
    return f"{gap:+.0%}"


def main() -> int:
    results = []
    lines = ["| configuration | published (source) | kind | estimate | gap | assumptions |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows():
        est = estimate(row)
        gib = est["estimate_bytes"] / GIB
        bound = {"=": "", "<=": "fits in ", ">=": "needs more than "}[row.relation]
        assumed = (f"micro-batch {row.micro_batch} x {row.seq_len:,} tokens, rank {row.rank or '-'}, "
                   f"checkpointing {'on' if row.checkpointing else 'off'}, "
                   f"{'8-bit AdamW' if row.optimizer == 'adamw_8bit' else 'AdamW'}, "
                   f"{'chunked loss' if row.chunked_loss else 'full fp32 logits'}"
                   + (f", {row.processes} processes (DDP)" if row.processes > 1 else "") + f"; {row.notes}")
        lines.append(f"| {row.config} | {bound}{row.published_gib:g} GiB ({row.source}) | {row.kind} | "
                     f"{gib:.1f} GiB | {verdict(row, gib)} | {assumed} |")
        results.append({**vars(replace(row)), **est, "estimate_gib": round(gib, 2), "gap": verdict(row, gib)})
    print("\n".join(lines))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "gpu_used": False, "models": {r.model: reference_model(r.model).source for r in rows()},
                               "rows": results}, indent=2, default=str))
    os.replace(tmp, OUT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
