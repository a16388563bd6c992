"""Training methods (LoRA, QLoRA, DoRA, rsLoRA, AdaLoRA, full), target-module defaults per family,
and the 8-bit optimisers, on tiny random models."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

# fixtures: `tiny_model_dir` (the tiny Llama and tokenizer saved in a folder), `tiny_data` (8 Alpaca rows, JSONL)
from test_train import tiny_data, tiny_model_dir  # noqa: F401

from tunesmith import api
from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.hardware import four_bit_status
from tunesmith.models.adapters import (
    after_optimizer_step,
    count_parameters,
    extra_loss,
    linear_module_names,
    prepare_trainable,
    resolve_target_modules,
)
from tunesmith.models.families import FAMILY_TARGET_MODULES
from tunesmith.models.loader import load_model
from tunesmith.train.optim import make_optimizer

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FOUR_BIT, FOUR_BIT_DETAIL = four_bit_status()
needs_four_bit = pytest.mark.skipif(not FOUR_BIT, reason=f"4-bit not available here: {FOUR_BIT_DETAIL}")


def _config(model_dir, data_path, *extra):
    return load_config(None, [
        f"model.name={model_dir}", f"data.path={data_path}", "data.validation_split=0",
        "training.max_steps=20", "training.epochs=100", "training.batch_size=8",  # one batch: the same rows each step
        "training.lr_scheduler=constant", "lora.dropout=0.0", "eval.enabled=false", *extra,
    ])


def _gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128))


# Learning rates that move a tiny random model visibly.  AdaLoRA starts slower than LoRA (its factors start
# at std 0.02 and its singular values at zero, so the update grows as a product of three small terms), so it
# gets a higher rate, a larger alpha and 30 steps.
METHOD_SETTINGS = {
    "lora": ["training.learning_rate=5e-3"],
    "dora": ["training.learning_rate=5e-3"],
    "rslora": ["training.learning_rate=5e-3"],
    "qlora": ["training.learning_rate=5e-3"],
    "adalora": ["training.learning_rate=2e-2", "lora.alpha=64", "training.max_steps=30"],
    "full": ["training.learning_rate=1e-3"],
    "full+adamw_8bit": ["training.learning_rate=1e-3", "training.optimizer=adamw_8bit"],
}


@pytest.mark.parametrize("variant", list(METHOD_SETTINGS))
def test_each_method_lowers_the_loss(tmp_path, tiny_model_dir, tiny_data, variant, capsys):
    method = variant.split("+")[0]
    if method == "qlora" and not FOUR_BIT:
        pytest.skip(f"4-bit not available here: {FOUR_BIT_DETAIL}")
    cfg = _config(tiny_model_dir, tiny_data, f"method={method}", *METHOD_SETTINGS[variant])
    summary = api.train(cfg, tmp_path / "run")
    train = summary["train"]
    assert train["steps"] == cfg.training.max_steps
    assert train["final_loss"] <= 0.9 * train["first_loss"], train
    printed = capsys.readouterr().out
    assert "instead" not in printed  # no fallback notice: the method (and optimiser) asked for ran

    if method == "full":
        assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
        from safetensors.torch import load_file

        checkpoint = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
        state = load_file(checkpoint / "optimizer.safetensors")
        eight_bit = [k for k, v in state.items() if k.endswith(".state1") and v.dtype == torch.uint8]
        assert bool(eight_bit) is variant.endswith("adamw_8bit")  # the checkpoint holds the 8-bit moments
        return
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(LLAMA_TARGETS)  # `auto` for llama
    if method == "adalora":
        assert adapter["peft_type"] == "ADALORA"
        # checkpoints carry what AdaLoRA keeps outside the weights: the chosen ranks (and scores until they are fixed)
        checkpoint = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
        assert (checkpoint / "method.safetensors").is_file()
        saved = json.loads((checkpoint / "state.json").read_text())["method"]["rank_pattern"]
        # PEFT keys the live pattern by module (with and without the adapter's name); the saved adapter by module
        by_module = {key.removesuffix(".default"): mask for key, mask in saved.items()}
        assert adapter["rank_pattern"] and all(by_module[key] == mask for key, mask in adapter["rank_pattern"].items())
        # after_optimizer_step ran: ranks were cut from init_r (1.5 x 16 = 24) to an average of lora.r (16)
        kept = [sum(mask) for mask in adapter["rank_pattern"].values()]
        assert len(kept) == 2 * len(LLAMA_TARGETS) and all(len(m) == 24 for m in adapter["rank_pattern"].values())
        assert sum(kept) == 16 * len(kept) and min(kept) < 24
        # the saved adapter, cut to those ranks (some layers to none), loads back onto the base and changes it
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "run" / "adapter")
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():
            assert not torch.allclose(tuned(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)
    else:
        assert adapter["peft_type"] == "LORA"
        assert adapter["use_dora"] is (method == "dora")
        assert adapter["use_rslora"] is (method == "rslora")


@pytest.mark.parametrize(
    "overrides, dora, rslora",
    [
        (["method=dora"], True, False),
        (["method=rslora"], False, True),
        (["method=lora", "lora.use_dora=true"], True, False),
        (["method=lora", "lora.use_rslora=true"], False, True),
        (["method=dora", "lora.use_rslora=true"], True, True),
        (["method=lora"], False, False),
    ],
)
def test_dora_and_rslora_change_the_layers_not_only_a_flag(tiny_llama, overrides, dora, rslora):
    cfg = load_config(None, ["lora.r=4", "lora.alpha=8", *overrides])
    model = prepare_trainable(tiny_llama, cfg)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    # DoRA learns a magnitude per output row beside A and B
    has_magnitude = any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)
    assert has_magnitude is dora
    # rsLoRA scales by alpha / sqrt(r) = 4, plain LoRA by alpha / r = 2
    assert q_proj.scaling["default"] == pytest.approx(8 / math.sqrt(4) if rslora else 8 / 4)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["method=adalora", "lora.use_dora=true", "training.max_steps=10"], ["lora.use_dora", "adalora"]),
        (["method=full", "lora.use_rslora=true"], ["lora.use_rslora", "full"]),
        (["method=adalora"], ["training.max_steps", "adalora.total_step"]),  # the schedule's length is unknown
        (["method=adalora", "training.max_steps=10", "adalora.tinit=8", "adalora.tfinal=2"], ["tinit", "tfinal"]),
        (["method=adalora", "training.max_steps=10", "adalora.init_r=8"], ["adalora.init_r", "lora.r"]),
    ],
)
def test_impossible_method_settings_are_sentences(tiny_llama, overrides, words):
    with pytest.raises(UserError) as err:
        prepare_trainable(tiny_llama, load_config(None, overrides))
    for word in words:
        assert word in str(err.value)


def test_adalora_schedule_length_comes_from_the_run_then_the_config(tiny_llama, tiny_llama_config):
    from transformers import LlamaForCausalLM

    planned = prepare_trainable(tiny_llama, load_config(None, ["method=adalora"]), total_steps=40)
    config = planned.peft_config["default"]
    assert (config.total_step, config.tinit, config.tfinal, config.init_r, config.target_r) == (40, 4, 8, 24, 16)
    fixed = prepare_trainable(
        LlamaForCausalLM(tiny_llama_config),
        load_config(None, ["method=adalora", "adalora.total_step=100", "adalora.tinit=0", "training.max_steps=7"]),
        total_steps=40,
    )
    assert (fixed.peft_config["default"].total_step, fixed.peft_config["default"].tinit) == (100, 0)


def test_adalora_extra_loss_is_the_orthogonality_penalty_peft_adds_in_its_forward(tiny_llama):
    cfg = load_config(None, ["method=adalora", "training.max_steps=10", "lora.r=4", "adalora.orth_reg_weight=0.3"])
    model = prepare_trainable(tiny_llama, cfg)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        with_penalty = model(input_ids=ids, labels=ids).loss  # AdaLoraModel.forward adds the penalty
        without = model.get_base_model()(input_ids=ids, labels=ids).loss  # the path our loss takes skips it
        penalty = extra_loss(model)
    assert float(penalty) > 0.1  # the factors start far from orthogonal (std 0.02)
    assert float(with_penalty - without) == pytest.approx(float(penalty), rel=1e-5)
    # it has a gradient that reaches the factors, and only AdaLoRA has such a term
    assert extra_loss(prepare_trainable(_gpt2(50), load_config(None, ["method=lora"]))) is None
    extra_loss(model).backward()
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    assert lora_a.grad is not None and float(lora_a.grad.abs().sum()) > 0


def test_after_optimizer_step_masks_adalora_ranks_to_the_budget(tiny_llama):
    cfg = load_config(None, ["method=adalora", "lora.r=4", "adalora.init_r=8", "adalora.tinit=0", "adalora.tfinal=0",
                             "adalora.orth_reg_weight=0"])
    model = prepare_trainable(tiny_llama, cfg, total_steps=3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    for step in (1, 2, 3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        after_optimizer_step(model, step)
        optimizer.zero_grad()
    singular = [m.lora_E["default"] for m in model.modules() if hasattr(m, "lora_E") and "default" in m.lora_E]
    nonzero = sum(int((e != 0).sum()) for e in singular)
    assert len(singular) == 14 and nonzero == 4 * len(singular)  # budget at the last step: an average rank of 4


def test_a_target_name_that_matches_nothing_lists_the_real_ones(tiny_llama, tiny_tokenizer):
    cfg = load_config(None, ["lora.target_modules=[q_proj, qq_proj]"])
    with pytest.raises(UserError) as err:
        prepare_trainable(tiny_llama, cfg)
    message = str(err.value)
    assert "qq_proj" in message and "lora.target_modules" in message
    for name in LLAMA_TARGETS:
        assert name in message
    assert "lm_head" not in message and "embed_tokens" not in message
    # GPT-2's layers are Conv1D, and they are listed too
    with pytest.raises(UserError) as err:
        prepare_trainable(_gpt2(len(tiny_tokenizer)), load_config(None, ["lora.target_modules=q_proj"]))
    assert all(name in str(err.value) for name in ("c_attn", "c_proj", "c_fc"))


def test_target_modules_accepts_a_suffix_path_and_text_forms(tiny_llama):
    assert load_config(None, ["lora.target_modules=q_proj,v_proj"]).lora.target_modules == ["q_proj", "v_proj"]
    assert load_config(None, ["lora.target_modules=All-Linear"]).lora.target_modules == "all-linear"
    assert load_config(None, []).lora.target_modules == "auto"
    with pytest.raises(UserError):
        load_config(None, ["lora.target_modules=[]"])
    assert resolve_target_modules(tiny_llama, ["self_attn.q_proj"]) == ["self_attn.q_proj"]
    with pytest.raises(UserError):
        resolve_target_modules(tiny_llama, ["attn.q_proj"])  # not at a dot boundary of any module's path


def test_auto_picks_the_family_list(tiny_llama, tiny_tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    assert resolve_target_modules(tiny_llama, "auto") == LLAMA_TARGETS
    qwen2 = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64))
    assert resolve_target_modules(qwen2, "auto") == FAMILY_TARGET_MODULES["qwen2"] == LLAMA_TARGETS
    assert resolve_target_modules(_gpt2(64), "auto") == ["c_attn", "c_proj", "c_fc"]
    assert resolve_target_modules(tiny_llama, "all-linear") == "all-linear"

    class NoFamily(torch.nn.Module):  # a model with no config: every linear layer
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    assert resolve_target_modules(NoFamily(), "auto") == "all-linear"
    assert linear_module_names(NoFamily()) == ["down", "up"]


def test_gpt2_conv1d_adapters_read_the_weight_transposed(tiny_tokenizer):
    """With fan_in_fan_out set right, base + adapter equals the merged model; set wrong, merging would not match."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = prepare_trainable(_gpt2(len(tiny_tokenizer)), load_config(None, ["lora.r=4", "lora.dropout=0.0"]))
    # set by us from the layer types, not corrected by PEFT after a warning
    assert model.peft_config["default"].fan_in_fan_out is True
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    wrapped = [m for m in model.modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    assert len(wrapped) == 2 * 4  # per block: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    torch.manual_seed(1)
    for module in wrapped:
        torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(adapted, merged, atol=1e-5)


@needs_four_bit
def test_qlora_loads_linear_layers_as_nf4_double_quantised(tiny_model_dir, tiny_data):
    import bitsandbytes as bnb

    cfg = _config(tiny_model_dir, tiny_data, "method=qlora")
    model = load_model(str(tiny_model_dir), cfg, torch.float32)
    layers = {name: m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in LLAMA_TARGETS}
    assert len(layers) == 14 and all(isinstance(m, bnb.nn.Linear4bit) for m in layers.values())
    weight = layers["model.layers.0.self_attn.q_proj"].weight
    assert weight.dtype == torch.uint8 and weight.numel() == 64 * 64 // 2  # two 4-bit weights a byte
    assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quantisation
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the output layer stays unquantised
    peft_model = prepare_trainable(model, cfg)
    from transformers import AutoModelForCausalLM

    full_size = count_parameters(AutoModelForCausalLM.from_pretrained(tiny_model_dir))[1]
    lora_size = sum(16 * (m.in_features + m.out_features) for m in layers.values())  # A [16, in] + B [out, 16]
    assert count_parameters(peft_model) == (lora_size, full_size + lora_size)  # 4-bit weights count as weights
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and "default" in q_proj.lora_A
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@needs_four_bit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_gradients_are_the_same_after_an_evaluation_pass(tiny_model_dir, tiny_data, dtype):
    """A run evaluates between steps (the base model first, validation, samples). bitsandbytes repacks a 4-bit
    weight for its AVX512-BF16 CPU kernel the first time the layer runs in eval mode, and that kernel has no
    backward: a training model that let it would lose the gradient through the frozen weights afterwards."""
    cfg = _config(tiny_model_dir, tiny_data, "method=qlora", "lora.dropout=0.0")
    model = prepare_trainable(load_model(str(tiny_model_dir), cfg, dtype), cfg)
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # B starts at zero, which would leave A without a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)

    def gradients():
        model.train()
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    assert all(g is not None and g.abs().sum() > 0 for g in before.values())
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = gradients()
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, msg=lambda m, name=name: f"{name}: {m}")


