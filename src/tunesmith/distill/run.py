"""`tunesmith distill`: a teacher teaches a student through the ordinary training loop.

1. The teacher is loaded (a tunesmith run: its base with the adapter applied on the fly).
2. The student is `student.name`, `model.name`, or with `student.prune` a copy of the teacher keeping
   `keep_layers` evenly spaced layers, initialised from its weights (saved in the run folder as
   `student-init/`, which the run's config then names as its model).
3. Same tokenizer: logit distillation.  Each step the student's loss on its trained tokens is
   alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy (see distill/loss.py), with the
   teacher's logits from its own forward pass on the same rows (online), or, with `--cache-teacher`, from
   its top-k log-probs computed once before training (distill/cache.py).
   Different tokenizers: sequence-level distillation.  The teacher writes an answer for every training
   prompt, and the student is fine-tuned on those answers (validation and held-out rows keep the data's own).
4. The run folder gets `distill.json` and a section of report.md comparing teacher and student:
   parameters, size on disk, held-out loss and generation speed.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

import torch

from tunesmith.data import build_datasets, data_origin
from tunesmith.data.batching import collate, iter_batches
from tunesmith.data.build import _load_samples, _tokenizer_fingerprint, mixed_samples, split_indices
from tunesmith.data.formats import prompt_and_reference
from tunesmith.data.heldout import build_inputs
from tunesmith.data.tokens import IGNORE_INDEX, encode_prompt
from tunesmith.distill.cache import MANIFEST, TeacherCache, build_cache, describe
from tunesmith.distill.loss import DenseTeacher, distill_sum
from tunesmith.distill.prune import prune_layers
from tunesmith.distill.teacher import Teacher, load_teacher, model_weight_files, same_tokenizer, teacher_trained_hidden
from tunesmith.errors import UserError
from tunesmith.fileio import atomic_write_dir, atomic_write_json, atomic_write_text
from tunesmith.hardware import detect_device, resolve_dtype
from tunesmith.models import resolve_model_source, tunesmith_home
from tunesmith.models.generate import generate_answers
from tunesmith.models.loader import load_model, load_tokenizer
from tunesmith.models.parts import decoder_and_head
from tunesmith.models.run_folder import load_for_inference, open_run
from tunesmith.train.loop import run_training
from tunesmith.train.loss import head_nll_sum, packed_trained_hidden, padded_trained_hidden
from tunesmith.train.objective import Objective
from tunesmith.train.packing import make_pass, plan_passes, resolve_pass_tokens
from tunesmith.train.report import render_report
from tunesmith.train.validation import heldout_loss

log = logging.getLogger(__name__)

GENERATION_PROMPTS = 8  # held-out prompts each model answers for the generation-speed comparison


class Distiller:
    """The training loop's loss for one unit (a padded batch or a packed pass) when a teacher teaches."""

    def __init__(self, teacher: Teacher | None, temperature: float, alpha: float, cache=None):
        self.teacher, self.temperature, self.alpha, self.cache = teacher, temperature, alpha, cache

    def loss_sum(self, model, unit) -> tuple[torch.Tensor, int]:
        """(summed distillation loss over the unit's trained tokens, how many there were)."""
        decoder, head = decoder_and_head(model)
        if decoder is None:
            raise UserError("distillation needs a student whose decoder and output layer tunesmith can reach apart.")
        if isinstance(unit, dict):
            hidden, targets = padded_trained_hidden(decoder, unit["input_ids"], unit["attention_mask"], unit["labels"])
        else:
            hidden, targets = packed_trained_hidden(model, decoder, unit)
        if self.alpha == 0.0:  # cross-entropy alone: the teacher has nothing to add
            return head_nll_sum(head, hidden, targets), targets.shape[0]
        signal = self.teacher_signal(unit)
        return distill_sum(head, hidden, targets, signal, self.temperature, self.alpha), targets.shape[0]

    def teacher_signal(self, unit):
        if self.cache is not None:
            return self.cache.lookup(*_unit_rows(unit))
        return DenseTeacher(*teacher_trained_hidden(self.teacher, unit))


