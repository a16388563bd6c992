"""Batched greedy generation vs one prompt at a time, on the built-in model, on this machine.

Both runs use tunesmith's own generator (`tunesmith.models.generate.generate_answers`: left padding,
KV cache, greedy, stop at the end-of-turn token) on the same rows with the same max_new_tokens;
only the batch size differs (1 vs each of --batch-sizes; the first is the headline, 16 being
tunesmith's default `eval.batch_size`).  Rows come from the DialogSum dev file (dialogue
prompts with the dialogsum example's system prompt) unless --data says otherwise.  Greedy decoding
is deterministic, so both runs must give the same answers: the script counts the rows where they
differ (padding changes float rounding, so a rare near-tie can flip a token).

    .venv/bin/python bench/generate_batched.py                 # 32 rows, batch 16, 8 and 32 vs 1, 48 new tokens
    .venv/bin/python bench/generate_batched.py --json          # the same, as JSON on stdout

Results also go to bench/results/generate_batched.json (written then renamed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "dialogsum-dev.jsonl"
DEFAULT_OUT = REPO / "bench" / "results" / "generate_batched.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32, help="prompts to answer (default 32)")
    parser.add_argument("--batch-sizes", default="16,8,32",
                        help="batch sizes to compare with one at a time; the first is the headline (default 16,8,32)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="JSONL with `dialogue` and `summary` columns")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    import torch

    from tunesmith.config import load_config
    from tunesmith.data.build import load_eval_rows
    from tunesmith.data.heldout import build_inputs
    from tunesmith.fileio import atomic_write_json
    from tunesmith.hardware import cpu_threads
    from tunesmith.models import load_tokenizer, resolve_model_source
    from tunesmith.models.generate import generate_answers
    from tunesmith.models.loader import load_model

    torch.set_num_threads(cpu_threads())
    cfg = load_config(REPO / "examples" / "dialogsum.yaml",
                      [f"data.path={args.data}", "data.validation_split=0", "model.dtype=float32"])
    source = resolve_model_source(cfg.model.name)
    tokenizer = load_tokenizer(source, cfg.model)
    _, samples, _ = load_eval_rows(args.data, "--data", cfg.data, tokenizer)
    inputs = build_inputs(samples, [], tokenizer, cfg.data.max_length, "causal_lm", False, args.rows)
    model = load_model(source, cfg, torch.float32)
    prompt_tokens = sum(len(p) for p in inputs.prompts)

    def timed(batch_size: int) -> tuple[float, list[str]]:
        started = time.perf_counter()
        answers = generate_answers(model, tokenizer, inputs.prompts, args.max_new_tokens, batch_size, "cpu",
                                   desc=f"batch {batch_size}")
        return time.perf_counter() - started, answers

    generate_answers(model, tokenizer, inputs.prompts[:2], 4, 2, "cpu", desc="warm-up")
    sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    one_s, one = timed(1)
    batched = []
    for size in sizes:
        seconds, answers = timed(size)
        batched.append({
            "batch_size": size, "seconds": seconds, "speedup": one_s / seconds,
            "answer_tokens": sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers),
            "rows_answered_differently": sum(a != b for a, b in zip(one, answers)),
        })
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": cfg.model.name,
        "rows": len(inputs.prompts),
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "one_at_a_time_s": one_s,
        "batched": batched,
        "speedup": batched[0]["speedup"],  # the headline: the first batch size
    }
    atomic_write_json(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['rows']} rows ({prompt_tokens} prompt tokens), at most {args.max_new_tokens} new tokens each:")
        print(f"  one at a time: {one_s:.1f} s")
        for b in batched:
            print(f"  batch {b['batch_size']:3d}: {b['seconds']:6.1f} s   speed-up {b['speedup']:.2f}x   "
                  f"rows answered differently from one at a time: {b['rows_answered_differently']}")
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
