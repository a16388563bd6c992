"""tunesmith's preference objectives against TRL's trainers: the same model, rows, beta and optimiser give the same
per-step losses (DPO and IPO with DPOTrainer, SimPO with trl.experimental.cpo.CPOTrainer, ORPO with
trl.experimental.orpo.ORPOTrainer, KTO with KTOTrainer).

Both sides train the random two-layer Llama of conftest.py (seed 0) in fp32 on one CPU thread for 5 optimiser steps:
every row in each step (so neither side's shuffle can matter), AdamW with the same settings, a constant learning
rate without warmup, gradients clipped to norm 1.0 (the first steps' norms are above it), no dropout.  Full
fine-tuning starts both sides from the same weights; the LoRA case gives TRL the adapter tunesmith started from.
TRL gets each row as the text tunesmith's chat template renders (the prompt through the generation prompt, each
answer through its end-of-turn token) and tokenises it itself; every test first checks that TRL's ids are
tunesmith's.  Losses agree within 1e-4 relative (they agree to about 1e-6: float rounding only).

ORPO: TRL's SFT term is the token-mean cross-entropy over the chosen rows' prompt *and* answer tokens (deliberate,
as the ORPO authors' code does: huggingface/trl#1516, kept by #2527), while tunesmith's is over the chosen answer
tokens only.  The steps are compared against TRL's ORPO with that one term taken over the answer tokens
(`AnswerOnlyORPO` below), and a separate check pins the stock trainer's first loss to tunesmith's plus exactly the
difference of the two cross-entropies.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import save_tiny_model_folder  # noqa: E402

from tunesmith import api  # noqa: E402

STEPS = 5
LR = 1e-3
BETA = 0.1
ROWS = 8
REL = 1e-4
WORDS = ["river", "stone", "cloud", "apple", "green", "music", "paper", "light"]
PAIRS = [{"prompt": f"Repeat the word {w}.", "chosen": f"{w} {w} {w}", "rejected": "I will not." if i % 2 else f"No, {w}."}
         for i, w in enumerate(WORDS)]
LABELLED = [{"prompt": f"Repeat the word {w}.", "completion": f"{w} {w} {w}" if i % 2 else f"No, {w}.", "label": bool(i % 2)}
            for i, w in enumerate(WORDS)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Both sides on one thread (tunesmith: training.num_threads; TRL: torch's setting, which it leaves alone): a model
    this small is no faster on two, and two threads slow down ten-fold while another process keeps the cores busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The tiny model (tiny-llama/), the pairs (train.jsonl) and the labelled answers (kto.jsonl)."""
    root = tmp_path_factory.mktemp("trl")
    save_tiny_model_folder(root, PAIRS)
    (root / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LABELLED))
    return root


def tunesmith_config(folder: Path, objective: str, overrides=(), method: str = "full", beta: float = BETA):
    data = folder / ("kto.jsonl" if objective == "kto" else "train.jsonl")
    text = (
        f"model: {{name: {folder / 'tiny-llama'}, dtype: float32}}\n"
        f"method: {method}\n"
        "lora: {r: 8, alpha: 16, dropout: 0}\n"
        f"data: {{path: {data}, validation_split: 0}}\n"
        f"training: {{epochs: {STEPS}, batch_size: {ROWS}, learning_rate: {LR}, lr_scheduler: constant, warmup_steps: 0,"
        " warmup_ratio: 0, weight_decay: 0, max_grad_norm: 1.0, adam_beta1: 0.9, adam_beta2: 0.999,"
        " adam_epsilon: 1.0e-8, autocast: false, eval_each_epoch: false,"
        " num_threads: 1}\n"
        "eval: {enabled: false}\n"
        f"objective: {{type: {objective}, beta: {beta}}}\n"
    )
    return api.load_config_text(text, list(overrides))


def tunesmith_steps(cfg, run_dir: Path) -> list[dict]:
    api.train(cfg, run_dir)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["type"] == "train"]
    assert len(steps) == STEPS
    return steps


