"""The teacher: loading it (a model, or a tunesmith run with its adapter applied on the fly), and its view of
the rows the student trains on, position by position, through the student's own batching."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.errors import UserError
from tunesmith.models import resolve_model_source
from tunesmith.models.loader import load_model, load_tokenizer, model_task
from tunesmith.models.parts import decoder_and_head
from tunesmith.models.run_folder import load_for_inference, open_run
from tunesmith.train.loss import packed_trained_hidden, padded_trained_hidden
from tunesmith.train.packing import packing_unsupported


@dataclass
class Teacher:
    model: torch.nn.Module  # eval mode, frozen (a PeftModel for a run folder: base + adapter, unmerged)
    tokenizer: object
    label: str  # what teacher.name said
    source: str  # the base model folder
    weight_files: list[Path]  # the safetensors files its weights come from (base, and the adapter's)
    packable: bool  # its attention can run padding-free passes


def model_weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a model or adapter folder (what its size on disk is)."""
    return sorted(Path(folder).glob("*.safetensors"))


def load_teacher(cfg, device: str, dtype: torch.dtype) -> Teacher:
    """`teacher.name` loaded for inference in `dtype` on `device` (4-bit with `teacher.load_in_4bit`)."""

    name = cfg.teacher.name
    if not name:
        raise UserError("teacher.name is not set; `tunesmith distill` needs the model that teaches (a model name, "
                        "a Hugging Face folder, or a tunesmith run folder).")
    method = {"method": "qlora"} if cfg.teacher.load_in_4bit else {"method": "lora"}
    if Path(name, "config.yaml").is_file():  # a tunesmith run: its base with the trained adapter on top
        handle = open_run(name)
        if cfg.teacher.load_in_4bit:  # (a qlora run's base is 4-bit already)
            handle.cfg = handle.cfg.model_copy(update=method)
        model, tokenizer, task = load_for_inference(handle, dtype=dtype, device=device, merged=False)
        files = model_weight_files(handle.source) + model_weight_files(handle.weights)
        source = handle.source
    else:
        source = resolve_model_source(name, key="teacher.name")
        teacher_cfg = cfg.model_copy(update={**method, "model": cfg.model.model_copy(update={"name": name})})
        task = model_task(source, teacher_cfg)
        tokenizer = load_tokenizer(source, teacher_cfg.model)
        model = load_model(source, teacher_cfg, dtype, task).to(device).eval()
        files = model_weight_files(source)
    if task != "causal_lm":
        raise UserError(f"teacher.name: {name} is a {task} model; distillation here is for causal language models.")
    model.requires_grad_(False)
    model.config.use_cache = False
    return Teacher(model, tokenizer, name, source, files, packing_unsupported(model, cfg.data.max_length) is None)


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (vocabulary and special tokens), so logits can be matched."""
    return len(a) == len(b) and a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


@torch.no_grad()
def teacher_trained_hidden(teacher: Teacher, unit) -> tuple[torch.Tensor, torch.nn.Module]:
    """(the teacher's last hidden states at the unit's trained positions [N, H_teacher], its output projection),
    in the order the student's loss takes them.  `unit` is a padded batch (dict) or a `train.packing.Pass`."""
    decoder, head = decoder_and_head(teacher.model)
    if decoder is None:
        raise UserError(f"teacher.name: tunesmith cannot reach {teacher.label}'s decoder and output layer apart, "
                        "which logit distillation needs.")
    if isinstance(unit, dict):
        hidden, _ = padded_trained_hidden(decoder, unit["input_ids"], unit["attention_mask"], unit["labels"])
        return hidden, head
    if teacher.packable:
        return packed_trained_hidden(teacher.model, decoder, unit)[0], head
    # a teacher whose attention cannot run padding-free passes: each row alone, which is the same computation
    bounds = unit.cu_seq_lens.tolist()
    parts = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        row_ids = unit.input_ids[:, s:e]
        targets = unit.targets[s:e]
        labels = torch.cat([row_ids[0, :1], targets[:-1]])[None]  # [1, n]: labels whose shift gives `targets`
        parts.append(padded_trained_hidden(decoder, row_ids, torch.ones_like(row_ids), labels)[0])
    return torch.cat(parts), head
