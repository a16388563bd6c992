"""Each training-speed lever of bench/RESULTS.md's "Training throughput and memory vs Hugging Face Trainer + PEFT"
measured on its own, in one process, on the same batches.

The model is loaded once.  For every row of the table the LoRA adapters and the optimiser start
from the same state and train the same `--steps` micro-batches of the standard workload (see
bench/train_throughput.py), with the levers of that row switched on, cumulatively, in this order:

  padded          each micro-batch padded to its longest row; full [tokens x vocab] logits and
                  cross-entropy, as transformers computes a causal-LM loss
  trained-only    the output projection and loss only on trained tokens, chunked (train/loss.py)
  packed          padding-free: the micro-batch's rows end to end, attention kept inside each row
  pass-512        ... split into passes of at most 512 tokens (less memory, gradients added up)
  fused-ce        cross-entropy gradients computed chunk by chunk in forward (LinearCrossEntropySum)
  fast-lora       LoRA dropout + A in one function, shared masks, numpy RNG, addmm (models/fast/lora.py)
  kept-once       the SwiGLU MLP as one function keeping x, gate(x), up(x) (LoraSwiGLU), and attention
                  keeping its output once (packing.RowsAttention)
  pass-1024       passes of at most 1024 tokens (the CPU default): fewer passes, fewer weight reads
  norm-rope       RMSNorm and the rotary embedding as one autograd function each (models/fast/norm_rope.py,
                  fast_norm_rope): fewer [tokens x hidden] temporaries

Speed is trained tokens over the summed step times (rows are run twice, interleaved, and the
faster run kept, to damp the noise of two shared cores).  Memory is the bytes the autograd graph
keeps for backward at the end of each forward pass (distinct storages, weights excluded, peak over
the passes), read with `torch.autograd.graph.saved_tensors_hooks`: a count of what the levers
save that does not depend on the C allocator (peak RSS is in train_throughput.py).

    .venv/bin/python bench/train_levers.py --steps 6
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import DATA, workload  # noqa: E402

LEVERS = ("padded", "trained-only", "packed", "pass-512", "fused-ce", "fast-lora", "kept-once", "pass-1024",
          "norm-rope")
GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train_levers.json"))
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    import tunesmith.models.fast.lora as fast_lora_module
    import tunesmith.train.loss as loss_module
    import tunesmith.train.packing as packing_module
    from tunesmith.config import config_from_dict
    from tunesmith.data import build_datasets
    from tunesmith.data.batching import collate, epoch_order, iter_batches
    from tunesmith.data.tokens import IGNORE_INDEX
    from tunesmith.hardware import cpu_threads
    from tunesmith.models import load_model, load_tokenizer, resolve_model_source, tunesmith_home
    from tunesmith.models.adapters import prepare_trainable
    from tunesmith.models.fast import fast_lora, fast_norm_rope, forget_shared_mask
    from tunesmith.train.loss import packed_nll_sum, token_nll_sum
    from tunesmith.train.packing import make_pass, plan_passes

    cfg = config_from_dict(workload(args.steps, DATA, {}), "bench workload")
    torch.set_num_threads(cpu_threads())
    source = resolve_model_source(cfg.model.name)
    tokenizer = load_tokenizer(source, cfg.model)
    bundle = build_datasets(cfg.data, tokenizer, cache_dir=tunesmith_home() / "tokenized")
    batches = list(iter_batches(bundle.train, 4, epoch_order(len(bundle.train), cfg.training.seed, 0)))[: args.steps]
    model = prepare_trainable(load_model(source, cfg, torch.float32, "causal_lm"), cfg, args.steps)
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def full_logits_nll(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="sum")
        return nll, int((targets != IGNORE_INDEX).sum())

    def unfused_head(head, hidden, targets):  # the chunked path, without the fused gradient
        total, chunk = hidden.new_zeros((), dtype=torch.float32), loss_module.LOSS_CHUNK_TOKENS
        for s in range(0, hidden.shape[0], chunk):
            total = total + F.cross_entropy(head(hidden[s : s + chunk]).float(), targets[s : s + chunk], reduction="sum")
        return total

    class SdpaRows:  # attention through F.scaled_dot_product_attention row by row, as before `kept-once`
        apply = staticmethod(packing_module.sdpa_rows)

    real_swiglu, real_rows = fast_lora_module._swiglu_mlp, packing_module.RowsAttention

    def run(level: int) -> dict:
        on = set(LEVERS[: level + 1])
        fast_lora_module._swiglu_mlp = real_swiglu if "kept-once" in on else (lambda module: False)
        packing_module.RowsAttention = real_rows if "kept-once" in on else SdpaRows
        pass_tokens = 1024 if "pass-1024" in on else 512 if "pass-512" in on else 10**9
        for p, s in zip(params, start):
            p.data.copy_(s)
            p.grad = None
        optimizer = torch.optim.AdamW(params, lr=cfg.training.learning_rate)
        torch.manual_seed(0)
        loss_module.head_nll_sum = real_head if "fused-ce" in on else unfused_head
        saved_peak, trained, elapsed = 0, 0, 0.0
        with contextlib.ExitStack() as stack:
            if "fast-lora" in on:
                stack.enter_context(fast_lora(model))
            if "norm-rope" in on:
                stack.enter_context(fast_norm_rope(model))
            model.train()
            for rows in batches:
                tick = time.perf_counter()
                if "packed" in on:
                    units = [make_pass(g) for g in plan_passes(rows, pass_tokens)]
                    n_step = sum(u.n_trained for u in units)
                else:
                    units = [collate(rows, tokenizer.pad_token_id)]
                    n_step = int((units[0]["labels"][:, 1:] != IGNORE_INDEX).sum())
                for unit in units:
                    storages: dict[int, int] = {}

                    def pack(t, storages=storages):  # this pass's storages
                        st = t.untyped_storage()
                        if st.data_ptr() not in weights:
                            storages[st.data_ptr()] = st.nbytes()
                        return t

                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        if "packed" in on:
                            nll, _ = packed_nll_sum(model, unit)
                        elif "trained-only" in on:
                            nll, _ = token_nll_sum(model, unit["input_ids"], unit["attention_mask"], unit["labels"])
                        else:
                            nll, _ = full_logits_nll(unit)
                    forget_shared_mask()
                    saved_peak = max(saved_peak, sum(storages.values()))
                    (nll / n_step).backward()
                    forget_shared_mask()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                elapsed += time.perf_counter() - tick
                trained += n_step
        loss_module.head_nll_sum = real_head
        return {"lever": LEVERS[level], "trained_tokens_per_s": trained / elapsed, "saved_bytes_peak": saved_peak}

    real_head = loss_module.head_nll_sum
    results = {}
    for _attempt in range(2):  # interleaved twice; the faster of the two is kept
        for level in range(len(LEVERS)):
            r = run(level)
            best = results.get(r["lever"])
            if best is None or r["trained_tokens_per_s"] > best["trained_tokens_per_s"]:
                results[r["lever"]] = r
            print(f"{r['lever']}: {r['trained_tokens_per_s']:.1f} trained tokens/s, "
                  f"{r['saved_bytes_peak'] / GIB:.2f} GiB saved for backward", file=sys.stderr, flush=True)
    rows = [results[name] for name in LEVERS]
    first = rows[0]["trained_tokens_per_s"]
    print("| levers on (cumulative) | trained tokens/s | vs padded | saved for backward (GiB) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['lever']} | {r['trained_tokens_per_s']:.1f} | {r['trained_tokens_per_s'] / first:.2f}x "
              f"| {r['saved_bytes_peak'] / GIB:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps({"command": "python bench/train_levers.py " + " ".join(sys.argv[1:]),
                                   "steps": args.steps, "rows": rows}, indent=2))
    partial.replace(out)


if __name__ == "__main__":
    main()
