"""Preference and reward tuning on top of the training loop: `objective` dpo, ipo, orpo, simpo, kto and grpo.

`make_recipe(cfg)` gives the training loop's hooks for the config's objective (train/loop.run_training's
`recipe`) and the base-vs-tuned evaluation that goes with it; for `objective: sft` it gives (None, None)
and the loop trains as it always has.  Modules: `losses` (the formulas, with their sources), `sequences`
(whole answers' log-probs from one pass), `recipe` (DPO, IPO, SimPO, ORPO, KTO), `grpo` (sampling, rewards,
the clipped objective), `rewards`, `sampling`, `evaluate` (preference accuracy and reward margins).
"""

from __future__ import annotations

from tunesmith.prefer.evaluate import PreferenceEval
from tunesmith.prefer.grpo import GrpoRecipe
from tunesmith.prefer.recipe import PreferenceRecipe


def make_recipe(cfg):
    """(the loop's recipe, the evaluation factory) for cfg.objective, or (None, None) for sft."""
    kind = cfg.objective.type
    if kind == "sft":
        return None, None
    if kind == "grpo":  # evaluated by the standard before/after (generation, exact match), which adds mean_reward
        return GrpoRecipe(cfg), None
    recipe = PreferenceRecipe(cfg)

    def evaluation(cfg, bundle, tokenizer, task, device, objective):
        return PreferenceEval(recipe, cfg, bundle, device)

    return recipe, evaluation