def rendered_rows(cfg) -> tuple[object, list]:
    """(tokenizer, train rows) as tunesmith tokenises them for this config."""
    from tunesmith.data.preference import build_preference_data
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.name, cfg.model)
    kind = "unpaired" if cfg.objective.type == "kto" else "paired"
    return tokenizer, build_preference_data(cfg.data, tokenizer, kind).train


def trl_args(config_class, out: Path, beta: float = BETA, **extra):
    return config_class(
        output_dir=str(out), per_device_train_batch_size=ROWS, num_train_epochs=STEPS, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch", beta=beta, disable_dropout=True, seed=42,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, **extra)


def trl_logs(trainer) -> list[dict]:
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == STEPS
    return logs


def fp32_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder / "tiny-llama", dtype=torch.float32)


def assert_same_losses(ours: list[float], theirs: list[float]) -> None:
    gaps = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
    assert max(gaps) < REL, f"tunesmith {ours}\nTRL       {theirs}\nrelative gaps {gaps}"


def assert_close(ours: float, theirs: float, what: str) -> None:
    assert abs(ours - theirs) <= 1e-5 + REL * abs(theirs), f"{what}: tunesmith {ours}, TRL {theirs}"


# --- DPO ----------------------------------------------------------------------------------------------------------


def pair_texts(tokenizer, rows):
    """Each pair as the text tunesmith's chat template renders: TRL tokenises it into tunesmith's ids."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": tokenizer.decode(r.prompt_ids), "chosen": tokenizer.decode(r.chosen_ids),
                               "rejected": tokenizer.decode(r.rejected_ids)} for r in rows])


def trl_dpo(out: Path, model, tokenizer, rows, **extra) -> list[dict]:
    from trl import DPOConfig, DPOTrainer

    trainer = DPOTrainer(model=model, args=trl_args(DPOConfig, out, **extra), train_dataset=pair_texts(tokenizer, rows),
                         processing_class=tokenizer)
    theirs = trainer.train_dataset
    assert [(x["prompt_ids"], x["chosen_ids"], x["rejected_ids"]) for x in theirs] == [
        (r.prompt_ids, r.chosen_ids, r.rejected_ids) for r in rows]
    return trl_logs(trainer)


@pytest.fixture(scope="module")
def trl_dpo_full(folder, tmp_path_factory) -> list[dict]:
    """TRL's DPOTrainer on the pairs, full fine-tuning, the reference a frozen copy of the model."""
    tokenizer, rows = rendered_rows(tunesmith_config(folder, "dpo"))
    return trl_dpo(tmp_path_factory.mktemp("trl-dpo"), fp32_model(folder), tokenizer, rows)


