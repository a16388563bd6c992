"""Preference and reward tuning through the training loop, on a tiny random Llama: DPO's first loss is log 2 and it
falls; every objective learns the preferred answer; packing = padding; the full fine-tuning reference is computed
once and kept; exact resume after SIGKILL for DPO and GRPO; GRPO logs its rewards and samples reproducibly; bad
config and rows end in sentences.  (TRL agreement: tests/test_preference_trl.py; data formats:
tests/test_preference_data.py.)"""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import train_child_signalled
from safetensors.torch import load_file

from tunesmith import api
from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.train.checkpoint import list_checkpoints

WORDS = ["river", "stone", "cloud", "apple", "green", "music", "paper", "light", "house", "water"]
PAIRS = [{"prompt": f"Repeat the word {w}.", "chosen": f"{w} {w} {w}", "rejected": "I will not."} for w in WORDS]
KTO_ROWS = [{"prompt": f"Repeat the word {w}.", "completion": f"{w} {w} {w}" if i % 2 else "I will not.",
             "label": bool(i % 2)} for i, w in enumerate(WORDS * 2)]
SFT_ROWS = [{"instruction": f"Repeat the word {w}.", "output": w} for w in WORDS]


@pytest.fixture
def tiny(tmp_path, tiny_llama, tiny_tokenizer):
    """`tiny(rows, *overrides) -> overrides`: the tiny Llama saved, `rows` written, a few fast steps."""
    model_dir = tmp_path / "tiny"
    tiny_llama.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)

    def make(rows, *extra):
        data = tmp_path / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return [f"model.name={model_dir}", f"data.path={data}", "data.validation_split=0.2", "training.epochs=100",
                "training.max_steps=8", "training.batch_size=2", "training.learning_rate=3e-3",
                "training.lr_scheduler=constant", "eval.enabled=false", *extra]
    return make


def _train_records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["type"] == "train"]


def test_dpo_starts_at_log_2_learns_the_chosen_answer_and_reports_base_vs_tuned(tmp_path, tiny):
    overrides = tiny(PAIRS, "objective=dpo", "eval.enabled=true", "training.max_steps=12")
    summary = api.train(load_config(None, overrides), tmp_path / "run")
    steps = _train_records(tmp_path / "run")
    # the policy starts equal to its reference (LoRA's B is 0): every pair's loss is -log sigmoid(0)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["loss"] < 0.6 and steps[-1]["reward_margin"] > 0.1
    assert summary["objective"] == {"type": "dpo", "beta": 0.1, "label_smoothing": 0.0, "reference_free": False,
                                    "reference": "base with the adapter switched off"}
    base, tuned = summary["eval"]["base"], summary["eval"]["tuned"]
    assert base["preference_accuracy"] == 0.5 and base["reward_margin"] == 0.0  # the base against itself: all ties
    assert tuned["preference_accuracy"] == 1.0 and tuned["reward_margin"] > 0.1
    saved = json.loads((tmp_path / "run" / "eval" / "preference.json").read_text())
    assert len(saved["logps"]["tuned"]) == base["rows"] == 2
    assert summary["validation"]["reward_accuracy"] == 1.0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| preference_accuracy | 0.5 | 1 |" in report
    # `tunesmith eval` on the run: the base with the adapter off, then on, scored the same way as at the end of training
    again = api.evaluate(tmp_path / "run")
    assert again["files"] == ["preference.json"]
    assert again["base"] == base
    assert again["tuned"]["preference_accuracy"] == tuned["preference_accuracy"]
    assert again["tuned"]["reward_margin"] == pytest.approx(tuned["reward_margin"], rel=1e-5)


@pytest.mark.parametrize("objective", ["ipo", "simpo", "orpo", "kto"])
def test_every_preference_objective_learns_which_answer_is_preferred(tmp_path, tiny, objective):
    rows = KTO_ROWS if objective == "kto" else PAIRS
    # ORPO's odds-ratio term is a tenth of its loss by default; the cross-entropy beside it learns slower on a tiny model
    extra = ["objective.beta=1.0"] if objective == "orpo" else []
    summary = api.train(load_config(None, tiny(rows, f"objective={objective}", "training.max_steps=10", *extra)),
                        tmp_path / "run")
    steps = _train_records(tmp_path / "run")
    first = sum(s["loss"] for s in steps[:2]) / 2
    last = sum(s["loss"] for s in steps[-2:]) / 2
    assert last < first, [s["loss"] for s in steps]
    if objective == "kto":
        assert summary["validation"]["reward_desirable"] > 0 > summary["validation"]["reward_undesirable"]
    else:
        assert summary["validation"]["reward_margin"] > 0 and summary["validation"]["reward_accuracy"] == 1.0


def test_packed_and_padded_dpo_take_the_same_steps(tmp_path, tiny):
    runs = {}
    for packing in ("true", "false"):
        overrides = tiny(PAIRS, "objective=dpo", f"training.packing={packing}", "lora.dropout=0",
                         "training.max_steps=5")
        api.train(load_config(None, overrides), tmp_path / packing)
        runs[packing] = [s["loss"] for s in _train_records(tmp_path / packing)]
    # the same sums of the same token log-probs, only laid out differently: float rounding apart
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-5)


