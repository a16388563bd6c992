"""Base vs tuned on held-out preference rows: which answer each model prefers.

For each held-out pair the base model's and the tuned model's log-probabilities of the chosen and the
rejected answer are computed (the same units as training, padded).  Reported for both models:

- `logprob_accuracy`: the share of pairs whose chosen answer the model finds more likely than the rejected
  one (ties count half); comparable between base and tuned.
- `preference_accuracy`: the share of pairs where the model's implicit reward, beta * (log pi - log pi_base),
  is higher for the chosen answer (Rafailov et al., 2023, section 5; TRL logs it as rewards/accuracies).
  Against itself the base's rewards are all 0, every pair a tie: 0.5.
- `reward_margin`: the mean of that reward's chosen minus rejected (0 for the base).
KTO's unpaired rows: `label_accuracy`, the share of answers whose implicit reward has the sign of their label
(ties count half), and the mean reward of the good and of the bad answers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tunesmith.fileio import atomic_write_json

log = logging.getLogger(__name__)


def _ties_half(wins: torch.Tensor, ties: torch.Tensor) -> float:
    return round(float(wins.double().mean() + 0.5 * ties.double().mean()), 6) if len(wins) else float("nan")


class PreferenceEval:
    """The loop's `evaluation` (see train/loop.run_training) for the preference objectives."""

    def __init__(self, recipe, cfg, bundle, device):
        self.recipe, self.cfg, self.device = recipe, cfg, device
        self.rows = bundle.test[: cfg.eval.limit] if cfg.eval.limit else bundle.test

    def _logps(self, model) -> torch.Tensor:
        packed, self.recipe.packed = self.recipe.packed, False  # padded: no packed-attention context needed here
        try:
            with torch.no_grad():
                was = model.training
                model.eval()
                out = self.recipe._logps_of(model, self.rows, self.cfg.training.eval_batch_size, self.device, reference=False)
                model.train(was)
        finally:
            self.recipe.packed = packed
        return out

    def before(self, model) -> dict:
        log.info(f"before: the base model's log-probs of {len(self.rows)} held-out "
                 f"{'pairs' if self.recipe.paired else 'answers'}")
        return {"base_logps": self._logps(model).tolist()}

    def scores(self, logps: torch.Tensor, base: torch.Tensor) -> dict:
        beta = self.recipe.beta
        if self.recipe.paired:
            c, r = logps[:, 0], logps[:, 1]
            margin = beta * ((c - base[:, 0]) - (r - base[:, 1]))
            return {"rows": len(c), "logprob_accuracy": _ties_half(c > r, c == r),
                    "preference_accuracy": _ties_half(margin > 0, margin == 0), "reward_margin": float(margin.mean())}
        good = torch.tensor([bool(row.label) for row in self.rows])
        reward = beta * (logps[:, 0] - base[:, 0])
        signed = torch.where(good, reward, -reward)
        return {"rows": len(reward), "label_accuracy": _ties_half(signed > 0, signed == 0),
                "reward_desirable": float(reward[good].mean()) if good.any() else None,
                "reward_undesirable": float(reward[~good].mean()) if (~good).any() else None}

    def after(self, model, base: dict, run_dir: Path) -> tuple[dict, list[dict]]:
        log.info("after: the tuned model's log-probs of the same rows")
        base_logps = torch.tensor(base["base_logps"]).view(-1, 2)
        tuned_logps = self._logps(model)
        section = {"base": self.scores(base_logps, base_logps), "tuned": self.scores(tuned_logps, base_logps)}
        atomic_write_json(Path(run_dir) / "eval" / "preference.json",
                          {**section, "logps": {"base": base_logps.tolist(), "tuned": tuned_logps.tolist()},
                           "what": "per held-out row: [chosen, rejected] (KTO: [answer, KL answer]) summed log-probs"})
        for name in ("preference_accuracy", "logprob_accuracy", "reward_margin", "label_accuracy"):
            if name in section["tuned"]:
                log.info(f"after: {name} {section['base'][name]:.4g} -> {section['tuned'][name]:.4g}")
        return section, []