def test_qlora_without_bitsandbytes_falls_back_to_lora_or_stops(tmp_path, tiny_model_dir, tiny_data, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    cfg = _config(tiny_model_dir, tiny_data, "method=qlora", "training.max_steps=3")
    model = load_model(str(tiny_model_dir), cfg, torch.float32)
    notice = capsys.readouterr().out
    assert "not installed" in notice and "plain LoRA" in notice and "qlora.fallback: error" in notice
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    summary = api.train(cfg, tmp_path / "run")  # the whole run goes through as LoRA
    assert summary["train"]["steps"] == 3 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()

    with pytest.raises(UserError) as err:
        load_model(str(tiny_model_dir), _config(tiny_model_dir, tiny_data, "method=qlora", "qlora.fallback=error"), torch.float32)
    assert "pip install" in str(err.value) and "bitsandbytes" in str(err.value) and "method: lora" in str(err.value)


def test_8bit_optimizer_keeps_8bit_state_and_resumes_exactly(tmp_path, tiny_llama):
    bnb = pytest.importorskip("bitsandbytes")

    from tunesmith.train.checkpoint import load_checkpoint, save_checkpoint

    cfg = load_config(None, ["method=full", "training.optimizer=adamw_8bit"])
    model = prepare_trainable(tiny_llama, cfg)
    optimizer = make_optimizer(model, cfg)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    embedding = model.model.embed_tokens.weight  # [vocab, 64]: large enough for 8-bit state
    assert optimizer.state[embedding]["state1"].dtype == torch.uint8
    folder = save_checkpoint(tmp_path, model, optimizer, scheduler, {"step": 1})
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    step()
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}

    with torch.no_grad():  # scramble, restore, take the same step again
        for p in model.parameters():
            p.add_(1.0)
    fresh = make_optimizer(model, cfg)
    load_checkpoint(folder, model, fresh, torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1.0))
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())
    optimizer = fresh
    step()
    assert all(torch.equal(p, expected[n]) for n, p in model.named_parameters())


