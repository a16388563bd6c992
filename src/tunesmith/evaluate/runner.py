"""`tunesmith eval RUN_DIR`: the run's base model and its tuned model on the same rows, with the same
decoding, scored with every metric `eval.metrics` names; the results go to `RUN_DIR/eval/`.

An adapter run loads the base model once: the base is scored with the adapter switched off, the
tuned model with it on.  A full fine-tune loads the base, scores it, frees it, then loads the tuned
weights from `RUN_DIR/model`.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from tunesmith.config import PREFERENCE_OBJECTIVES
from tunesmith.data import build_datasets
from tunesmith.data.build import load_eval_rows
from tunesmith.data.heldout import build_inputs
from tunesmith.errors import UserError
from tunesmith.evaluate.suite import Scorer, evaluate_model, run_rewards, write_eval_folder
from tunesmith.hardware import cpu_threads, detect_device, release_free_memory, resolve_dtype
from tunesmith.models import tunesmith_home, without_bitsandbytes
from tunesmith.models.loader import load_model, model_task
from tunesmith.models.run_folder import load_base, load_tokenizer_for, open_run
from tunesmith.models.tasks import MASKED_LM
from tunesmith.prefer.evaluate import PreferenceEval
from tunesmith.prefer.recipe import PreferenceRecipe
from tunesmith.train.objective import Objective

log = logging.getLogger(__name__)


def evaluate_run(run_dir: str | Path, data: str | None = None, limit: int | None = None,
                 overrides: list[str] | tuple = ()) -> dict:
    """Score base and tuned on the run's held-out rows (or every row of `data`), at most `limit` rows
    (default: the config's eval.limit); returns {"base", "tuned", "notes", "eval_dir"}."""

    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: give a number of rows of at least 1 (or leave it out for eval.limit).")
    handle = open_run(run_dir, overrides)
    if handle.kind == "folder":
        raise UserError(f"{run_dir} is a model folder, not a run: eval compares a run's base model with its tuned "
                        "one, so give the folder that `tunesmith train` printed.")
    run_dir, cfg, kind, tuned_dir, source = handle.path, handle.cfg, handle.kind, handle.weights, handle.source

    device = detect_device()
    if device == "cpu":
        torch.set_num_threads(cfg.training.num_threads or cpu_threads())
    dtype = resolve_dtype(cfg.model.dtype, device)
    tokenizer = load_tokenizer_for(handle)
    task = model_task(source, cfg)

    if cfg.objective.type in PREFERENCE_OBJECTIVES or cfg.objective.type == "kto":
        return _evaluate_preferences(handle, cfg, tokenizer, task, device, dtype, data, limit)
    if data:
        fmt, samples, rows = load_eval_rows(data, "--data", cfg.data, tokenizer, task)
        where = f"{data} ({len(samples)} rows)"
    else:
        bundle = build_datasets(cfg.data, tokenizer, cache_dir=tunesmith_home() / "tokenized", task=task)
        fmt, samples, rows = bundle.format, bundle.test_samples, bundle.test
        where = "the run's held-out rows" + (f" ({cfg.data.test_path})" if cfg.data.test_path else "")
    limit = limit or cfg.eval.limit
    inputs = build_inputs(samples, rows, tokenizer, cfg.data.max_length, task, fmt == "text", limit)
    if not inputs.prompts and not inputs.rows:
        raise UserError(f"nothing to evaluate: {where} gave no rows; give --data FILE with prompt/answer rows.")
    log.info(f"eval: {cfg.model.name} ({kind}: {tuned_dir}) on {max(len(inputs.prompts), len(inputs.rows))} rows of "
           f"{where}; {device}, {str(dtype).replace('torch.', '')}")
    objective = Objective(task, tokenizer)
    scorer = Scorer(cfg.eval, device=device)
    loss_batch = cfg.training.eval_batch_size

    rewards = run_rewards(cfg)

    def run(model, label: str):
        result = evaluate_model(model, tokenizer, inputs, cfg.eval, device, label, objective, scorer, loss_batch,
                                rewards)
        log.info(f"{label}: " + ", ".join(f"{k}={v:.4g}" for k, v in result[0].items() if k not in ("rows", "loss_tokens")))
        return result

    (base, base_answers), (tuned, tuned_answers) = _base_then_tuned(handle, cfg, dtype, task, device, run)
    if task == MASKED_LM:
        log.info("eval: a masked-language model does not generate; only the held-out loss is compared.")

    about = {"run_dir": str(run_dir), "model": cfg.model.name, "what": f"base vs {cfg.method}-tuned ({kind}/)",
             "data": where, "max_new_tokens": cfg.eval.max_new_tokens}
    eval_dir = run_dir / "eval"
    write_eval_folder(eval_dir, base, tuned, inputs, base_answers, tuned_answers, about, scorer.notes)
    return {"base": base, "tuned": tuned, "notes": dict(scorer.notes), "eval_dir": str(eval_dir)}


def _base_then_tuned(handle, cfg, dtype, task: str, device, score):
    """(score(base model, "base"), score(tuned model, "tuned")).  An adapter run loads the base once and scores it
    with the adapter switched off, then on; a full fine-tune scores the base, frees it, then loads the tuned weights."""
    base_model = load_base(handle, dtype, task).to(device)
    release_free_memory()
    if handle.kind == "adapter":
        with without_bitsandbytes():
            from peft import PeftModel

            model = PeftModel.from_pretrained(base_model, str(handle.weights), is_trainable=False)
        with model.disable_adapter():
            base = score(model, "base")
        return base, score(model, "tuned")
    base = score(base_model, "base")
    del base_model
    gc.collect()
    release_free_memory()
    return base, score(load_model(str(handle.weights), cfg, dtype, task, for_training=False).to(device), "tuned")


def _evaluate_preferences(handle, cfg, tokenizer, task: str, device, dtype, data: str | None, limit: int | None) -> dict:
    """A preference run (dpo, ipo, orpo, simpo, kto): base and tuned log-probs of the held-out pairs (or every row of
    `data`), scored as the run's own evaluation scores them (prefer/evaluate.py); writes RUN_DIR/eval/preference.json."""
    recipe = PreferenceRecipe(cfg)
    if data:  # every row of the file, read with the run's data settings
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"path": data, "sources": [], "validation_split": 0.0, "validation_path": None, "test_path": None,
                    "limit": None})})
    bundle = recipe.build_data(cfg, tokenizer, task)
    if data:
        bundle.test = bundle.train
    if limit is not None:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"limit": limit})})
    scoring = PreferenceEval(recipe, cfg, bundle, device)
    if not scoring.rows:
        raise UserError(f"nothing to evaluate: {data or 'the run'} gave no held-out preference rows; give --data FILE.")
    log.info(f"eval: {cfg.model.name} ({handle.kind}: {handle.weights}), {cfg.objective.type}, on {len(scoring.rows)} "
             f"held-out {'pairs' if recipe.paired else 'answers'}{f' of {data}' if data else ''}")
    seen: dict = {}

    def score(model, label: str):
        if label == "base":
            seen["base"] = scoring.before(model)
            return seen["base"]
        return scoring.after(model, seen["base"], handle.path)[0]

    _, section = _base_then_tuned(handle, cfg, dtype, task, device, score)
    return {**section, "notes": {}, "eval_dir": str(handle.path / "eval"), "files": ["preference.json"]}
