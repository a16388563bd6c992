"""GRPO (Shao et al., "DeepSeekMath", 2024, section 4) as a recipe of the training loop.

Each micro-batch is `training.batch_size` prompts of prompt/answer rows (the SFT formats; the answer is the
reference the rewards check).  Per optimiser step, for each micro-batch:

1. sample: `objective.group_size` answers per prompt from the model being trained (KV cache, batched;
   prefer/sampling.py), seeded by (training.seed, epoch, step, micro-batch), so a resumed run samples exactly
   what the uninterrupted one did, whatever the random generators went through before the stop;
2. score: the reward functions (prefer/rewards.py), summed with their weights; advantages normalised in each
   group (losses.group_advantages);
3. the loss: all the answers in one pass (packed where the run packs); per token the clipped surrogate of the
   ratio to the policy that sampled (one update per sample, as TRL's default, so pi_old is pi detached and the
   ratio is 1 with gradient A) plus beta times the KL estimate to the reference, the base with the adapter
   switched off; averaged over each answer's tokens, then over the answers (the paper's eq. 3).

The log gets, per step: the mean reward, the reward spread (mean standard deviation within a group), each reward
function's mean, the KL to the reference and the mean answer length.  Validation answers the validation prompts
greedily and reports their mean reward; its loss is minus that mean (lower is better, for early stopping).
"""

from __future__ import annotations

import logging
import statistics

import torch

from tunesmith.config import Config
from tunesmith.data import build_datasets, data_origin
from tunesmith.data.batching import iter_batches
from tunesmith.data.formats import prompt_and_references
from tunesmith.data.tokens import encode_prompt
from tunesmith.errors import UserError
from tunesmith.models import tunesmith_home
from tunesmith.prefer import losses
from tunesmith.prefer.recipe import peft_model
from tunesmith.prefer.rewards import make_rewards
from tunesmith.prefer.sampling import sample_groups
from tunesmith.prefer.sequences import answer_row, answer_token_logps, make_unit

log = logging.getLogger(__name__)

SAMPLING_SEED_SPACE = 2**31 - 1


class GroupRow:
    """One prompt to sample a group of answers for: its ids, its text (for python rewards) and references."""

    def __init__(self, prompt_ids: list[int], prompt_text: str, references: list[str], index: int):
        self.prompt_ids, self.prompt_text, self.references, self.index = prompt_ids, prompt_text, references, index
        self.input_ids = prompt_ids  # what iter_batches and the batch-size check count by


def _group_rows(samples: list[dict], tokenizer) -> list[GroupRow]:
    rows = []
    for i, sample in enumerate(samples):
        prompt, references = prompt_and_references(sample)
        text = "\n".join(m["content"] for m in prompt if m["role"] != "system")
        rows.append(GroupRow(encode_prompt(sample["messages"], tokenizer), text, references, i))
    return rows


