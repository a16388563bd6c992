"""DPO, IPO, SimPO, ORPO and KTO as a recipe of the training loop (train/loop.py, `run_training(recipe=...)`).

The loop stays the same loop (epochs, optimiser steps, checkpoints, validation, several processes); what a
recipe changes is what a micro-batch is and what its loss is:

    units(rows)      a micro-batch of pairs -> one pass holding every pair's chosen and rejected answer
    begin_step(...)  the whole optimiser step's units, before its passes (the counts a loss is weighed by)
    loss_sum(unit)   the summed loss of the unit's pairs; the loop divides by the step's pairs
    heldout(rows)    validation: the mean loss, preference accuracy and reward margin
    step_metrics()   what goes beside the loss into metrics.jsonl (rewards, accuracy, margin)

The reference model is never a second copy of the weights.  With an adapter it is the base with the
adapter switched off (PEFT's `disable_adapter`, as TRL does), one extra forward pass without gradients.
For full fine-tuning (and with `objective.precompute_reference: true`) the reference log-probs of every
train and validation answer are computed once before the first step, while the weights are still the
base's, and kept in the run folder (`reference-logps.safetensors`), so a resumed run reads them instead of
computing them from weights that have moved.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tunesmith.config import PREFERENCE_OBJECTIVES, Config
from tunesmith.data.batching import iter_batches
from tunesmith.data.preference import build_preference_data
from tunesmith.errors import UserError
from tunesmith.fileio import atomic_write_file
from tunesmith.prefer import losses
from tunesmith.prefer.sequences import answer_logps, answer_row, make_unit

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference-logps.safetensors"


def peft_model(model):
    """The PEFT model inside the parallel mode's wrappers (DDP, FSDP, DeepSpeed's engine), or None."""
    seen = 0
    while model is not None and seen < 8:
        if hasattr(model, "disable_adapter") and hasattr(model, "get_base_model"):
            return model
        model = getattr(model, "module", None)
        seen += 1
    return None


class PreferenceRecipe:
    """The loop's hooks for the paired objectives (dpo, ipo, simpo, orpo) and KTO; see the module docstring."""

    name = "preference"

    def __init__(self, cfg: Config):
        o = cfg.objective
        self.cfg = cfg
        self.kind = o.type
        self.beta = o.resolved_beta()
        self.paired = o.type in PREFERENCE_OBJECTIVES
        self.needs_reference = o.type in ("dpo", "ipo", "kto") and not o.reference_free
        self.precompute = o.precompute_reference is True or (o.precompute_reference == "auto" and cfg.method == "full")
        if self.needs_reference and cfg.method == "full" and not self.precompute:
            raise UserError("objective.precompute_reference: false with method full would need a second copy of the "
                            "model as the reference; set objective.precompute_reference: true (or auto), or use an "
                            "adapter method, whose reference is the base with the adapter switched off.")
        self.pad_id = 0
        self.packed = False
        self.reference: dict[str, torch.Tensor] = {}  # split -> [rows, answers per row] precomputed log-probs
        self._split_of: dict[int, str] = {}  # id(row) -> its split, for the precomputed lookup
        self._kl_answer: dict[int, list[int]] = {}  # KTO: id(row) -> the answer its KL pair borrows
        self._step: dict = {}
        self._metrics: dict[str, float] = {}

    # --- data

    def build_data(self, cfg: Config, tokenizer, task: str):
        if task != "causal_lm":
            raise UserError(f"objective.type: {self.kind} is for causal language models; model.name "
                            f"{cfg.model.name} is a {task} model.")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        bundle = build_preference_data(cfg.data, tokenizer, "paired" if self.paired else "unpaired")
        if not self.paired and cfg.training.batch_size < 2:
            raise UserError("objective.type: kto estimates its KL reference point from mismatched prompt/answer pairs "
                            "inside a micro-batch; set training.batch_size to 2 or more.")
        for split in ("train", "validation", "test"):
            rows = getattr(bundle, split)
            for row in rows:
                self._split_of.setdefault(id(row), split)
            if not self.paired:
                self._pair_for_kl(rows, cfg.training.batch_size)
        return bundle

    def _pair_for_kl(self, rows: list, block: int) -> None:
        """KTO's KL estimate compares prompts with answers written for other prompts: in split order, in blocks of
        training.batch_size rows, each row's prompt is paired with the previous row's answer (the block's first
        with its last), once for the run (TRL's KTO builds its KL pairs this way), so the pairs, and their
        reference log-probs, do not depend on how an epoch's shuffle groups rows into micro-batches."""
        for start in range(0, len(rows), block):
            chunk = rows[start : start + block]
            for i, row in enumerate(chunk):
                self._kl_answer[id(row)] = chunk[i - 1].completion_ids

    # --- the run starts

    def start(self, model, run_dir: Path, main: bool, packed: bool, device, batch_size: int, bundle) -> None:
        """Before the first step: the precomputed reference (computed now, or read back on a resume)."""
        self.packed = packed
        if not (self.needs_reference and self.precompute):
            return
        path = Path(run_dir) / REFERENCE_FILE
        if path.exists():
            from safetensors.torch import load_file

            self.reference = load_file(str(path))
            log.info(f"reference log-probs: read from {path}")
            return
        log.info("reference log-probs: computing them once for the train and validation rows (the base model)")
        tables = {}
        with torch.no_grad():
            was = model.training
            model.eval()
            for split in ("train", "validation", "test"):
                tables[split] = self._logps_of(model, getattr(bundle, split), batch_size, device, reference=False)
            model.train(was)
        self.reference = tables
        if main:
            from safetensors.torch import save_file

            tables = {k: v.contiguous() for k, v in self.reference.items()}
            atomic_write_file(path, lambda tmp: save_file(tables, str(tmp)))

    def _logps_of(self, model, rows, batch_size: int, device, reference: bool) -> torch.Tensor:
        """[rows, answers per row] log-probs of `rows` (answers: chosen/rejected, or completion/KL answer)."""
        out = []
        for j, batch in enumerate(iter_batches(rows, batch_size, order=None)):
            unit, _ = self._unit(batch, key=j)
            unit = unit.to(device)
            logps = self._reference_logps(model, unit) if reference else answer_logps(model, unit)
            out.append(logps.float().cpu().view(len(batch), -1))
        return torch.cat(out) if out else torch.zeros(0, 2)  # two answers a row

    # --- units

    def _answers(self, rows: list) -> list:
        """The answer rows of a micro-batch: (chosen, rejected) per pair; KTO: (answer, KL answer) per row (the
        prompt with another row's answer: `_pair_for_kl`)."""
        if self.paired:
            return [a for r in rows for a in (answer_row(r.prompt_ids, r.chosen_ids), answer_row(r.prompt_ids, r.rejected_ids))]
        return [a for r in rows for a in (answer_row(r.prompt_ids, r.completion_ids),
                                          answer_row(r.prompt_ids, self._kl_answer.get(id(r), r.completion_ids)))]

    def _unit(self, rows: list, key: int):
        unit, layout = make_unit(self._answers(rows), rows, self.packed, self.pad_id, key)
        if self.reference:
            unit.extra["ref"] = self._precomputed(rows)
        if not self.paired:
            unit.extra["desirable"] = torch.tensor([bool(r.label) for r in rows])
        return unit, layout

    def _precomputed(self, rows: list) -> torch.Tensor:
        """The precomputed reference log-probs of `rows` [rows, 2] (per row: its two answers)."""
        split = self._split_of.get(id(rows[0]), "train")
        table = self.reference[split]
        return torch.stack([table[r.index] for r in rows])

    def units(self, rows: list, pass_tokens, key) -> list[tuple]:
        """A micro-batch's one unit (all its answers in one pass, packed when the run packs)."""
        return [self._unit(rows, key=key[-1])]

    def counts(self, unit) -> tuple[int, int, int]:
        """(what the step's loss is averaged over: pairs or answers, trained tokens, all tokens)."""
        return len(unit.examples), unit.n_trained, unit.n_tokens

    def begin_step(self, units: list) -> None:
        """ORPO's cross-entropy term is a mean over the step's chosen answer tokens (TRL's ORPO takes its mean over
        the batch's tokens too, but counts the prompt's: tests/test_preference_trl.py pins the difference), so each
        unit's summed chosen NLL is scaled by pairs / chosen answer tokens of the whole step."""
        pairs = sum(len(u.examples) for _, (u, _) in units)
        chosen_tokens = sum(float(u.answer_lengths()[0::2].sum()) for _, (u, _) in units)
        self._step = {"pairs": pairs, "chosen_tokens": chosen_tokens}

    # --- the loss

    def _reference_logps(self, model, unit) -> torch.Tensor:
        peft = peft_model(model)
        if peft is None:
            raise RuntimeError("an online reference pass needs an adapter to switch off")
        with torch.no_grad(), peft.disable_adapter():
            return answer_logps(peft, unit).detach()

    def loss_sum(self, model, unit) -> torch.Tensor:
        logps = answer_logps(model, unit).float()  # [2 x examples]
        lengths = unit.answer_lengths().to(logps.device)
        first, second = logps[0::2], logps[1::2]
        len_1, len_2 = lengths[0::2], lengths[1::2]
        ref_1 = ref_2 = None
        if self.needs_reference:
            ref = unit.extra["ref"].to(logps.device) if "ref" in unit.extra else self._reference_logps(model, unit).float().view(-1, 2)
            ref_1, ref_2 = ref[:, 0], ref[:, 1]
        o = self.cfg.objective
        if self.kind == "dpo":
            if o.reference_free:
                ref_1 = ref_2 = torch.zeros_like(first)
            per = losses.dpo_losses(first, second, ref_1, ref_2, self.beta, o.label_smoothing)
        elif self.kind == "ipo":
            if o.reference_free:
                ref_1 = ref_2 = torch.zeros_like(first)
            per = losses.ipo_losses(first, second, ref_1, ref_2, len_1, len_2, self.beta)
        elif self.kind == "simpo":
            per = losses.simpo_losses(first, second, len_1, len_2, self.beta, o.simpo_gamma)
        elif self.kind == "orpo":
            per = losses.orpo_odds_losses(first, second, len_1, len_2, self.beta)
            step = self._step or {"pairs": len(first), "chosen_tokens": float(len_1.sum())}
            nll_chosen = -first.sum() * (step["pairs"] / max(step["chosen_tokens"], 1.0))
            per = per.sum() + nll_chosen
        else:  # kto: `first` the answers, `second` their KL answers (no gradient through the KL estimate)
            kl = (second.detach() - ref_2).mean()
            per = losses.kto_losses(first, ref_1, unit.extra["desirable"].to(logps.device), kl, self.beta,
                                    o.kto_desirable_weight, o.kto_undesirable_weight)
        self._record(first.detach(), second.detach(), ref_1, ref_2, len_1, len_2, unit)
        return per.sum()

    def _record(self, first, second, ref_1, ref_2, len_1, len_2, unit) -> None:
        """Running sums for the step's log line: the implicit rewards of each side, how often the chosen wins."""
        m = self._metrics
        if self.paired:
            if ref_1 is not None and self.kind in ("dpo", "ipo"):
                r_c, r_r = self.beta * (first - ref_1), self.beta * (second - ref_2)
            else:  # reference-free objectives: the length-normalised log-prob is the reward (SimPO's, ORPO's)
                r_c, r_r = self.beta * first / len_1, self.beta * second / len_2
            m["pairs"] = m.get("pairs", 0) + len(first)
            m["reward_chosen"] = m.get("reward_chosen", 0.0) + float(r_c.sum())
            m["reward_rejected"] = m.get("reward_rejected", 0.0) + float(r_r.sum())
            m["reward_accuracy"] = m.get("reward_accuracy", 0.0) + float((r_c > r_r).float().sum() + 0.5 * (r_c == r_r).float().sum())
        else:
            r = self.beta * (first - ref_1)
            good = unit.extra["desirable"].to(r.device)
            m["pairs"] = m.get("pairs", 0) + len(first)
            m["reward_desirable"] = m.get("reward_desirable", 0.0) + float(r[good].sum())
            m["reward_undesirable"] = m.get("reward_undesirable", 0.0) + float(r[~good].sum())
            m["n_desirable"] = m.get("n_desirable", 0) + int(good.sum())
            m["kl"] = float((second - ref_2).mean().clamp(min=0))

    def step_metrics(self) -> dict:
        """The step's means of what `_record` summed (this process's share of the step), then cleared."""
        m, self._metrics = self._metrics, {}
        n = m.get("pairs", 0)
        if not n:
            return {}
        if self.paired:
            chosen, rejected = m["reward_chosen"] / n, m["reward_rejected"] / n
            return {"reward_chosen": chosen, "reward_rejected": rejected, "reward_margin": chosen - rejected,
                    "reward_accuracy": m["reward_accuracy"] / n}
        good = m["n_desirable"]
        return {"reward_desirable": m["reward_desirable"] / good if good else None,
                "reward_undesirable": m["reward_undesirable"] / (n - good) if n - good else None, "kl": m["kl"]}

    # --- validation

    @torch.no_grad()
    def heldout(self, model, rows, batch_size: int, device) -> dict:
        """Mean loss over the rows, with the preference accuracy and reward margin beside it."""
        was = model.training
        model.eval()
        total, n = 0.0, 0
        self._metrics = {}
        for j, batch in enumerate(iter_batches(rows, batch_size, order=None)):
            unit, _ = self._unit(batch, key=j)
            unit = unit.to(device)
            self._step = {}
            total += float(self.loss_sum(model, unit))
            n += len(batch)
        metrics = self.step_metrics()
        model.train(was)
        loss = total / max(n, 1)
        return {"loss": loss, "perplexity": None, **{f"val_{k}": v for k, v in metrics.items()}}

    def summary(self) -> dict:
        o = self.cfg.objective
        out = {"type": self.kind, "beta": self.beta}
        if self.kind == "dpo":
            out["label_smoothing"] = o.label_smoothing
        if self.kind in ("dpo", "ipo"):
            out["reference_free"] = o.reference_free
        if self.needs_reference:
            out["reference"] = "precomputed" if self.precompute else "base with the adapter switched off"
        if self.kind == "simpo":
            out["gamma"] = o.simpo_gamma
        if self.kind == "kto":
            out["desirable_weight"], out["undesirable_weight"] = o.kto_desirable_weight, o.kto_undesirable_weight
        return out