def test_8bit_optimizer_falls_back_with_one_line(tiny_llama, monkeypatch, log_lines):
    bnb = pytest.importorskip("bitsandbytes")

    model = prepare_trainable(tiny_llama, load_config(None, ["method=full"]))
    lines = log_lines
    paged = make_optimizer(model, load_config(None, ["training.optimizer=paged_adamw_8bit"]))
    assert type(paged) is bnb.optim.AdamW8bit  # on a CPU there is no paging, but 8-bit state still works
    assert len(lines) == 1 and "paged_adamw_8bit runs as adamw_8bit" in lines[0]

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    lines.clear()
    plain = make_optimizer(model, load_config(None, ["training.optimizer=adamw_8bit"]))
    assert type(plain) is torch.optim.AdamW
    assert len(lines) == 1 and "pip install bitsandbytes" in lines[0] and "AdamW" in lines[0]


def _adalora_steps(model, steps, ids):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in steps:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        after_optimizer_step(model, step)
        optimizer.zero_grad()


@pytest.mark.parametrize("resume_after", [2, 3])  # step 3 = total - tfinal fixes the ranks
def test_adalora_resumes_exactly_with_its_method_state(tiny_llama, tiny_llama_config, resume_after):
    from transformers import LlamaForCausalLM

    from tunesmith.models.adapters import load_method_state, method_state

    cfg = load_config(None, ["method=adalora", "lora.r=2", "lora.dropout=0", "adalora.init_r=4", "adalora.tinit=0",
                             "adalora.tfinal=2", "adalora.orth_reg_weight=0", "adalora.beta1=0.5", "adalora.beta2=0.5"])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    whole = prepare_trainable(tiny_llama, cfg, total_steps=5)
    _adalora_steps(whole, range(1, resume_after + 1), ids)
    weights = {n: p.detach().clone() for n, p in whole.named_parameters() if p.requires_grad}
    tensors, values = method_state(whole)
    json.dumps(values)  # goes into state.json
    _adalora_steps(whole, range(resume_after + 1, 6), ids)

    def resumed_run(with_state: bool):
        torch.manual_seed(0)  # the same base weights as the `tiny_llama` fixture
        model = prepare_trainable(LlamaForCausalLM(tiny_llama_config), cfg, total_steps=5)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in weights:
                    param.copy_(weights[name])
        if with_state:
            load_method_state(model, tensors, values)
            restored_tensors, restored_values = method_state(model)
            assert restored_values == values and values["rank_pattern"] and set(restored_tensors) == set(tensors)
            assert bool(tensors) is (resume_after < 3)  # the scores matter until the ranks are fixed
            assert all(torch.equal(restored_tensors[k], tensors[k]) for k in tensors)
        _adalora_steps(model, range(resume_after + 1, 6), ids)  # without state: must not fail
        return model

    resumed = resumed_run(with_state=True)
    for name, param in resumed.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param, dict(whole.named_parameters())[name], atol=1e-6), name
    lora_e = [p for n, p in resumed_run(with_state=False).named_parameters() if ".lora_E." in n]
    assert sum(int((e != 0).sum()) for e in lora_e) == 2 * 14  # still cut to the final budget


