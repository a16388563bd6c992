"""llama.cpp itself reads tunesmith's GGUF export: greedy text and perplexity against the merged Hugging Face model.

llama.cpp is what Ollama and LM Studio run a GGUF with.  This script installs it from PyPI
(`llama-cpp-python`, which compiles llama.cpp with cmake: about 5 minutes on two cores, once) into
bench/.llamacpp (git-ignored; the .venv is not touched) and imports it from there.  Then, on the built-in
model (smollm2-135m-instruct):

1. a tuned run: the README's quickstart, its own 40 steps (or --steps N, or the run given with --run);
2. `tunesmith merge` (float32) and `tunesmith export --format gguf` with `--quant f16`, `q8_0` and `f32`;
3. greedy text: the first --prompts held-out rows of examples/data/dates-test.jsonl, chat-templated by
   tunesmith (`encode_prompt`), the same token ids fed to llama.cpp (`Llama.eval`, no tokenizer in between,
   so no second BOS) and to the merged model (transformers, float32); --new-tokens tokens each by argmax, not
   stopped at the end-of-turn token, so every prompt compares the same number of tokens.  The f32 file must
   give the merged model's ids on every prompt (the export itself is exact).  The f16 file must give the ids of
   the merged model with its matrices rounded to f16 (what an f16 file can hold), and wherever it differs from
   the float32 merged model the difference must start at a near-tie: a step where the merged model's best two
   logits are closer than the file's largest logit error.  The script also checks that llama.cpp's own
   tokenizer turns the templated prompt text into the same ids, and its detokenizer the ids into the same text;
4. perplexity on every held-out row, the same token ids through all of them: on the reply tokens (the ones
   training scores) and on all tokens.  q8_0 must be within 2% of f16, f16 within 0.5% of the merged model;
5. tiny random models of every other family tunesmith exports (Qwen3, Gemma, Gemma 2, Gemma 3, Phi-3 with and
   without LongRoPE; the ones tests/test_ship_gguf.py builds), exported f16 and read by llama.cpp: its
   tokenizer against the Hugging Face one on a few texts, its logits against the model's on the same ids, and 12
   greedy tokens.

The numbers, the commands and the CPU go to bench/RESULTS.md (this script's own section) and
bench/results/llamacpp_check.json.  It exits non-zero when a check fails.

    .venv/bin/python bench/llamacpp_check.py                    # install if needed, train, compare
    .venv/bin/python bench/llamacpp_check.py --run runs/mine    # an existing run of the built-in model
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMACPP_DIR = REPO / "bench" / ".llamacpp"
LLAMACPP_PACKAGE = "llama-cpp-python==0.3.36"  # vendors llama.cpp at the commit its gguf-py calls 0.19.0
RESULTS_MD = REPO / "bench" / "RESULTS.md"
RESULTS_JSON = REPO / "bench" / "results" / "llamacpp_check.json"
HEADING = "## llama.cpp reads the GGUF export (`bench/llamacpp_check.py`)"
TUNESMITH = Path(sys.executable).parent / "tunesmith"
COMMANDS: list[str] = []  # every command this script ran, for the results


def run(command: list[str]) -> None:
    COMMANDS.append(shlex.join(str(part).replace(f"{REPO}/", "") for part in command))  # paths from the repo root
    print("+", COMMANDS[-1], flush=True)
    subprocess.run([str(part) for part in command], check=True, cwd=REPO)


def import_llama_cpp():
    """llama_cpp from bench/.llamacpp, installed there first when it is missing."""
    if not (LLAMACPP_DIR / "llama_cpp" / "__init__.py").is_file():
        print(f"installing {LLAMACPP_PACKAGE} into {LLAMACPP_DIR}: it compiles llama.cpp, a few minutes",
              flush=True)
        os.environ.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        run([sys.executable, "-m", "pip", "install", "--quiet", "--target", LLAMACPP_DIR, LLAMACPP_PACKAGE])
    # appended, not prepended: the .venv's numpy and jinja2 stay the ones imported; only llama_cpp (and its
    # diskcache) come from the folder
    sys.path.append(str(LLAMACPP_DIR))
    import llama_cpp

    return llama_cpp


def cpu_description(llama_cpp) -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    return {
        "name": name.group(1).strip() if name else platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "flags": [flag for flag in wanted if flag in flags],
        "missing_flags": [flag for flag in wanted if flag not in flags],
        "llama_cpp_build": llama_cpp.llama_print_system_info().decode().strip(),
    }


def load_gguf(llama_cpp, path: Path, n_ctx: int):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, n_threads_batch=2,
                           logits_all=True, verbose=False)


def llamacpp_logits(llm, ids: list[int]):
    """[len(ids), vocab] float32 logits of llama.cpp for these ids, from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return llm.scores[: len(ids)].copy()


