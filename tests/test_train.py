"""The training loop on tiny random Llama models: loss falls, the loss is what it claims, the run folder
holds what the SPEC says."""

import json

import pytest
import torch

from tunesmith import api
from tunesmith.config import load_config
from tunesmith.data.batching import collate
from tunesmith.data.tokens import IGNORE_INDEX
from tunesmith.train.loop import plan_steps
from tunesmith.train.loss import token_nll_sum

ROWS = [
    {"instruction": "Say the colour of the sky.", "input": "", "output": "The sky is blue."},
    {"instruction": "Name a fruit.", "input": "yellow", "output": "A banana is yellow."},
    {"instruction": "Count to three.", "input": "", "output": "one two three"},
    {"instruction": "Greet the user.", "input": "Ana", "output": "Hello Ana, good to see you."},
    {"instruction": "Say the colour of grass.", "input": "", "output": "Grass is green."},
    {"instruction": "Name an animal.", "input": "big", "output": "An elephant is big."},
    {"instruction": "Answer yes or no.", "input": "Is fire hot?", "output": "yes"},
    {"instruction": "Repeat the word.", "input": "river", "output": "river river"},
]


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_llama, tiny_tokenizer):
    folder = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _config(model_dir, data_path, *extra):
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            f"data.path={data_path}",
            "data.validation_split=0.25",
            "training.max_steps=20",
            "training.epochs=100",
            "eval.max_new_tokens=8",
            *extra,
        ],
    )


def test_token_nll_sum_matches_the_models_own_loss(tiny_llama, tiny_tokenizer):
    """Our selected-positions loss equals Hugging Face's full-logits loss on the same labels."""

    class Row:
        def __init__(self, ids, labels):
            self.input_ids, self.labels = ids, labels

    torch.manual_seed(0)
    vocab = tiny_llama.config.vocab_size
    rows = [
        Row(list(range(5, 17)), [IGNORE_INDEX] * 6 + list(range(11, 17))),
        Row(list(range(20, 27)), [IGNORE_INDEX] * 3 + list(range(23, 27))),
    ]
    assert max(max(r.input_ids) for r in rows) < vocab
    batch = collate(rows, pad_token_id=0)
    nll, n = token_nll_sum(tiny_llama, batch["input_ids"], batch["attention_mask"], batch["labels"])
    expected_n = sum(sum(1 for x in r.labels[1:] if x != IGNORE_INDEX) for r in rows)
    assert n == expected_n
    reference = tiny_llama(**batch).loss  # HF: mean over non-ignored shifted labels
    assert float(nll) / n == pytest.approx(float(reference), rel=1e-5)


def test_plan_steps_counts_optimizer_steps():
    cfg = load_config(None, ["training.batch_size=2", "training.gradient_accumulation=3", "training.epochs=2"])
    assert plan_steps(13, cfg) == (3, 6)  # 7 micro-batches -> 3 steps an epoch
    cfg = load_config(None, ["training.max_steps=4"])
    assert plan_steps(100, cfg)[1] == 4


@pytest.mark.parametrize("method, lr", [("lora", "5e-3"), ("full", "1e-3")])
def test_loss_falls_over_20_steps_and_the_run_folder_is_complete(tmp_path, tiny_model_dir, tiny_data, method, lr):
    cfg = _config(tiny_model_dir, tiny_data, f"method={method}", f"training.learning_rate={lr}",
                  "training.lr_scheduler=constant", "lora.dropout=0.0")
    run_dir = tmp_path / "run"
    summary = api.train(cfg, run_dir)

    train = summary["train"]
    assert train["steps"] == 20
    assert train["final_loss"] <= 0.9 * train["first_loss"], train

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 21))
    for key in ("loss", "grad_norm", "lr", "epoch", "tokens_per_s", "rss_bytes", "peak_rss_bytes"):
        assert all(key in r for r in steps), key
    assert any(r["type"] == "validation" for r in records)

    saved = json.loads((run_dir / "summary.json").read_text())
    for key in ("first_loss", "final_loss", "steps", "trained_tokens_per_s"):
        assert key in saved["train"]
    assert saved["memory"]["peak_rss_bytes"] > 0
    assert set(saved["eval"]) == {"base", "tuned"}
    assert "exact_match" in saved["eval"]["base"] and "loss" in saved["eval"]["tuned"]
    # training on the held-out rows' neighbours lowers their loss too: here they share the template
    assert (run_dir / "training.png").stat().st_size > 1000
    assert "healthy" in (run_dir / "report.md").read_text().lower()
    assert load_config(run_dir / "config.yaml").method == method

    folder = run_dir / ("adapter" if method == "lora" else "model")
    weights = list(folder.glob("*.safetensors"))
    assert weights, list(folder.iterdir())
    assert not list(run_dir.rglob("*.bin")) and not list(run_dir.rglob("*.pt"))


