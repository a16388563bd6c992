"""GPU training throughput: tunesmith against Hugging Face Trainer + PEFT on a Llama-3.2-1B-shaped model.

Throughput needs no pretrained weights, so the model is built from a config with random weights (Llama-3.2-1B's
published shape: 16 layers, hidden 2048, MLP 8192, 32 query and 8 key/value heads, 128,256-token vocabulary,
tied embeddings) and saved as safetensors in a temporary folder, with a byte-level BPE tokenizer trained in
memory on made-up words and 400 Alpaca rows of such words (about 250-500 tokens each).  Nothing is downloaded.

The workload is bench/train_throughput.py's (LoRA r=16, alpha=32, dropout 0.05 on all linear layers, max_length
512, micro-batch 4, AdamW lr 1e-4, constant schedule, no checkpointing), on the GPU:
- `peer_fp32`: Trainer + PEFT with fp32 weights, no autocast;
- `peer_bf16`: Trainer + PEFT with the weights loaded in bf16 and `bf16=True`, what its users run on a bf16 GPU;
- `tunesmith`: `tunesmith train`'s loop with `model.dtype: auto` (bf16 from compute capability 8.0).
The ratio is taken against the faster peer.  Each run is a child process; GPU memory is each run's
`torch.cuda.max_memory_allocated`.  MFU: the model FLOPs of the tokens trained (train_throughput's count) over
the wall time of the steps, against this GPU's measured bf16 matmul rate (8192^3 products) and its fp32 one.

    python bench/gpu_throughput.py            # 40 steps per run; JSON to bench/results/gpu_throughput.json
    python bench/gpu_throughput.py --steps 20

Without a CUDA GPU it stops at once with a sentence (exit 2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import measure, model_flops_per_step, model_shape, workload  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "gpu_throughput.json"
GIB = 2**30

# Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B, as published), less the rope scaling, which does not change
# the work per token.
LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                   rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=4096)

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def words(n: int, rng: random.Random) -> list[str]:
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vo", "ne", "dri", "pa", "zu", "gel", "fo", "shi", "bar", "qua"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def build_inputs(root: Path) -> tuple[Path, Path]:
    """(model folder, data file) under root: the random Llama-3.2-1B-shaped model, its tokenizer, the rows."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    vocab = sorted(set(words(3000, rng)))
    rows = []
    for _ in range(400):
        rows.append({"instruction": " ".join(rng.choices(vocab, k=rng.randint(20, 60))) + "?", "input": "",
                     "output": " ".join(rng.choices(vocab, k=rng.randint(150, 330))) + "."})
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core.train_from_iterator([" ".join(vocab)] * 4 + [r["output"] for r in rows[:50]],
                             trainers.BpeTrainer(vocab_size=4000, special_tokens=specials, show_progress=False,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    model_dir = root / "llama-3.2-1b-shaped"
    config = LlamaConfig(**LLAMA_32_1B, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # initialised on the GPU: seconds, not a minute
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()
    return model_dir, data


def matmul_rate(dtype, size: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of size^3 products in `dtype` on this GPU: the mean of `repeats` after three warm-ups."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per run (default 40)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where the JSON results go (logs/ beside it)")
    parser.add_argument("--lever", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="one more tunesmith run with these training settings, e.g. "
                             "--lever stock:fast_kernels=off; the table shows each beside the default run")
    parser.add_argument("--no-peers", action="store_true", help="skip the two Trainer + PEFT runs")
    args = parser.parse_args()
    from tunesmith.config import parse_value

    levers = {}
    for item in args.lever:
        name, sep, settings = item.partition(":")
        pairs = [s.partition("=") for s in settings.split(",")]
        if not sep or not name or any(not eq for _, eq, _ in pairs):
            parser.error(f"--lever {item}: expected NAME:KEY=VALUE[,KEY=VALUE], e.g. stock:fast_kernels=off")
        levers[name] = {k.removeprefix("training."): parse_value(v) for k, _, v in pairs}
    import torch

    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA GPU found (torch.cuda.is_available() is False), so there is nothing to "
              "measure here; run it on a machine with an NVIDIA GPU (bench/gpu_check.sh does).", file=sys.stderr)
        return 2
    out = Path(args.out)
    log_dir = out.parent / "logs" / out.stem
    log_dir.mkdir(parents=True, exist_ok=True)
    gpu = {"name": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
           "memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB, "count": torch.cuda.device_count(),
           "torch": torch.__version__, "cuda": torch.version.cuda}
    bf16_peak = matmul_rate(torch.bfloat16)
    fp32_peak = matmul_rate(torch.float32)
    print(f"{gpu['name']}: bf16 matmul {bf16_peak / 1e12:.0f} TFLOP/s, fp32 {fp32_peak / 1e12:.1f} TFLOP/s",
          file=sys.stderr, flush=True)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="tunesmith-gpu-") as tmp:
        work = Path(tmp)
        tick = time.time()
        model_dir, data = build_inputs(work)
        print(f"random Llama-3.2-1B-shaped model and rows built in {time.time() - tick:.0f} s", file=sys.stderr)

        def raw(dtype: str, peer: dict | None = None, extra: dict | None = None) -> dict:
            config = workload(args.steps, data, extra or {})
            config["model"] = {"name": str(model_dir), "dtype": dtype}
            return {**config, **({"peer": peer} if peer else {})}

        shape = model_shape(raw("auto"))
        if not args.no_peers:
            runs["peer_fp32"] = measure("baseline_fp32", raw("float32", {"dtype": "float32", "bf16": False}),
                                        work, log_dir)
            runs["peer_bf16"] = measure("baseline_bf16", raw("float32", {"dtype": "bfloat16", "bf16": True}),
                                        work, log_dir)
        runs["tunesmith"] = measure("tunesmith", raw("auto"), work, log_dir)
        for name, extra in levers.items():
            runs[f"tunesmith_{name}"] = measure(f"tunesmith_{name}", raw("auto", extra=extra), work, log_dir)
    for result in runs.values():
        flops = model_flops_per_step(result, shape) / result["train_s"]
        result.update(model_flops_per_s=flops, mfu_bf16=flops / bf16_peak, mfu_fp32=flops / fp32_peak)
    ours = runs["tunesmith"]
    peer_name = max((k for k in runs if k.startswith("peer_")), key=lambda k: runs[k]["trained_tokens_per_s"],
                    default="tunesmith")  # --no-peers: ratios against tunesmith's own default run
    peer = runs[peer_name]
    n = min(10, len(peer["losses"]), len(ours["losses"]))
    report = {
        "command": "python bench/gpu_throughput.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": {**gpu, "bf16_matmul_flops": bf16_peak, "fp32_matmul_flops": fp32_peak},
        "model_shape": shape, "levers": levers, **runs,
        "fastest_peer": peer_name,
        "ratio": ours["trained_tokens_per_s"] / peer["trained_tokens_per_s"],
        "gpu_memory_ratio": ours["gpu_peak_bytes"] / peer["gpu_peak_bytes"],
        "loss_max_relative_gap_first_steps": max(abs(a - b) / abs(b) for a, b in zip(ours["losses"][:n], peer["losses"][:n])),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(report, indent=2))
    os.replace(partial, out)
    print("| run | precision | trained tok/s | GPU peak GiB | MFU (bf16 peak) | MFU (fp32 peak) | loss 1 → last |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, r in runs.items():
        precision = f"{r['dtype']} weights" + (f", autocast {r['autocast']}" if r["autocast"] else "")
        print(f"| {name} | {precision} | {r['trained_tokens_per_s']:.0f} | {r['gpu_peak_bytes'] / GIB:.2f} "
              f"| {r['mfu_bf16']:.1%} | {r['mfu_fp32']:.1%} | {r['losses'][0]:.3f} → {r['losses'][-1]:.3f} |")
    print(f"tunesmith / fastest peer ({peer_name}): {report['ratio']:.2f}x tokens/s, "
          f"{report['gpu_memory_ratio']:.2f}x GPU memory; per-step losses within "
          f"{report['loss_max_relative_gap_first_steps']:.2%} over the first {n} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