def _unit_rows(unit) -> tuple[list, list[int]]:
    """(each row's token ids, each row's trained-token count) of a padded batch or packed pass, in order."""
    if isinstance(unit, dict):
        lengths = unit["attention_mask"].sum(dim=1).tolist()
        ids = [unit["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]
        counts = [int((unit["labels"][i, 1:n] != IGNORE_INDEX).sum()) for i, n in enumerate(lengths)]
        return ids, counts
    bounds = unit.cu_seq_lens.tolist()
    ids = [unit.input_ids[0, s:e].tolist() for s, e in zip(bounds[:-1], bounds[1:])]
    counts = [int((unit.targets[s:e] != IGNORE_INDEX).sum()) for s, e in zip(bounds[:-1], bounds[1:])]
    return ids, counts


def _student_cfg(cfg, name: str):
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": name})})


def make_pruned_student(cfg, teacher: Teacher, folder: Path) -> list[int]:
    """Write the layer-pruned copy of the teacher (its weights merged with any adapter) to `folder`."""

    dtype = resolve_dtype(cfg.model.dtype, "cpu")
    if Path(teacher.label, "config.yaml").is_file():
        full, _, _ = load_for_inference(open_run(teacher.label), dtype=dtype, device="cpu", merged=True)
    else:
        full = load_model(teacher.source, cfg.model_copy(update={"method": "full"}), dtype)
    kept = prune_layers(full, cfg.student.prune.keep_layers)

    def save(out: Path) -> None:
        full.save_pretrained(out, safe_serialization=True)
        teacher.tokenizer.save_pretrained(out)

    atomic_write_dir(folder, save)
    log.info(f"student: {teacher.label} pruned to {len(kept)} layers (kept {kept}), written to {folder}")
    return kept


def run_distillation(cfg, run_dir: Path, cache_teacher: bool = False, evaluation=None) -> dict:
    """Distil as the config says into `run_dir`; returns the run's summary (with a `distill` section).
    `evaluation` is passed on to `run_training` (the before/after comparison; see there)."""

    if cfg.method == "adalora":
        raise UserError("method: adalora adds its own loss term; distil with lora, dora, rslora, qlora or full.")
    device = detect_device()
    teacher = load_teacher(cfg, device, resolve_dtype(cfg.model.dtype, device))
    teacher_params = sum(p.numel() for p in teacher.model.parameters())
    log.info(f"teacher: {teacher.label}, {teacher_params:,} parameters")
    run_dir.mkdir(parents=True, exist_ok=True)
    pruned = None
    if cfg.student.prune is not None:
        if cfg.student.name:
            raise UserError("student: give either name (a model) or prune (a copy of the teacher), not both.")
        pruned = make_pruned_student(cfg, teacher, run_dir / "student-init")
        student_name = str((run_dir / "student-init").resolve())
    else:
        student_name = cfg.student.name or cfg.model.name
    student_cfg = _student_cfg(cfg, student_name)
    student_tokenizer = load_tokenizer(resolve_model_source(student_name), student_cfg.model)
    teacher_before = teacher_numbers(teacher.model, teacher.tokenizer, cfg, device)

    d = cfg.distill
    if same_tokenizer(teacher.tokenizer, student_tokenizer):
        mode = "logits"
        cache = None
        if cache_teacher:
            cache = open_or_build_cache(cfg, student_cfg, teacher, student_tokenizer, run_dir, device)
            teacher.model = None  # training reads the cache: the teacher's memory goes back
            gc.collect()
        log.info(f"distillation: logits, temperature {d.temperature}, alpha {d.alpha}; the teacher's "
               + (f"top-{d.top_k} log-probs from {cache.folder}" if cache else "logits from its forward pass each step"))
        summary = run_training(student_cfg, run_dir, distiller=Distiller(teacher, d.temperature, d.alpha, cache),
                               evaluation=evaluation)
    else:
        mode = "sequence"
        if cache_teacher:
            log.info("--cache-teacher: the tokenizers differ, so there are no logits to cache; the teacher's answers "
                   "are the cache (teacher-answers.jsonl).")
        log.info(f"distillation: sequence level: {student_name}'s tokenizer differs from {teacher.label}'s, so the "
               "teacher writes an answer for every training prompt and the student is fine-tuned on those answers")
        seq_cfg = write_teacher_answers(cfg, student_cfg, teacher, student_tokenizer, run_dir, device)
        summary = run_training(seq_cfg, run_dir, evaluation=evaluation)


    student_model, student_tok, _ = load_for_inference(open_run(run_dir), device=device)
    student_after = teacher_numbers(student_model, student_tok, cfg, device)
    if cfg.method == "full":  # the whole model is in the run folder
        student_files = model_weight_files(run_dir / "model")
    else:  # the starting weights and the adapter on them
        student_files = model_weight_files(resolve_model_source(student_name)) + model_weight_files(run_dir / "adapter")
    section = {
        "mode": mode,
        "temperature": d.temperature, "alpha": d.alpha,
        "teacher_cache": str(cache.folder) if mode == "logits" and cache is not None else None,
        "pruned_layers_kept": pruned,
        "teacher": {"name": teacher.label, "parameters": teacher_params,
                    "size_on_disk_bytes": sum(f.stat().st_size for f in teacher.weight_files), **teacher_before},
        "student": {"name": student_name, "parameters": sum(p.numel() for p in student_model.parameters()),
                    "size_on_disk_bytes": sum(f.stat().st_size for f in student_files), **student_after},
    }
    del student_model
    summary["distill"] = section
    # the run's config.yaml names its teacher: it runs again through `tunesmith distill`, not `train`
    summary["next_commands"] = [c.replace("tunesmith train ", "tunesmith distill ", 1) for c in summary["next_commands"]]
    atomic_write_json(run_dir / "distill.json", section)
    atomic_write_json(run_dir / "summary.json", summary)
    atomic_write_text(run_dir / "report.md", render_report(summary, summary.get("eval_samples", []))
                      + "\n" + render_distill_section(section))
    return summary


def teacher_numbers(model, tokenizer, cfg, device) -> dict:
    """Held-out loss on the validation rows (tokenised by `tokenizer`) and greedy generation speed on a few
    held-out prompts, for the teacher-vs-student table."""

    bundle = build_datasets(cfg.data, tokenizer, cache_dir=tunesmith_home() / "tokenized")
    out = {}
    if bundle.validation:
        result = heldout_loss(model, bundle.validation, cfg.training.eval_batch_size, device,
                              Objective("causal_lm", tokenizer))
        out["heldout_loss"] = result["loss"]
    samples = (bundle.test_samples or [])[:GENERATION_PROMPTS]
    if samples and bundle.format != "text":
        inputs = build_inputs(samples, bundle.test[:GENERATION_PROMPTS], tokenizer, cfg.data.max_length, "causal_lm",
                              False, GENERATION_PROMPTS)
        started = time.perf_counter()
        answers = generate_answers(model, tokenizer, inputs.prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                                   device, desc="generation speed")
        seconds = time.perf_counter() - started
        new_tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        out["generation_tokens_per_s"] = new_tokens / seconds if seconds > 0 else None
    return out


def open_or_build_cache(cfg, student_cfg, teacher: Teacher, tokenizer, run_dir: Path, device):
    """The teacher cache for this run's training rows: reused from distill.cache_dir when it matches, else built."""

    d = cfg.distill
    folder = Path(d.cache_dir) if d.cache_dir else run_dir / "teacher-cache"
    about = describe(teacher.label, d.temperature, d.top_k, len(tokenizer), _tokenizer_fingerprint(tokenizer))
    if (folder / MANIFEST).is_file():
        log.info(f"teacher cache: reusing {folder}")
        return TeacherCache(folder, about)
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"distill.cache_dir: {folder} holds files but no {MANIFEST} (an unfinished cache, or "
                        "something else); point it at a new or empty folder.")
    bundle = build_datasets(student_cfg.data, tokenizer, cache_dir=tunesmith_home() / "tokenized")
    rows = bundle.train
    log.info(f"teacher cache: the teacher's top-{d.top_k} log-probs for {len(rows)} training rows into {folder}")
    if teacher.packable:
        budget = resolve_pass_tokens("auto", device, cfg.training.batch_size, cfg.data.max_length)
        units = ((make_pass(group).to(device), group) for group in plan_passes(rows, budget))
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        units = (({k: v.to(device) for k, v in collate(batch, pad).items()}, batch)
                 for batch in iter_batches(rows, cfg.training.batch_size, None))
    build_cache(folder, teacher, units, about)
    return TeacherCache(folder, about)


def write_teacher_answers(cfg, student_cfg, teacher: Teacher, student_tokenizer, run_dir: Path, device):
    """Sequence-level distillation's data: the teacher's answer to every training prompt
    (`teacher-answers.jsonl`), the data's own validation rows (`validation.jsonl`); returns the config that
    trains the student on them."""

    data = cfg.data
    if data.sources:  # the mixed rows (data/sources.py)
        train_samples, val_samples = mixed_samples(data)
    else:
        _, samples, _, _ = _load_samples(data.path, "data.path", data, data.limit)
        if data.validation_path:
            train_samples = samples
            _, val_samples, _, _ = _load_samples(data.validation_path, "data.validation_path", data)
        else:
            train_idx, val_idx = split_indices(len(samples), data.validation_split, data.seed)
            train_samples, val_samples = [samples[i] for i in train_idx], [samples[i] for i in val_idx]
    if any("messages" not in s for s in train_samples):
        raise UserError(f"{data_origin(data)} holds plain text rows; sequence-level distillation needs prompts "
                        "for the teacher to answer (alpaca, messages, sharegpt or prompt/completion rows).")
    prompts, conversations = [], []
    for sample in train_samples:
        messages, _ = prompt_and_reference(sample)
        conversations.append(messages)
        prompts.append(encode_prompt(messages, teacher.tokenizer)[-data.max_length:])
    log.info(f"teacher: answering {len(prompts)} training prompts (at most {cfg.distill.max_new_tokens} tokens each)")
    answers = generate_answers(teacher.model, teacher.tokenizer, prompts, cfg.distill.max_new_tokens,
                               cfg.distill.generation_batch_size, device, desc="teacher answers")
    rows = [{"messages": m + [{"role": "assistant", "content": a}]} for m, a in zip(conversations, answers)]
    atomic_write_text(run_dir / "teacher-answers.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    update = {"path": str((run_dir / "teacher-answers.jsonl").resolve()), "sources": [], "format": "messages",
              "columns": {}, "system_prompt": None, "limit": None, "validation_split": 0.0}
    if val_samples:
        val_rows = [{"messages": s["messages"]} for s in val_samples]
        atomic_write_text(run_dir / "validation.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in val_rows))
        update["validation_path"] = str((run_dir / "validation.jsonl").resolve())
        if not data.test_path:  # the held-out comparison stays on the data's own answers
            update["test_path"] = update["validation_path"]
    return student_cfg.model_copy(update={"data": data.model_copy(update=update)})


def render_distill_section(section: dict) -> str:
    """The teacher-vs-student table of report.md."""
    t, s = section["teacher"], section["student"]

    def cell(value, fmt="{:.4f}"):
        return fmt.format(value) if isinstance(value, (int, float)) else "-"

    how = ("logit matching, KL at temperature {temperature} mixed with cross-entropy by alpha {alpha}".format(**section)
           if section["mode"] == "logits" else "sequence level (the teacher's answers as training data)")
    lines = [
        "## Distillation: teacher vs student", "",
        f"Mode: {how}." + (f" Student: the teacher's layers {section['pruned_layers_kept']}." if section["pruned_layers_kept"] else ""),
        "", "| | teacher | student |", "|---|---:|---:|",
        f"| model | {t['name']} | {s['name']} |",
        f"| parameters | {t['parameters']:,} | {s['parameters']:,} |",
        f"| size on disk (MB) | {cell(t['size_on_disk_bytes'] / 1e6, '{:.1f}')} | {cell(s['size_on_disk_bytes'] / 1e6, '{:.1f}')} |",
        f"| held-out loss | {cell(t.get('heldout_loss'))} | {cell(s.get('heldout_loss'))} |",
        f"| generation tokens/s | {cell(t.get('generation_tokens_per_s'), '{:.1f}')} | {cell(s.get('generation_tokens_per_s'), '{:.1f}')} |",
        "",
    ]
    return "\n".join(lines)