def test_lora_leaves_bitsandbytes_unimported_and_qlora_still_works_after_it(tiny_model_dir, tiny_data):
    """peft imports bitsandbytes (~115 MiB on a CPU) for models with no 4/8-bit layer; tunesmith hides it there.
    A fresh interpreter, because this test session imported bitsandbytes long ago."""
    import subprocess

    script = f"""
import sys, torch
from tunesmith.config import load_config
from tunesmith.models.adapters import prepare_trainable
from tunesmith.models.loader import load_model

def cfg(method):
    return load_config(None, ["model.name={tiny_model_dir}", "data.path={tiny_data}", "method=" + method])

lora = prepare_trainable(load_model("{tiny_model_dir}", cfg("lora"), torch.float32), cfg("lora"))
assert any("lora_A" in n for n, _ in lora.named_parameters())
print("after lora:", "bitsandbytes" in sys.modules)
if {FOUR_BIT!r}:
    import bitsandbytes as bnb
    qlora = prepare_trainable(load_model("{tiny_model_dir}", cfg("qlora"), torch.float32), cfg("qlora"))
    q_proj = qlora.base_model.model.model.layers[0].self_attn.q_proj
    print("qlora wraps 4-bit:", isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and "default" in q_proj.lora_A)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "after lora: False" in done.stdout
    if FOUR_BIT:
        assert "qlora wraps 4-bit: True" in done.stdout
