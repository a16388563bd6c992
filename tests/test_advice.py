"""What to try next (train/advice.py): each rule fires on a synthetic curve built to show its pattern and stays
silent on a healthy one; every command it prints parses with tunesmith's own command line and changes the key it
names; summary.json, report.md and the studio's run page carry the same list."""

import math
import shlex

import pytest
from markupsafe import escape

from tunesmith.cli import build_parser
from tunesmith.config import load_config, resolved_yaml
from tunesmith.train import advice
from tunesmith.train.report import render_report

N = 60  # steps of the synthetic runs


def _cosine(n: int, peak: float = 1e-4) -> list[float]:
    return [peak * 0.5 * (1 + math.cos(math.pi * i / n)) for i in range(n)]


def _run(losses, lrs=None, norms=None, validations=(), steps_per_epoch=20) -> list[dict]:
    """metrics.jsonl's records for a run with these per-step losses (noise is the caller's), learning rates and
    gradient norms; `validations` are (step, val_loss)."""
    n = len(losses)
    lrs = lrs or _cosine(n)
    norms = norms or [1.0 + 0.1 * math.sin(i) for i in range(n)]
    records = [{"type": "train", "step": i + 1, "epoch": round((i + 1) / steps_per_epoch, 4), "loss": loss,
                "grad_norm": norm, "lr": lr, "trained_tokens": 500}
               for i, (loss, lr, norm) in enumerate(zip(losses, lrs, norms))]
    for step, val in validations:
        records.insert(next(i for i, r in enumerate(records) if r["step"] == step) + 1,
                       {"type": "validation", "step": step, "epoch": step // steps_per_epoch, "val_loss": val,
                        "val_perplexity": math.exp(val)})
    return records


def _noise(i: int) -> float:
    return 0.01 * math.sin(1.7 * i)  # deterministic batch-to-batch wobble


def _decay(n: int, tau: float, start: float = 3.0, floor: float = 1.0) -> list[float]:
    return [floor + (start - floor) * math.exp(-i / tau) + _noise(i) for i in range(n)]


def healthy() -> list[dict]:
    """Falls fast, then settles to its floor while a cosine schedule decays; validation follows a little above."""
    losses = _decay(N, tau=8)
    return _run(losses, validations=[(s, losses[s - 1] + 0.1) for s in (20, 40, 60)])


def _config(*overrides):
    return load_config(None, list(overrides))


def _rules(items) -> list[str]:
    return [item["rule"] for item in items]


def test_a_healthy_run_gets_no_advice():
    assert advice.advise(healthy(), _config(), "runs/a") == []
    assert advice.advise(healthy(), _config("method=full", "training.max_grad_norm=null"), "runs/a") == []


@pytest.mark.parametrize("overrides, expected", [
    (["training.max_steps=6", "training.epochs=30"], {"training.max_steps": 100}),
    (["training.max_steps=6"], {"training.max_steps": 100, "training.epochs": 25}),  # 3 epochs stop at 12 steps
    ([], {"training.epochs": 25}),  # 4 steps an epoch here: 25 epochs make about 100 steps
])
def test_too_few_steps(overrides, expected):
    items = advice.advise(_run(_decay(6, tau=8), steps_per_epoch=4), _config(*overrides), "runs/a")
    assert _rules(items) == ["too_few_steps"]  # the curve rules stay out of a 6-point curve
    assert items[0]["set"] == expected


def test_loss_diverged_when_the_loss_jumps_up():
    losses = _decay(40, tau=8)[:40] + [2.6 + _noise(i) for i in range(20)]  # fell to ~1.0, then up to 2.6
    items = advice.advise(_run(losses), _config("training.learning_rate=2e-4"), "runs/a")
    assert "loss_diverged" in _rules(items)
    item = items[_rules(items).index("loss_diverged")]
    assert item["set"] == {"training.learning_rate": 1e-4, "training.warmup_ratio": 0.1}
    assert "jumped up at step 42" in item["why"]  # the jump is at step 41; the 3-step mean passes the bar at 42
    # a NaN says the same (a run stopped on it keeps its records)
    nan = advice.advise(_run(_decay(30, tau=8) + [math.nan]), _config("training.warmup_steps=10"), "runs/a")
    assert _rules(nan) == ["loss_diverged"] and nan[0]["set"]["training.warmup_steps"] == 20