def assert_same_dpo(ours: list[dict], theirs: list[dict]) -> None:
    assert abs(ours[0]["loss"] - math.log(2)) < 1e-6  # policy = reference: -log sigmoid(0)
    assert abs(theirs[0]["loss"] - math.log(2)) < 1e-6
    assert_same_losses([s["loss"] for s in ours], [h["loss"] for h in theirs])
    for step, (s, h) in enumerate(zip(ours, theirs), start=1):
        for key, trl_key in (("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                             ("reward_margin", "rewards/margins")):
            assert_close(s[key], h[trl_key], f"step {step} {key}")
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.05  # it learned: the comparison is not of two stuck runs


@pytest.mark.parametrize("overrides", [
    [],  # defaults on a CPU: packed passes, tunesmith's fused RMSNorm/rotary paths, precomputed reference
    ["training.packing=false", "training.fast_kernels=off"],  # padded batches, the stock modules
    ["training.batch_size=4", "training.gradient_accumulation=2"],  # the same 8 pairs a step, in two passes
], ids=["defaults", "padded-stock-modules", "two-micro-batches"])
def test_dpo_full_fine_tuning_takes_trls_steps(folder, trl_dpo_full, tmp_path, overrides):
    ours = tunesmith_steps(tunesmith_config(folder, "dpo", overrides), tmp_path / "run")
    assert_same_dpo(ours, trl_dpo_full)


def test_dpo_with_lora_takes_trls_steps_from_the_same_adapter(folder, tmp_path, monkeypatch):
    """The reference is the base with the adapter off on both sides (tunesmith: PEFT's disable_adapter; TRL: a frozen
    copy of the starting adapter, which is the base while B = 0); TRL starts from the adapter tunesmith drew."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from tunesmith.train import loop

    start = {}
    prepare = loop.prepare_trainable

    def recording(model, cfg, total_steps=None):
        model = prepare(model, cfg, total_steps)
        start["config"] = copy.deepcopy(model.peft_config["default"])
        start["weights"] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        return model

    monkeypatch.setattr(loop, "prepare_trainable", recording)
    cfg = tunesmith_config(folder, "dpo", method="lora")
    ours = tunesmith_steps(cfg, tmp_path / "run")
    assert sorted({k.split(".")[-3] for k in start["weights"]}) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    peft = get_peft_model(fp32_model(folder), start["config"])
    set_peft_model_state_dict(peft, start["weights"])
    tokenizer, rows = rendered_rows(cfg)
    assert_same_dpo(ours, trl_dpo(tmp_path / "trl", peft, tokenizer, rows))


def test_ipo_takes_trls_steps(folder, tmp_path):
    """IPO: (z - 1 / (2 beta))^2 with z from log-probs averaged per answer token, as DPOTrainer's loss_type ipo."""
    cfg = tunesmith_config(folder, "ipo")
    ours = [s["loss"] for s in tunesmith_steps(cfg, tmp_path / "run")]
    tokenizer, rows = rendered_rows(cfg)
    theirs = [h["loss"] for h in trl_dpo(tmp_path / "trl", fp32_model(folder), tokenizer, rows, loss_type=["ipo"])]
    assert ours[0] == pytest.approx((1 / (2 * BETA)) ** 2)  # z = 0 while the policy is the reference
    assert_same_losses(ours, theirs)
    assert ours[-1] < ours[0] - 0.5


def test_simpo_takes_trls_cpo_steps(folder, tmp_path):
    """SimPO: -log sigmoid(beta (mean log-prob of the chosen - of the rejected) - gamma), as TRL's CPOTrainer with
    loss_type simpo and no cross-entropy term (cpo_alpha 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "trl.experimental is experimental"
        from trl.experimental.cpo import CPOConfig, CPOTrainer

    cfg = tunesmith_config(folder, "simpo", ["objective.simpo_gamma=1.0"], beta=2.0)
    ours = [s["loss"] for s in tunesmith_steps(cfg, tmp_path / "run")]
    tokenizer, rows = rendered_rows(cfg)
    args = trl_args(CPOConfig, tmp_path / "trl", beta=2.0, loss_type="simpo", simpo_gamma=1.0, cpo_alpha=0.0,
                    remove_unused_columns=False)
    trainer = CPOTrainer(model=fp32_model(folder), args=args, train_dataset=pair_texts(tokenizer, rows),
                         processing_class=tokenizer)
    assert [(x["chosen_input_ids"], x["rejected_input_ids"]) for x in trainer.train_dataset] == [
        (r.prompt_ids + r.chosen_ids, r.prompt_ids + r.rejected_ids) for r in rows]
    assert_same_losses(ours, [h["loss"] for h in trl_logs(trainer)])
    assert ours[-1] < ours[0] - 0.05


# --- ORPO ---------------------------------------------------------------------------------------------------------


def orpo_trainers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "trl.experimental is experimental"
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    class AnswerOnlyORPO(ORPOTrainer):
        """TRL's ORPO with its SFT term over the chosen answers' tokens (tunesmith's) instead of the chosen rows'
        prompt and answer tokens; the stock term goes into the log as `prompt_and_answer_nll`."""

        def concatenated_forward(self, model, batch):
            out = list(super().concatenated_forward(model, batch))
            chosen_logits = out[2]  # [pairs, T - 1, vocab]: position t predicts token t + 1
            targets = batch["chosen_labels"][:, 1:]  # -100 on the prompt and the padding
            targets = F.pad(targets, (0, chosen_logits.shape[1] - targets.shape[1]), value=-100)
            if model.training:
                self.store_metrics({"prompt_and_answer_nll": out[4].item()})
            out[4] = F.cross_entropy(chosen_logits.flatten(0, 1), targets.flatten().to(chosen_logits.device))
            return tuple(out)

    return ORPOConfig, ORPOTrainer, AnswerOnlyORPO


def test_orpo_takes_trls_steps_with_its_sft_term_over_the_answer_tokens(folder, tmp_path):
    cfg = tunesmith_config(folder, "orpo")
    ours = tunesmith_steps(cfg, tmp_path / "run")
    tokenizer, rows = rendered_rows(cfg)
    texts = pair_texts(tokenizer, rows)
    config_class, stock, answer_only = orpo_trainers()

    trainer = answer_only(model=fp32_model(folder), args=trl_args(config_class, tmp_path / "trl", remove_unused_columns=False),
                          train_dataset=texts, processing_class=tokenizer)
    theirs = trainer.train_dataset
    assert [(x["chosen_input_ids"], x["rejected_input_ids"]) for x in theirs] == [
        (r.prompt_ids + r.chosen_ids, r.prompt_ids + r.rejected_ids) for r in rows]
    logs = trl_logs(trainer)
    assert_same_losses([s["loss"] for s in ours], [h["loss"] for h in logs])
    for step, (s, h) in enumerate(zip(ours, logs), start=1):  # both: beta x the mean log-prob per answer token
        assert_close(s["reward_chosen"], h["rewards/chosen"], f"step {step} reward_chosen")
        assert_close(s["reward_rejected"], h["rewards/rejected"], f"step {step} reward_rejected")
    assert ours[-1]["loss"] < ours[0]["loss"]

    # TRL's own ORPO, one step: its first loss is tunesmith's with the prompt tokens added to the SFT term, and only that
    trainer = stock(model=fp32_model(folder), args=trl_args(config_class, tmp_path / "trl-stock", max_steps=1,
                                                               remove_unused_columns=False),
                    train_dataset=texts, processing_class=tokenizer)
    trainer.train()
    first = trainer.state.log_history[0]
    assert_close(first["nll_loss"], logs[0]["prompt_and_answer_nll"], "TRL's stock cross-entropy at step 1")
    assert_close(first["loss"], ours[0]["loss"] - logs[0]["nll_loss"] + first["nll_loss"], "TRL's stock ORPO loss at step 1")
    assert abs(first["nll_loss"] - logs[0]["nll_loss"]) > 1e-3  # the two terms do differ on these rows


# --- KTO ----------------------------------------------------------------------------------------------------------


def test_kto_takes_trls_steps_with_the_same_kl_pairs(folder, tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    cfg = tunesmith_config(folder, "kto")
    ours = tunesmith_steps(cfg, tmp_path / "run")
    tokenizer, rows = rendered_rows(cfg)
    texts = [{"prompt": tokenizer.decode(r.prompt_ids), "completion": tokenizer.decode(r.completion_ids),
              "label": r.label} for r in rows]
    trainer = KTOTrainer(model=fp32_model(folder), args=trl_args(KTOConfig, tmp_path / "trl", train_sampling_strategy="sequential"),
                         train_dataset=Dataset.from_list(texts), processing_class=tokenizer)
    theirs = trainer.train_dataset
    assert [(x["prompt_ids"], x["completion_ids"]) for x in theirs] == [(r.prompt_ids, r.completion_ids) for r in rows]
    # the KL estimate's mismatched pairs: each prompt with the previous row's answer in its block (here all rows),
    # the first with the last, as tunesmith's recipe pairs them
    assert [x["KL_completion_ids"] for x in theirs] == [rows[i - 1].completion_ids for i in range(len(rows))]
    logs = trl_logs(trainer)

    assert ours[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # policy = reference: 1 - sigmoid(0) for every answer
    assert logs[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert_same_losses([s["loss"] for s in ours], [h["loss"] for h in logs])
    for step, (s, h) in enumerate(zip(ours, logs), start=1):
        assert_close(s["kl"], h["kl"], f"step {step} kl")
        assert_close(s["reward_desirable"], h["rewards/chosen"], f"step {step} reward_desirable")
        assert_close(s["reward_undesirable"], h["rewards/rejected"], f"step {step} reward_undesirable")
    assert ours[-1]["kl"] > 0.1  # the KL reference point moved, so the comparison covers it
    assert ours[-1]["loss"] < 0.8 * ours[0]["loss"]