def test_full_fine_tuning_dpo_computes_its_reference_once_and_keeps_it(tmp_path, tiny):
    overrides = tiny(PAIRS, "objective=dpo", "method=full", "training.learning_rate=1e-4", "training.max_steps=4")
    api.train(load_config(None, overrides), tmp_path / "run")
    steps = _train_records(tmp_path / "run")
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[-1]["loss"] < steps[0]["loss"]
    reference = load_file(tmp_path / "run" / "reference-logps.safetensors")
    assert reference["train"].shape == (8, 2) and reference["validation"].shape == (2, 2)
    assert bool((reference["train"] < 0).all())  # log-probs of whole answers


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_a_sigkilled_preference_run_resumes_to_the_same_steps(tmp_path, tiny, objective):
    rows = SFT_ROWS if objective == "grpo" else PAIRS
    extra = ["objective.group_size=4", "objective.max_new_tokens=6"] if objective == "grpo" else []
    overrides = tiny(rows, f"objective={objective}", "training.max_steps=9", "training.save_steps=3",
                     "lora.dropout=0.1", *extra)  # dropout and sampling draw random numbers
    straight = api.train(load_config(None, overrides), tmp_path / "straight")
    run_dir = tmp_path / "killed"
    result = train_child_signalled(tmp_path, overrides, run_dir, kill_at_step=7, sig="SIGKILL")
    assert result.returncode == -9, result.stderr[-2000:]
    # 4 steps an epoch: the newest checkpoint (every 3 steps) is step 6, mid-epoch, and step 7 is redone
    assert [p.name for p in list_checkpoints(run_dir)][-1] == "step-00000006"
    resumed = api.train(load_config(run_dir / "config.yaml"), run_dir, resume=True)
    assert resumed["train"]["steps"] == straight["train"]["steps"] == 9
    a, b = _train_records(tmp_path / "straight"), _train_records(run_dir)
    assert [r["step"] for r in b] == list(range(1, 10))
    keys = ["loss", "reward_mean", "completion_length"] if objective == "grpo" else ["loss", "reward_margin"]
    for x, y in zip(a, b):
        for key in keys:
            # GRPO's loss is near 0 (advantages average 0 in a group; what is left is the KL term), so its float
            # rounding is compared absolutely; the sampled rewards and lengths must be the same
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (key, x["step"])
    wa = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    wb = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    for name in wa:
        # AdamW divides by the root of the second moment: an element whose gradients are near 0 turns float rounding
        # (another summation order after the restart) into a relatively larger step: seen 4e-6 on a 4e-3 element
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=2e-5)


def test_grpo_samples_groups_scores_them_and_logs_what_it_did(tmp_path, tiny):
    # a regex reward that a random model meets now and then, so groups have a spread and the loss a gradient
    overrides = tiny(SFT_ROWS, "objective.type=grpo", "objective.group_size=4", "objective.max_new_tokens=6",
                     "objective.rewards=[{type: regex, pattern: '[aeiou]'}, {type: length, target: 12, weight: 0.5}]",
                     "training.max_steps=4", "eval.enabled=true", "eval.limit=2", "eval.max_new_tokens=6")
    summary = api.train(load_config(None, overrides), tmp_path / "run")
    steps = _train_records(tmp_path / "run")
    for s in steps:
        assert 0.0 <= s["reward_regex"] <= 1.0 and 0.0 <= s["reward_length"] <= 1.0
        assert s["reward_mean"] == pytest.approx(s["reward_regex"] + 0.5 * s["reward_length"], abs=1e-6)
        assert 1 <= s["completion_length"] <= 6 and s["kl"] >= 0 and s["reward_spread"] >= 0
    assert any(s["reward_spread"] > 0 for s in steps) and any(s["grad_norm"] > 0 for s in steps)
    assert summary["objective"]["group_size"] == 4
    assert "mean_reward" in summary["eval"]["base"] and "mean_reward" in summary["eval"]["tuned"]
    # the same config samples the same answers: same rewards, same losses
    again = api.train(load_config(None, overrides), tmp_path / "again")
    assert [s["reward_mean"] for s in _train_records(tmp_path / "again")] == [s["reward_mean"] for s in steps]
    assert again["train"]["final_loss"] == pytest.approx(summary["train"]["final_loss"], rel=1e-5, abs=1e-7)