def test_a_spike_the_loss_comes_back_from_is_no_divergence():
    """The losses of a real 20-step run on examples/mix.yaml (dates and times 3:1, lr 1e-3): one hard batch at step
    12 (0.72 after 0.14), then back down; the run is healthy and advice must not call it diverged."""
    losses = [0.963, 1.099, 0.814, 0.47, 0.38, 0.278, 0.205, 0.023, 0.211, 0.211, 0.139, 0.721, 0.338, 0.224, 0.221,
              0.131, 0.201, 0.242, 0.081, 0.31]
    items = advice.advise(_run(losses), _config("training.learning_rate=1e-3"), "runs/a")
    assert "loss_diverged" not in _rules(items)
    # the same run that stays up after the jump is one
    stayed = losses[:12] + [0.72, 0.75, 0.7, 0.74, 0.73, 0.76, 0.72, 0.75]
    assert "loss_diverged" in _rules(advice.advise(_run(stayed), _config("training.learning_rate=1e-3"), "runs/a"))


def test_grad_spikes():
    norms = [1.0 + 0.1 * math.sin(i) for i in range(N)]
    for i in (15, 30, 45):
        norms[i] = 25.0
    records = _run(_decay(N, tau=8), norms=norms)
    unclipped = advice.advise(records, _config("training.max_grad_norm=null"), "runs/a")
    assert _rules(unclipped) == ["grad_spikes"]
    assert unclipped[0]["set"] == {"training.learning_rate": 7e-5,
                                   "training.max_grad_norm": pytest.approx(3 * 1.0, rel=0.1)}
    clipped = advice.advise(records, _config("training.max_grad_norm=1.0", "training.learning_rate=1e-4"), "runs/a")
    assert clipped[0]["set"] == {"training.learning_rate": 7e-5}  # clipping already bites below 3x the median


def test_overfitting_when_validation_rises_while_training_falls():
    losses = [3.0 - 2.5 * i / N + _noise(i) for i in range(N)]  # keeps falling
    vals = [(10, 2.2), (20, 1.9), (30, 1.8), (40, 1.9), (50, 2.0), (60, 2.2)]
    items = advice.advise(_run(losses, validations=vals), _config(), "runs/a")
    assert _rules(items) == ["overfitting", "overfitting"]  # still_falling stays out: more steps would be worse
    assert items[0]["set"] == {"training.epochs": 2, "training.load_best_at_end": True}  # best at step 30, 20/epoch
    assert "22%" in items[0]["why"]
    assert items[1]["set"] == {"lora.dropout": 0.1}
    full = advice.advise(_run(losses, validations=vals), _config("method=full", "training.max_steps=60"), "runs/a")
    assert [i["set"] for i in full] == [{"training.max_steps": 30, "training.load_best_at_end": True},
                                        {"training.weight_decay": 0.1}]
    # validation rising while the training loss rises too is not overfitting
    rising = [1.0 + i / N + _noise(i) for i in range(N)]
    assert "overfitting" not in _rules(advice.advise(_run(rising, validations=vals), _config(), "runs/a"))