def llamacpp_greedy(llm, ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """(argmax tokens, the gap between the best and second logit at each step)."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out, gaps = [], []
    for _ in range(new_tokens):
        logits = llm.scores[llm.n_tokens - 1]
        top2 = np.partition(logits, -2)[-2:]
        out.append(int(np.argmax(logits)))
        gaps.append(float(top2[1] - top2[0]))
        llm.eval([out[-1]])
    return out, gaps


def hf_greedy(model, ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """The same argmax loop on a transformers model (float32, KV cache)."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        tokens, gaps = [], []
        for _ in range(new_tokens):
            logits = out.logits[0, -1]
            top2 = torch.topk(logits, 2).values
            tokens.append(int(logits.argmax()))
            gaps.append(float(top2[0] - top2[1]))
            out = model(torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
    return tokens, gaps


def hf_logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def negative_log_likelihood(logits, ids: list[int], labels: list[int]) -> tuple[float, int, float, int]:
    """(sum of -log p over reply tokens, their count, the same over every token after the first, its count);
    the logit at position t predicts the token at t + 1."""
    import numpy as np

    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # [T, V]
    nll = -log_probs[np.arange(len(ids) - 1), ids[1:]]  # [T - 1]
    scored = np.array([label != -100 for label in labels[1:]])
    return float(nll[scored].sum()), int(scored.sum()), float(nll.sum()), len(nll)


def perplexities(score, rows) -> dict:
    reply_nll = reply_n = all_nll = all_n = 0
    for row in rows:
        a, b, c, d = negative_log_likelihood(score(row.input_ids), row.input_ids, row.labels)
        reply_nll, reply_n, all_nll, all_n = reply_nll + a, reply_n + b, all_nll + c, all_n + d
    return {"reply": math.exp(reply_nll / reply_n), "all": math.exp(all_nll / all_n), "reply_tokens": reply_n,
            "all_tokens": all_n}


def rounded_to_f16(model):
    """A copy of `model` whose matrices hold their f16 values (computing in float32 still): what an f16 file can
    hold at best, to tell f16's own rounding from a mistake in the export."""
    import copy

    import torch

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            if param.ndim == 2:
                param.copy_(param.half().float())
    return rounded


def check_builtin(llama_cpp, args, work: Path) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data import encode_prompt, prompt_and_references
    from tunesmith.data.build import load_eval_rows
    from tunesmith.hardware import cpu_threads
    from tunesmith.models.run_folder import open_run

    torch.set_num_threads(cpu_threads())
    run_dir = Path(args.run) if args.run else work / "run"
    if not args.run:
        run([TUNESMITH, "train", "examples/quickstart.yaml", "--set", f"training.max_steps={args.steps}",
             "--set", "eval.enabled=false", "--output", run_dir])
    merged_dir = work / "merged"
    files = {quant: work / f"model-{quant}.gguf" for quant in ("f16", "q8_0", "f32")}
    run([TUNESMITH, "merge", run_dir, "--out", merged_dir, "--dtype", "float32"])
    export_seconds = {}
    for quant, path in files.items():
        start = time.perf_counter()
        run([TUNESMITH, "export", run_dir, "--format", "gguf", "--quant", quant, "--out", path])
        export_seconds[quant] = time.perf_counter() - start

    handle = open_run(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    test_path = handle.cfg.data.test_path or str(REPO / "examples" / "data" / "dates-test.jsonl")
    _, samples, rows = load_eval_rows(test_path, "data.test_path", handle.cfg.data, tokenizer)
    prompts = [encode_prompt(prompt_and_references(sample)[0], tokenizer) for sample in samples[: args.prompts]]
    n_ctx = max(max(len(p) for p in prompts) + args.new_tokens, max(len(r.input_ids) for r in rows)) + 8

    merged = [hf_greedy(model, ids, args.new_tokens) for ids in prompts]
    merged_f16 = [hf_greedy(rounded_to_f16(model), ids, args.new_tokens)[0] for ids in prompts]
    prompt_logits = [hf_logits(model, ids) for ids in prompts]
    result = {"run": str(run_dir), "rows": len(rows), "prompts": len(prompts), "new_tokens": args.new_tokens,
              "export_seconds": export_seconds, "files": {}, "perplexity": {},
              "merged_f16_rounded_same_as_merged": sum(a == b[0] for a, b in zip(merged_f16, merged)),
              "merged_logit_std": float(np.std(np.concatenate([logits.ravel() for logits in prompt_logits])))}
    result["perplexity"]["merged (transformers, float32)"] = perplexities(partial(hf_logits, model), rows)
    for quant, path in files.items():
        llm = load_gguf(llama_cpp, path, n_ctx)
        # the largest difference between llama.cpp's logits and the merged model's on the prompts: the file's noise
        noise = max(float(np.abs(llamacpp_logits(llm, ids) - want).max()) for ids, want in zip(prompts, prompt_logits))
        row = {"bytes": path.stat().st_size, "max_logit_error": noise, "same_greedy_ids": 0, "same_greedy_text": 0,
               "same_as_merged_rounded_to_f16": 0, "same_prompt_tokenization": 0, "same_detokenization": 0,
               "differences": []}
        for number, (ids, (want, want_gaps), want_f16) in enumerate(zip(prompts, merged, merged_f16)):
            got, _ = llamacpp_greedy(llm, ids, args.new_tokens)
            row["same_greedy_ids"] += got == want
            row["same_greedy_text"] += tokenizer.decode(got) == tokenizer.decode(want)
            row["same_as_merged_rounded_to_f16"] += got == want_f16
            if got != want:
                at = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
                # a near-tie: the merged model's best two logits closer than the file's logit noise
                row["differences"].append({"prompt": number, "token": at, "merged_top2_gap": want_gaps[at],
                                           "near_tie": want_gaps[at] < noise, "merged": tokenizer.decode(want),
                                           "gguf": tokenizer.decode(got)})
            text = tokenizer.decode(ids)
            # add_bos=True lets the file decide (SmolLM2's adds none): no second BOS in front of the template's ids
            row["same_prompt_tokenization"] += llm.tokenize(text.encode(), add_bos=True, special=True) == ids
            row["same_detokenization"] += (llm.detokenize(want, special=True).decode("utf-8", "replace")
                                           == tokenizer.decode(want))
        result["files"][quant] = row
        result["perplexity"][f"GGUF {quant} (llama.cpp)"] = perplexities(partial(llamacpp_logits, llm), rows)
        del llm
    result["sample"] = {"prompt": tokenizer.decode(prompts[0]), "merged": tokenizer.decode(merged[0][0])}
    return result


def check_families(llama_cpp, work: Path) -> list[dict]:
    """Tiny random models of each family: llama.cpp's tokenizer, logits and greedy tokens against the model's."""
    import numpy as np

    sys.path.insert(0, str(REPO / "tests"))
    import test_ship_gguf as shapes  # the tiny models and tokenizers the export tests build

    from tunesmith.ship.gguf_export import export_gguf

    rows = []
    for family in ("qwen3", "gemma", "gemma2", "gemma3", "phi3", "phi3-longrope"):
        folder, model, tokenizer = shapes._family_folder(work / "families", family)
        path = work / "families" / f"{family}-f16.gguf"
        export_gguf(folder, path, quant="f16")
        llm = load_gguf(llama_cpp, path, 256)
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a joke."},
                                              {"role": "assistant", "content": "Why did the chicken cross the road?"}],
                                             tokenize=False)
        texts = [*shapes.TEXTS, shapes.LONG_PROMPT, chat]
        # plain text with the tokenizer's own BOS rule; the chat text as apply_chat_template tokenizes it
        tokenized = sum(llm.tokenize(t.encode(), add_bos=t != chat, special=True)
                        == tokenizer(t, add_special_tokens=t != chat)["input_ids"] for t in texts)
        ids = tokenizer(shapes.LONG_PROMPT)["input_ids"]
        want = hf_logits(model, ids)
        error = float(np.abs(llamacpp_logits(llm, ids) - want).max() / want.std())
        greedy = llamacpp_greedy(llm, ids, 12)[0] == hf_greedy(model, ids, 12)[0]
        rows.append({"family": family, "architecture": llm.metadata.get("general.architecture"),
                     "same_tokenization": f"{tokenized}/{len(texts)}", "tokens": len(ids),
                     "max_logit_error_over_std": error, "same_greedy_12": greedy})
        print(rows[-1], flush=True)
        del llm
    return rows


def verdict(built: dict, families: list[dict]) -> list[str]:
    """The checks that failed (none: pass).  The export must be exact (f32 file: the merged model's greedy ids on
    every prompt), the f16 file must give the ids of the merged model with f16-rounded weights, and where it
    differs from the float32 merged model the difference must start at a near-tie; perplexities within 2% (q8_0
    against f16) and 0.5% (f16 against the merged model); llama.cpp's tokenizer and detokenizer agreeing on every
    prompt; the tiny families' logits and greedy tokens equal."""
    n, files = built["prompts"], built["files"]
    f16, q8, merged = (built["perplexity"][name] for name in
                       ("GGUF f16 (llama.cpp)", "GGUF q8_0 (llama.cpp)", "merged (transformers, float32)"))
    checks = (
        (files["f32"]["same_greedy_ids"] == n, "the f32 file's greedy ids differ from the merged model's"),
        (files["f16"]["same_as_merged_rounded_to_f16"] == n,
         "the f16 file's greedy ids differ from the merged model's with f16-rounded weights"),
        (all(d["near_tie"] for d in files["f16"]["differences"]), "an f16 difference starts at no near-tie"),
        (all(row["same_prompt_tokenization"] == row["same_detokenization"] == n for row in files.values()),
         "llama.cpp tokenizes or detokenizes a prompt differently"),
        (abs(q8["reply"] / f16["reply"] - 1) <= 0.02, "q8_0 perplexity more than 2% from f16"),
        (abs(f16["reply"] / merged["reply"] - 1) <= 0.005, "f16 perplexity more than 0.5% from the merged model"),
        (all(row["same_greedy_12"] and row["max_logit_error_over_std"] < 0.02 for row in families),
         "a tiny family's llama.cpp logits differ from the model's"),
    )
    return [message for ok, message in checks if not ok]


def markdown(built: dict, families: list[dict], cpu: dict, command: str, passed: bool, checks: list[str]) -> str:
    lines = [
        HEADING,
        "",
        f"`{command}` on {datetime.date.today().isoformat()}: {cpu['name']}, {cpu['cores']} cores, flags "
        f"{', '.join(cpu['flags']) or 'none of note'} (no {', '.join(cpu['missing_flags']) or '-'}); "
        f"{LLAMACPP_PACKAGE} compiled here (`{cpu['llama_cpp_build']}`), 2 threads; torch "
        f"{__import__('torch').__version__}. Verdict: **{'pass' if passed else 'FAIL'}**"
        + ("" if passed else f" ({'; '.join(checks)})") + ".",
        "",
        f"The built-in model tuned by `{COMMANDS[0] if COMMANDS else 'the run given'}`, merged in float32 and "
        f"exported to f16, q8_0 and f32. {built['prompts']} held-out prompts of `examples/data/dates-test.jsonl`, "
        f"chat-templated by tunesmith, the same ids fed to both; {built['new_tokens']} argmax tokens each, not "
        "stopped at the end of the turn. \"Max logit error\" is the largest difference between llama.cpp's logits and "
        "the merged model's over the prompts' positions; \"merged, f16 weights\" is the merged model with each matrix "
        "rounded to f16 and computing in float32 (the best an f16 file can hold):",
        "",
        "| file | size | max logit error | greedy ids = merged | greedy text = merged | ids = merged, f16 weights "
        "| llama.cpp tokenizes the prompt text to the same ids | llama.cpp detokenizes to the same text |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    n = built["prompts"]
    for quant, row in built["files"].items():
        lines.append(f"| GGUF {quant} | {row['bytes'] / 2**20:.1f} MiB | {row['max_logit_error']:.4f} "
                     f"| {row['same_greedy_ids']}/{n} | {row['same_greedy_text']}/{n} "
                     f"| {row['same_as_merged_rounded_to_f16']}/{n} | {row['same_prompt_tokenization']}/{n} "
                     f"| {row['same_detokenization']}/{n} |")
    f16, f32 = built["files"]["f16"], built["files"]["f32"]
    lines.append(f"\nThe merged model's logits on the prompts have a standard deviation of "
                 f"{built['merged_logit_std']:.2f}. The merged model with f16-rounded weights itself gives the float32 "
                 f"merged model's ids on {built['merged_f16_rounded_same_as_merged']}/{n} prompts.")
    if f32["same_greedy_ids"] == n and f16["same_as_merged_rounded_to_f16"] == n and f16["differences"] \
            and all(d["near_tie"] for d in f16["differences"]):
        lines.append(f"The f32 file gives the merged model's ids on every prompt, and the f16 file those of the merged "
                     f"model with f16-rounded weights: the export is exact, and f16 differs from float32 on "
                     f"{len(f16['differences'])} prompt(s) only where f16 rounding itself tips a near-tie:")
    lines.append("")
    for quant, row in built["files"].items():
        for diff in row["differences"]:
            lines.append(
                f"- {quant}, prompt {diff['prompt']}: the first different token is number {diff['token']}, where the "
                f"merged model's best two logits are {diff['merged_top2_gap']:.4f} apart "
                f"({'a near-tie: less than' if diff['near_tie'] else 'more than'} the file's max logit error). "
                f"Merged: `{json.dumps(diff['merged'])[1:-1]}`; GGUF: `{json.dumps(diff['gguf'])[1:-1]}`.")
    merged_ppl = built["perplexity"]["merged (transformers, float32)"]
    lines += [
        "",
        f"Perplexity on all {built['rows']} held-out rows, the same token ids through each "
        f"({merged_ppl['reply_tokens']} reply tokens, the ones training scores; {merged_ppl['all_tokens']} tokens in all):",
        "",
        "| model | reply-token perplexity | vs merged | all-token perplexity | vs merged |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, ppl in built["perplexity"].items():
        lines.append(f"| {name} | {ppl['reply']:.5f} | {ppl['reply'] / merged_ppl['reply'] - 1:+.3%} "
                     f"| {ppl['all']:.4f} | {ppl['all'] / merged_ppl['all'] - 1:+.3%} |")
    f16, q8 = built["perplexity"]["GGUF f16 (llama.cpp)"], built["perplexity"]["GGUF q8_0 (llama.cpp)"]
    lines += ["", f"q8_0 against f16: {q8['reply'] / f16['reply'] - 1:+.3%} (reply tokens), "
                  f"{q8['all'] / f16['all'] - 1:+.3%} (all tokens).", ""]
    lines.append(f"First prompt: `{json.dumps(built['sample']['prompt'])[1:-1]}` → merged model: "
                 f"`{json.dumps(built['sample']['merged'])[1:-1]}`")
    if families:
        lines += [
            "",
            "Tiny random models of the other families (2 layers, hidden 64; the tests' own), exported f16 and read by "
            "llama.cpp: its tokenizer on 7 texts (the last a chat-templated conversation) against the Hugging Face "
            "tokenizer, its logits on the same ids (largest difference over the logits' standard deviation), 12 "
            "argmax tokens:",
            "",
            "| family | llama.cpp architecture | same tokenization | prompt tokens | max logit error / std "
            "| same 12 greedy tokens |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for row in families:
            lines.append(f"| {row['family']} | {row['architecture']} | {row['same_tokenization']} | {row['tokens']} "
                         f"| {row['max_logit_error_over_std']:.5f} | {'yes' if row['same_greedy_12'] else 'no'} |")
    lines += ["", "Commands it ran:", "", "```", *COMMANDS, "```", ""]
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Put `text` in bench/RESULTS.md in place of this script's section (or at the end), other sections untouched."""
    from tunesmith.fileio import atomic_write_text

    old = RESULTS_MD.read_text(encoding="utf-8") if RESULTS_MD.exists() else "# Benchmark results\n"
    if HEADING in old:
        before, _, rest = old.partition(HEADING)
        after = rest[rest.index("\n## "):] if "\n## " in rest else ""
        new = before + text.rstrip("\n") + "\n" + after
    else:
        new = old.rstrip("\n") + "\n\n" + text
    atomic_write_text(RESULTS_MD, new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="an existing run of the built-in model (default: train one, --steps steps)")
    parser.add_argument("--steps", type=int, default=40,
                        help="training steps when no --run is given (default 40, the quickstart's own)")
    parser.add_argument("--prompts", type=int, default=10, help="held-out prompts for greedy text (default 10)")
    parser.add_argument("--new-tokens", type=int, default=32, help="argmax tokens a prompt (default 32)")
    parser.add_argument("--work", default=str(REPO / "runs" / "llamacpp-check"),
                        help="where the run, the merged model and the GGUF files go (default runs/llamacpp-check)")
    parser.add_argument("--no-families", action="store_true", help="skip the tiny models of the other families")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md as it is")
    args = parser.parse_args()

    command = shlex.join(["python", "bench/llamacpp_check.py", *sys.argv[1:]])
    work = Path(args.work)
    if work.exists() and any(work.iterdir()):
        print(f"{work} is not empty; give --work a new folder (tunesmith writes nothing over)", file=sys.stderr)
        return 2
    llama_cpp = import_llama_cpp()
    cpu = cpu_description(llama_cpp)
    started = time.perf_counter()
    built = check_builtin(llama_cpp, args, work)
    families = [] if args.no_families else check_families(llama_cpp, work)

    failed = verdict(built, families)
    result = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu,
              "package": LLAMACPP_PACKAGE, "builtin": built, "families": families, "commands": COMMANDS,
              "failed": failed, "seconds": time.perf_counter() - started}
    print(json.dumps(result, indent=2))
    if not args.no_write:
        from tunesmith.fileio import atomic_write_json

        atomic_write_json(RESULTS_JSON, result)
        write_section(markdown(built, families, cpu, command, not failed, failed))
        print(f"wrote {RESULTS_JSON} and the section '{HEADING}' of {RESULTS_MD}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