def test_objective_short_forms_and_their_sentences(tmp_path, tiny):
    cfg = load_config(None, tiny(PAIRS, "objective=simpo", "objective.beta=2.5"))
    assert cfg.objective.type == "simpo" and cfg.objective.resolved_beta() == 2.5
    with pytest.raises(UserError, match=r"objective\.type.*'ppo'.*allowed"):
        load_config(None, ["objective=ppo"])
    # preference data under sft, and SFT data under dpo: the sentence names the file and what is expected
    with pytest.raises(UserError, match=r"rows\.jsonl.*prompt, chosen and rejected"):
        api.train(load_config(None, tiny(SFT_ROWS, "objective=dpo")), tmp_path / "wrong")
    with pytest.raises(UserError, match="method full"):
        api.train(load_config(None, tiny(SFT_ROWS, "objective=grpo", "method=full")), tmp_path / "grpo-full")
    with pytest.raises(UserError, match="batch_size to 2 or more"):
        api.train(load_config(None, tiny(KTO_ROWS, "objective=kto", "training.batch_size=1")), tmp_path / "kto1")


def test_a_bad_preference_row_stops_the_cli_with_a_sentence(tmp_path, tiny, capsys):
    from tunesmith.cli import main

    rows = [*PAIRS[:4], {"prompt": "Repeat the word x.", "chosen": "x x x"}, *PAIRS[4:]]
    overrides = tiny(rows, "objective=dpo")
    args = ["train", str(tmp_path / "none.yaml"), "--output", str(tmp_path / "bad")]
    (tmp_path / "none.yaml").write_text("{}\n")
    for item in overrides:
        args += ["--set", item]
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "rows.jsonl" in err and "line 5" in err and "rejected" in err
    assert not (tmp_path / "bad").exists()


def test_two_processes_take_the_dpo_steps_of_one(tmp_path, tiny):
    """DDP: each process runs its micro-batches (reference passes included); the loss is the mean over the step's
    pairs on every process, so two processes with micro-batch 2 step as one process accumulating two."""
    overrides = tiny(PAIRS, "objective=dpo", "training.max_steps=4", "lora.dropout=0.1")
    (tmp_path / "cfg.yaml").write_text("{}\n")
    args = [sys.executable, "-m", "tunesmith.cli", "train", str(tmp_path / "cfg.yaml"), "--nproc", "2",
            "--output", str(tmp_path / "two")]
    for item in [*overrides, "training.gradient_accumulation=1"]:
        args += ["--set", item]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    api.train(load_config(None, [*overrides, "training.gradient_accumulation=2"]), tmp_path / "one")
    two, one = _train_records(tmp_path / "two"), _train_records(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
    assert one[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and one[-1]["loss"] < one[0]["loss"]
    wa = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    for name in wa:
        # the gradients are summed over the processes in another order; AdamW magnifies that rounding on elements
        # whose gradients are near 0 (seen: 7.5e-6 on a 3.8e-3 element, one of 1024)
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=2e-5)


def test_data_inspect_reads_preference_pairs_and_names_the_first_bad_row(tmp_path):
    from tunesmith.data.inspection import format_inspection, inspect_file

    good = tmp_path / "pairs.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    report = inspect_file(good)
    assert report["format"] == "preference" and report["valid_rows"] == 10 and report["problems"] == []
    assert "chosen: river river river" in format_inspection(report)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in [*PAIRS[:2], {**PAIRS[2], "rejected": PAIRS[2]["chosen"]}]))
    report = inspect_file(bad)
    assert len(report["problems"]) == 1 and "line 3" in report["problems"][0] and "same answer" in report["problems"][0]


def test_the_policy_and_reference_log_probs_agree_and_the_fused_gradient_is_autograds():
    """The policy's answer log-probs (fused: gradient worked out in forward) and the reference's (no gradient) are
    one formula, so a policy equal to its reference ties with it exactly (DPO starts at log 2 on a real vocabulary)."""
    from tunesmith.prefer.sequences import token_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 16384, bias=False).requires_grad_(False)
    hidden = torch.randn(300, 64) * 9  # wide logits, as a trained model's
    targets = (hidden @ head.weight.t()).argmax(-1)
    policy = token_logprobs(head, hidden.clone().requires_grad_(), targets)
    with torch.no_grad():
        reference = token_logprobs(head, hidden, targets)
    assert torch.equal(policy.detach(), reference)
    weights = torch.randn(300)
    fused = hidden.clone().requires_grad_()
    (token_logprobs(head, fused, targets) * weights).sum().backward()
    plain = hidden.clone().requires_grad_()
    (torch.log_softmax(plain @ head.weight.t(), -1).gather(1, targets[:, None]).squeeze(1) * weights).sum().backward()
    torch.testing.assert_close(fused.grad, plain.grad, rtol=1e-4, atol=1e-5)


def test_precompute_reference_on_the_command_line_keeps_an_adapter_runs_reference_in_the_folder(tmp_path, tiny):
    from tunesmith.cli import main

    (tmp_path / "none.yaml").write_text("{}\n")
    args = ["train", str(tmp_path / "none.yaml"), "--output", str(tmp_path / "run"), "--precompute-reference"]
    for item in tiny(PAIRS, "objective=dpo", "training.max_steps=2"):
        args += ["--set", item]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["objective"]["reference"] == "precomputed"
    assert (tmp_path / "run" / "reference-logps.safetensors").exists()
    assert _train_records(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