def test_still_falling_at_the_end():
    items = advice.advise(_run(_decay(N, tau=N)), _config("training.epochs=3"), "runs/a")
    assert _rules(items) == ["still_falling"]
    assert items[0]["set"] == {"training.epochs": 6}  # twice the steps, at 20 an epoch
    assert "30,000 tokens" in items[0]["why"]
    limited = advice.advise(_run(_decay(N, tau=N)), _config("training.max_steps=60", "training.epochs=10"), "runs/a")
    assert limited[0]["set"] == {"training.max_steps": 120}
    # max_steps ended the run, but twice the steps would outrun training.epochs (3 epochs of 20 = 60): epochs too
    # (the quickstart's case: max_steps 40 of an epoch of 72 steps, epochs 1; 80 steps need 2 epochs)
    capped = advice.advise(_run(_decay(N, tau=N)), _config("training.max_steps=60"), "runs/a")
    assert capped[0]["set"] == {"training.max_steps": 120, "training.epochs": 6}


def test_plateau_with_the_learning_rate_still_high():
    constant = [2e-4] * N
    items = advice.advise(_run(_decay(N, tau=5), lrs=constant),
                          _config("training.lr_scheduler=constant", "training.learning_rate=2e-4"), "runs/a")
    assert _rules(items) == ["plateau_lr_high"]
    assert items[0]["set"] == {"training.learning_rate": 1.6e-4, "training.lr_scheduler": "cosine"}


def test_underfitting_on_lora_and_on_full():
    flat = [2.0 + _noise(i) for i in range(N)]
    items = advice.advise(_run(flat), _config("lora.r=8", "lora.alpha=16", "lora.dropout=0.05"), "runs/a")
    assert _rules(items) == ["underfitting"]
    assert items[0]["set"] == {"lora.r": 16, "lora.alpha": 32.0, "lora.dropout": 0.0}
    slow = advice.advise(_run(flat), _config("training.learning_rate=2e-5"), "runs/a")
    assert slow[0]["set"] == {"training.learning_rate": 4e-5}  # below LoRA's usual rates: the rate first
    full = advice.advise(_run(flat), _config("method=full", "training.learning_rate=1e-5"), "runs/a")
    assert full[0]["set"] == {"training.learning_rate": 2e-5}
    # flat because it is unstable: the spikes are the advice, not more capacity
    norms = [1.0] * N
    norms[30] = 30.0
    assert _rules(advice.advise(_run(flat, norms=norms), _config(), "runs/a")) == ["grad_spikes"]


def test_grpo_runs_get_no_advice_from_the_loss_level():
    """GRPO's loss sits near zero whatever the rewards do: a flat one is not underfitting."""
    flat = [2.0 + _noise(i) for i in range(N)]
    assert _rules(advice.advise(_run(flat), _config(), "runs/a")) == ["underfitting"]
    assert advice.advise(_run(flat), _config("objective=grpo"), "runs/a") == []
    near_zero = [0.001 * math.sin(i) for i in range(N)]
    assert advice.advise(_run(near_zero), _config("objective=grpo"), "runs/a") == []


def _every_item(cfg_overrides=()) -> list[dict]:
    """The items of every rule's curve above."""
    norms = [1.0] * N
    norms[30] = 30.0
    curves = [
        (_run(_decay(6, tau=8), steps_per_epoch=4), ["training.max_steps=6"]),
        (_run(_decay(40, tau=8) + [2.6] * 20), []),
        (_run(_decay(N, tau=8), norms=norms), ["training.max_grad_norm=null"]),
        (_run(_decay(N, tau=8), norms=norms), []),
        (_run([3.0 - 2.5 * i / N for i in range(N)], validations=[(20, 1.9), (40, 1.8), (60, 2.2)]), []),
        (_run(_decay(N, tau=N)), []),
        (_run(_decay(N, tau=5), lrs=[1e-4] * N), ["training.lr_scheduler=constant"]),
        (_run([2.0 + _noise(i) for i in range(N)]), []),
        (_run([2.0 + _noise(i) for i in range(N)]), ["method=full"]),
        (_run([2.0 + _noise(i) for i in range(N)]), ["training.learning_rate=2e-5"]),
    ]
    return [(item, overrides) for records, overrides in curves
            for item in advice.advise(records, _config(*overrides), "RUN")]