def test_lora_trains_only_the_adapter_and_saves_it(tmp_path, tiny_model_dir, tiny_data, tiny_llama):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = _config(tiny_model_dir, tiny_data, "training.max_steps=3", "eval.enabled=false")
    api.train(cfg, tmp_path / "run")
    tensors = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert tensors and all("lora_" in name for name in tensors)
    # every linear layer of the block got an adapter (all-linear is the default)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(proj in name for name in tensors), proj
    # the base stays untouched: base + adapter differs from base, base alone equals the original
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "run" / "adapter")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(base(ids).logits, tiny_llama(ids).logits, atol=1e-6)
        assert not torch.allclose(tuned(ids).logits, base(ids).logits, atol=1e-6)


def test_packing_learns_what_padding_learns_and_reports_the_same_throughput(tmp_path, tiny_model_dir, tiny_data):
    """The same rows, batches and seed: packed passes (several per micro-batch) and padded batches give the
    same per-step losses and validation loss; the summary's throughput is the metrics' tokens over time."""
    common = ["lora.dropout=0", "training.batch_size=3", "training.max_steps=6", "eval.enabled=false"]
    packed = api.train(_config(tiny_model_dir, tiny_data, *common, "training.packing=true",
                                  "training.pass_tokens=40"), tmp_path / "packed")
    padded = api.train(_config(tiny_model_dir, tiny_data, *common, "training.packing=false"), tmp_path / "padded")
    assert packed["hardware"]["packing"] is True and packed["hardware"]["pass_tokens"] == 40
    assert padded["hardware"]["packing"] is False

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["type"] == "train"]

    assert losses("packed") == pytest.approx(losses("padded"), rel=1e-4)
    assert packed["validation"]["loss"] == pytest.approx(padded["validation"]["loss"], rel=1e-4)
    assert packed["train"]["trained_tokens"] == padded["train"]["trained_tokens"]
    records = [json.loads(line) for line in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    expected = sum(r["trained_tokens"] for r in steps) / sum(r["step_s"] for r in steps)
    assert packed["train"]["trained_tokens_per_s"] == pytest.approx(expected, rel=1e-6)


def test_allocate_early_changes_nothing_but_where_the_state_lives():
    """Pre-allocated gradients and AdamW moments give the same steps and the same optimiser state as torch's
    lazy ones, also through accelerate's optimiser wrapper (what run_training passes)."""
    from accelerate import Accelerator

    from tunesmith.train.optim import allocate_early

    def train(early: bool):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01)
        if early:
            allocate_early(params, Accelerator(cpu=True).prepare(optimizer))  # the wrapped optimiser, as in run_training
            assert all(len(optimizer.state[p]) == 3 for p in params)  # step, exp_avg, exp_avg_sq before any step
        for step in range(3):
            x = torch.full((4, 6), float(step + 1))
            model(x).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=not early)
        return [p.detach().clone() for p in params], optimizer.state_dict()["state"]

    (lazy_params, lazy_state), (early_params, early_state) = train(False), train(True)
    for a, b in zip(lazy_params, early_params):
        assert torch.equal(a, b)
    for key in lazy_state:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(lazy_state[key][name], early_state[key][name]), (key, name)
