"""Gradient checkpointing and autocast: what they change (memory, matmul precision) and what they must not
(the gradients, the loss going down)."""

from __future__ import annotations

import pytest
import torch
from test_train import tiny_data, tiny_model_dir  # noqa: F401

from tunesmith import api
from tunesmith.config import load_config
from tunesmith.models.adapters import prepare_trainable
from tunesmith.train import compute
from tunesmith.train.loss import token_nll_sum


def _lora_grads(model, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of the LoRA factors for one fixed batch, and how often layer 0's attention ran forward."""
    cfg = load_config(None, ["lora.r=4", "lora.dropout=0.0"])
    if checkpointing:
        compute.enable_gradient_checkpointing(model)
    model = prepare_trainable(model, cfg)
    with torch.no_grad():  # B starts at zero; give it values so A gets gradients too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
    calls = []
    # (torch's recomputation stops once it has every saved tensor back, so the layer's last module may not rerun)
    attention = model.get_base_model().model.layers[0].self_attn
    hook = attention.register_forward_hook(lambda *args: calls.append(1))
    model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]])
    nll, _ = token_nll_sum(model, ids, torch.ones_like(ids), ids)
    nll.backward()
    hook.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny_llama_config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    plain, plain_calls = _lora_grads(LlamaForCausalLM(tiny_llama_config), checkpointing=False)
    torch.manual_seed(0)
    checkpointed, checkpointed_calls = _lora_grads(LlamaForCausalLM(tiny_llama_config), checkpointing=True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the backward pass ran the layer again
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 7 * 2
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name
    assert any(float(g.abs().sum()) > 0 for g in plain.values())


def test_activation_estimate_follows_the_formula_and_auto_decides_on_it(tiny_llama, monkeypatch):
    config = tiny_llama.config  # h=64, 2 layers, 4 heads
    s, b = 128, 2
    expected_16bit = s * b * 64 * (34 + 5 * 4 * s / 64) * 2
    assert compute.activation_bytes(config, b, s, torch.bfloat16) == int(expected_16bit)
    assert compute.activation_bytes(config, b, s, torch.float32) == int(2 * expected_16bit)
    # doubling the sequence more than doubles it (the attention term is quadratic)
    assert compute.activation_bytes(config, b, 2 * s, torch.float32) > 2 * compute.activation_bytes(config, b, s, torch.float32)

    cfg = load_config(None, ["training.batch_size=2", "data.max_length=128"])
    need = compute.activation_bytes(config, 2, 128, torch.float32)
    monkeypatch.setattr(compute, "_memory_left", lambda device: 100 * need)
    on, why = compute.want_gradient_checkpointing(cfg, tiny_llama, "cpu", torch.float32)
    assert not on and "auto" in why
    monkeypatch.setattr(compute, "_memory_left", lambda device: need)  # would take all of it
    on, why = compute.want_gradient_checkpointing(cfg, tiny_llama, "cpu", torch.float32)
    assert on and "more than half" in why
    qlora = load_config(None, ["method=qlora"])
    assert compute.want_gradient_checkpointing(qlora, tiny_llama, "cpu", torch.float32)[0] is True
    forced = load_config(None, ["training.gradient_checkpointing=false"])
    assert compute.want_gradient_checkpointing(forced, tiny_llama, "cpu", torch.float32)[0] is False
    forced = load_config(None, ["training.gradient_checkpointing=true"])
    monkeypatch.setattr(compute, "_memory_left", lambda device: 100 * need)
    assert compute.want_gradient_checkpointing(forced, tiny_llama, "cpu", torch.float32)[0] is True


@pytest.mark.parametrize(
    "setting, device, dtype, fast, expected",
    [
        ("auto", "cpu", torch.float32, torch.float32, None),  # plain CPU: bf16 is emulated, stay in fp32
        ("auto", "xpu", torch.float32, torch.bfloat16, torch.bfloat16),  # fp32 weights on a bf16 device
        ("auto", "cuda", torch.bfloat16, torch.bfloat16, torch.bfloat16),
        ("auto", "cuda", torch.float16, torch.float16, torch.float16),
        (True, "cpu", torch.float32, torch.float32, torch.bfloat16),  # asked for: do it
        (False, "cuda", torch.bfloat16, torch.bfloat16, None),
    ],
)
def test_autocast_choice(monkeypatch, setting, device, dtype, fast, expected):
    monkeypatch.setattr(compute, "explain_dtype", lambda device: (fast, ""))
    assert compute.autocast_dtype(setting, device, dtype) is expected


def test_autocast_runs_the_layers_in_bf16_with_fp32_weights(tiny_llama):
    model = prepare_trainable(tiny_llama, load_config(None, ["lora.r=4"]))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    seen = []
    q_proj.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for enabled, expected in ((True, torch.bfloat16), (False, torch.float32)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            nll, _ = token_nll_sum(model, ids, torch.ones_like(ids), ids)
        assert seen[-1] is expected and nll.dtype is torch.float32  # the loss itself is summed in fp32
        assert q_proj.weight.dtype is torch.float32


def test_a_run_with_checkpointing_and_autocast_still_learns(tmp_path, tiny_model_dir, tiny_data):
    cfg = load_config(None, [
        f"model.name={tiny_model_dir}", f"data.path={tiny_data}", "data.validation_split=0",
        "training.max_steps=12", "training.epochs=100", "training.batch_size=8", "training.learning_rate=5e-3",
        "training.lr_scheduler=constant", "lora.dropout=0.0", "eval.enabled=false",
        "training.gradient_checkpointing=true", "training.autocast=true",
    ])
    summary = api.train(cfg, tmp_path / "run")
    assert summary["hardware"]["autocast"] == "bfloat16" and summary["hardware"]["gradient_checkpointing"] is True
    assert summary["train"]["final_loss"] <= 0.9 * summary["train"]["first_loss"]