def test_every_printed_command_parses_and_changes_the_key_it_names(tmp_path):
    items = _every_item()
    assert {item["rule"] for item, _ in items} == {rule.__name__ for rule in advice.RULES}
    parser = build_parser()
    for item, overrides in items:
        run_dir = tmp_path / "my run"  # a space, which the command quotes
        run_dir.mkdir(exist_ok=True)
        base = _config(*overrides)
        (run_dir / "config.yaml").write_text(resolved_yaml(base))
        assert item["command"] == advice.command("RUN", item["set"])
        line = advice.command(run_dir, item["set"])
        words = shlex.split(line)
        assert words[:2] == ["tunesmith", "train"]
        args = parser.parse_args(words[1:])
        assert args.config == str(run_dir / "config.yaml") and args.output == f"{run_dir}-next"
        changed = load_config(args.config, args.set)
        for key, value in item["set"].items():
            section, name = key.split(".") if "." in key else (None, key)
            now = getattr(getattr(changed, section), name) if section else getattr(changed, name)
            before = getattr(getattr(base, section), name) if section else getattr(base, name)
            assert now == value and now != before, (item["rule"], key, before, now)


def test_report_md_and_the_summary_carry_the_advice():
    items = advice.advise(_run(_decay(N, tau=N)), _config(), "runs/a")
    summary = {"run_dir": "runs/a", "method": "lora",
               "model": {"name": "m", "trainable_parameters": 1, "parameters": 2},
               "hardware": {"device": "cpu", "dtype": "float32"},
               "health": {"healthy": True, "findings": ["loss fell."]},
               "train": {"steps": N, "wall_s": 1.0, "first_loss": 3.0, "final_loss": 1.5,
                         "trained_tokens_per_s": 10.0},
               "memory": {"peak_rss_bytes": 2**30}, "next_commands": [], "advice": items}
    report = render_report(summary, [])
    section = report.split("## What to try next", 1)[1].split("## Next", 1)[0]
    assert "**still falling**" in section and items[0]["command"] in section
    assert "Nothing in the curves" in render_report({**summary, "advice": []}, [])
    assert "What to try next" not in render_report({k: v for k, v in summary.items() if k != "advice"}, [])


def test_a_finished_run_and_its_studio_page_show_the_same_advice(tmp_path):
    """A real 4-step run: summary.json, report.md and the studio's run page carry the same item, and its
    "Re-run with this change" link opens the train form with the change made."""
    from conftest import save_tiny_run_config
    from fastapi.testclient import TestClient

    from tunesmith import api
    from tunesmith.studio.app import StudioSettings, create_app

    run_dir = tmp_path / "run"
    summary = api.train(api.load_config(save_tiny_run_config(tmp_path), ["training.max_steps=4"]), run_dir)
    assert [item["rule"] for item in summary["advice"]] == ["too_few_steps"]
    item = summary["advice"][0]
    assert item["set"] == {"training.max_steps": 100}
    assert item["command"] == advice.command(run_dir, {"training.max_steps": 100})
    assert item["command"] in (run_dir / "report.md").read_text()

    app = create_app(StudioSettings(home=tmp_path / "studio", poll_s=0.2))
    with TestClient(app, base_url="http://127.0.0.1:7860") as client:
        client.headers["X-Tunesmith-Token"] = app.state.token
        project = client.post("/api/projects", json={"name": "tiny", "base_model": "x"}).json()["id"]
        run_id = client.post("/api/runs/folder", json={"folder": str(run_dir), "project_id": project}).json()["id"]
        page = client.get(f"/runs/{run_id}").text
        section = page.split('id="advice"', 1)[1].split("</section>", 1)[0]
        assert 'data-rule="too_few_steps"' in section and escape(item["command"]) in section
        link = section.split('href="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
        form = client.get(link).text
        assert 'name="training.max_steps" value="100"' in form
        assert 'name="training.learning_rate" value="0.003"' in form  # the rest is the run's own config