class GrpoRecipe:
    """The loop's hooks for `objective: grpo` (see the module docstring and prefer/recipe.py's)."""

    name = "grpo"
    paired = False

    def __init__(self, cfg: Config):
        self.cfg = cfg
        o = cfg.objective
        self.beta = o.resolved_beta()
        if cfg.method == "full":
            raise UserError("objective.type: grpo keeps the model close to its reference with a KL term, and the "
                            "reference here is the base with the adapter switched off; use an adapter method "
                            "(method: lora, qlora, dora or rslora), not method full.")
        self.rewards = make_rewards(o, cfg.eval.answer_regex)
        self.model = None
        self.tokenizer = None
        self.packed = False
        self.pad_id = 0
        self._metrics: dict[str, list[float]] = {}

    # --- data: prompt/answer rows, split as SFT splits them

    def build_data(self, cfg: Config, tokenizer, task: str):
        if task != "causal_lm":
            raise UserError(f"objective.type: grpo is for causal language models; model.name {cfg.model.name} is a "
                            f"{task} model.")
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        bundle = build_datasets(cfg.data, tokenizer, cache_dir=tunesmith_home() / "tokenized", task=task)
        if bundle.format == "text":
            raise UserError(f"{data_origin(cfg.data)} holds plain text; objective grpo needs prompts with reference "
                            "answers (alpaca, messages, sharegpt or prompt_completion rows).")
        bundle.train = _group_rows(bundle.train_samples, tokenizer)
        bundle.validation = _group_rows(bundle.validation_samples[: self.cfg.eval.limit or None], tokenizer)
        bundle.stats["prompts"] = len(bundle.train)
        return bundle

    def start(self, model, run_dir, main: bool, packed: bool, device, batch_size: int, bundle) -> None:
        self.model, self.packed, self.device = model, packed, device
        if peft_model(model) is None and self.beta:
            raise UserError("objective.type: grpo needs an adapter to switch off for its reference model.")

    # --- a micro-batch: sample, score, lay out

    def units(self, rows: list, pass_tokens, key) -> list[tuple]:
        seed, epoch, window_start, j = key
        sample_seed = (((seed * 1_000_003 + epoch) * 1_000_003 + window_start) * 1_000_003 + j) % SAMPLING_SEED_SPACE
        o = self.cfg.objective
        groups = sample_groups(self.model, self.tokenizer, [r.prompt_ids for r in rows], o.group_size, o.max_new_tokens,
                               o.temperature, o.top_p, sample_seed, len(rows) * o.group_size)  # one generate call
        answers, prompts, completions, references = [], [], [], []
        for row, group in zip(rows, groups):
            for completion in group:
                answers.append(answer_row(row.prompt_ids, completion))
                prompts.append(row.prompt_text)
                completions.append(self.tokenizer.decode(completion, skip_special_tokens=True))
                references.append(row.references)
        totals, each = self.rewards(prompts, completions, references)
        rewards = torch.tensor(totals, dtype=torch.float32)
        unit, layout = make_unit(answers, [c for c in completions], self.packed, self.pad_id, key[-1])
        unit.extra["advantages"] = losses.group_advantages(rewards, o.group_size)
        unit.extra["rewards"] = rewards
        unit.extra["each"] = {name: float(sum(v) / len(v)) for name, v in each.items()}
        return [(unit, layout)]

    def counts(self, unit) -> tuple[int, int, int]:
        return len(unit.rows), unit.n_trained, unit.n_tokens

    def begin_step(self, units: list) -> None:
        pass

    # --- the loss

    def loss_sum(self, model, unit) -> torch.Tensor:
        logp, rows_of = answer_token_logps(model, unit)
        logp = logp.float()
        ref = None
        if self.beta:
            peft = peft_model(model)
            with torch.no_grad(), peft.disable_adapter():
                ref = answer_token_logps(peft, unit)[0].float()
        advantages = unit.extra["advantages"].to(logp.device)[rows_of]
        per_token = losses.grpo_token_losses(logp, logp.detach(), ref, advantages, self.cfg.objective.clip_epsilon,
                                             self.beta)
        n = len(unit.rows)
        lengths = unit.answer_lengths().to(logp.device)  # the answers' trained tokens, as rows_of counts them
        per_answer = torch.zeros(n, device=logp.device).index_add(0, rows_of, per_token) / lengths.clamp(min=1)
        self._record(unit, logp.detach(), ref, rows_of, lengths)
        return per_answer.sum()

    def _record(self, unit, logp, ref, rows_of, lengths) -> None:
        m = self._metrics
        rewards = unit.extra["rewards"]
        g = self.cfg.objective.group_size
        m.setdefault("reward_mean", []).extend(rewards.tolist())
        spread = rewards.view(-1, g).std(dim=1) if g > 1 else torch.zeros(len(rewards) // g)
        m.setdefault("reward_spread", []).extend(spread.tolist())
        m.setdefault("completion_length", []).extend(lengths.tolist())
        if ref is not None:
            delta = ref - logp
            m.setdefault("kl", []).append(float((torch.exp(delta) - delta - 1).mean()))
        for name, value in unit.extra["each"].items():
            m.setdefault(f"reward_{name}", []).append(value)

    def step_metrics(self) -> dict:
        m, self._metrics = self._metrics, {}
        return {k: statistics.fmean(v) for k, v in m.items() if v}

    # --- validation: greedy answers to the validation prompts, their mean reward

    @torch.no_grad()
    def heldout(self, model, rows, batch_size: int, device) -> dict:
        mean = self.mean_reward(model, rows, batch_size)
        return {"loss": -mean, "perplexity": None, "val_mean_reward": mean}

    def mean_reward(self, model, rows, batch_size: int) -> float:
        """The mean reward of greedy answers (temperature 0) to `rows`' prompts."""
        o = self.cfg.objective
        if not rows:
            return float("nan")
        totals = []
        for batch in iter_batches(rows, batch_size, order=None):
            groups = sample_groups(model, self.tokenizer, [r.prompt_ids for r in batch], 1, o.max_new_tokens, 0.0, 1.0,
                                   0, batch_size)
            completions = [self.tokenizer.decode(g[0], skip_special_tokens=True) for g in groups]
            totals += self.rewards([r.prompt_text for r in batch], completions, [r.references for r in batch])[0]
        return statistics.fmean(totals)

    def summary(self) -> dict:
        o = self.cfg.objective
        return {"type": "grpo", "beta": self.beta, "group_size": o.group_size, "max_new_tokens": o.max_new_tokens,
                "temperature": o.temperature, "top_p": o.top_p, "clip_epsilon": o.clip_epsilon,
                "rewards": [{"type": r.type, "weight": r.weight} for r in o.rewards],
                "reference": "base with the adapter switched off" if self.beta else None}
