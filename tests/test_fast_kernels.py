"""The runtime patches of models/fast/: LoRA layers (lora.py) and RMSNorm/rotary embeddings (norm_rope.py).

What must hold: each fused function is the stock computation with the same draws (outputs and gradients,
fp64 where the formula is written out); the patches swap classes only inside their context and put PEFT's
and transformers' modules back on leaving; LoRA dropout drawn row by row makes packed and padded training
drop the same elements; and `training.fast_kernels: off` trains on the stock modules with the same
per-step losses as `auto` to float rounding.
"""

from __future__ import annotations

import contextlib
import json
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_packing import VOCAB, _saved_bytes, make_rows, tiny_model

import tunesmith.models.fast.lora as lora_module
import tunesmith.models.fast.norm_rope as norm_rope_module
from tunesmith.config import load_config
from tunesmith.data.batching import collate
from tunesmith.models.fast import dropout_rows, fast_kernels, fast_lora, fast_norm_rope, new_mask_seed
from tunesmith.models.fast.lora import DropoutLinear, DropoutThenLinear, _keep_mask, _shared, keep_scale
from tunesmith.models.fast.norm_rope import RMSNormFunction, RotaryFunction
from tunesmith.train.loss import packed_nll_sum, token_nll_sum


def test_dropout_then_linear_is_dropout_and_linear_with_the_same_draws():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 10, requires_grad=True)
    w = torch.randn(4, 10, requires_grad=True)
    p = 0.3
    _shared.clear()
    torch.manual_seed(7)
    out = DropoutThenLinear.apply(x, w, p)
    again = DropoutThenLinear.apply(x, w, p)  # the same input again (k after q): the same mask
    (out.pow(2).sum() + again.sum()).backward()
    got = out.detach(), x.grad.clone(), w.grad.clone()
    x.grad, w.grad = None, None
    torch.manual_seed(7)
    keep = _keep_mask(x, p)  # the draw the fused function makes
    assert keep.dtype == torch.bool
    reference = F.linear(x * keep * keep_scale(p, "cpu"), w)
    (reference.pow(2).sum() + reference.sum()).backward()
    assert 0 < int(keep.sum()) < keep.numel()
    assert torch.equal(again.detach(), out.detach())
    assert torch.allclose(got[0], reference, atol=1e-6)
    assert torch.allclose(got[1], x.grad, atol=1e-5) and torch.allclose(got[2], w.grad, atol=1e-5)
    _shared.clear()


def test_keep_mask_drops_p_of_the_elements_and_follows_the_torch_seed():
    x = torch.empty(1000, 1000)
    torch.manual_seed(3)
    a = _keep_mask(x, 0.05)
    torch.manual_seed(3)
    b = _keep_mask(x, 0.05)
    assert torch.equal(a, b)
    assert abs(1 - float(a.float().mean()) - 0.05) < 0.002  # 10^6 draws: 5 standard deviations is 0.0011
    assert keep_scale(0.05, "cpu") == pytest.approx(1 / 0.95, rel=1e-5)


def _lora_model(**lora):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_model("llama"), LoraConfig(**{"r": 4, "lora_alpha": 8, **lora}))


def test_fast_lora_gives_peft_outputs_and_gradients_and_puts_everything_back():
    model = _lora_model(lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # B starts at zero: give the adapters something to add
    keys = list(model.state_dict())
    x = torch.randint(3, VOCAB, (2, 6))
    model.eval()
    before = model(input_ids=x).logits
    before.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with fast_lora(model) as swapped:
        assert swapped == 3 * 2  # three targets in each of two layers
        assert list(model.state_dict()) == keys  # same names: checkpoints and merging see plain PEFT
        assert any(isinstance(m, DropoutLinear) for m in model.modules())
        fast = model(input_ids=x).logits  # eval mode: no dropout, the addmm path
        fast.sum().backward()
        assert torch.allclose(fast, before, atol=1e-5)
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert torch.allclose(param.grad, grads[name], atol=1e-5), name
        model.train()
        assert not torch.equal(model(input_ids=x).logits, before)  # dropout is live in training
    assert not any(isinstance(m, DropoutLinear) for m in model.modules())
    assert all(type(m).__name__ == "Linear" and type(m).__module__.startswith("peft") for m in model.modules()
               if hasattr(m, "lora_dropout"))
    assert all(isinstance(m.lora_dropout["default"], torch.nn.Dropout) for m in model.modules() if hasattr(m, "lora_dropout"))

    dora = _lora_model(lora_dropout=0.1, use_dora=True, target_modules=["q_proj"])
    with fast_lora(dora) as swapped:
        assert swapped == 0  # DoRA uses the dropped input itself: left as PEFT has it


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_swiglu_mlp_gives_the_same_outputs_and_gradients_and_keeps_less(family, monkeypatch):
    from peft import LoraConfig, get_peft_model

    def run(model, x, fused: bool):
        monkeypatch.setattr(lora_module, "_swiglu_mlp", real if fused else (lambda module: False))
        model.zero_grad()
        with fast_lora(model):
            kinds = {type(m.mlp).__name__ for m in model.get_base_model().model.layers}
            torch.manual_seed(11)  # the same dropout draws for both paths
            out, kept = _saved_bytes(lambda: model(input_ids=x).logits)
            out.pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return kinds, out.detach(), grads, kept

    real = lora_module._swiglu_mlp
    x = torch.randint(3, VOCAB, (2, 7))
    for dropout in (0.0, 0.3):
        model = get_peft_model(tiny_model(family), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                               target_modules="all-linear"))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        model.train()
        kinds, fused_out, fused_grads, fused_kept = run(model, x, True)
        assert kinds == {"FastLoraSwiGLU"}
        plain_kinds, plain_out, plain_grads, plain_kept = run(model, x, False)
        assert "FastLoraSwiGLU" not in plain_kinds
        assert torch.allclose(fused_out, plain_out, atol=1e-6)
        for name, grad in plain_grads.items():
            assert torch.allclose(fused_grads[name], grad, atol=1e-6), name
        assert fused_kept < plain_kept  # silu(gate) and the product are recomputed, not kept
        if dropout == 0.0:  # and against PEFT's own forward, which draws nothing
            monkeypatch.setattr(lora_module, "_swiglu_mlp", real)
            model.zero_grad()
            reference = model(input_ids=x).logits
            reference.pow(2).mean().backward()
            assert torch.allclose(fused_out, reference, atol=1e-5)
            for name, param in model.named_parameters():
                if param.requires_grad:
                    assert torch.allclose(fused_grads[name], param.grad, atol=1e-5), name
        assert all(type(m.mlp).__name__.endswith("MLP") and "Fast" not in type(m.mlp).__name__
                   for m in model.get_base_model().model.layers)  # put back on leaving


@pytest.mark.parametrize("weight_trains", [False, True])
def test_rmsnorm_function_matches_the_formula_in_fp64(weight_trains):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, dtype=torch.float64, requires_grad=weight_trains)
    dy = torch.randn(3, 5, 16, dtype=torch.float64)

    def reference(x, weight):  # written out, in fp64 (transformers' module computes in fp32)
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def run(fn):
        x.grad = weight.grad = None
        out = fn(x, weight)
        out.backward(dy)
        return out.detach(), x.grad.clone(), weight.grad.clone() if weight_trains else None

    ours = run(lambda x, weight: RMSNormFunction.apply(x, weight, 1e-6))
    expected = run(reference)
    for a, b in zip(ours, expected):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_rotary_function_matches_transformers_in_fp64():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    q = torch.randn(1, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(1, 6, 8, dtype=torch.float64), torch.randn(1, 6, 8, dtype=torch.float64)  # halves differ
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def run(fn):
        q.grad = k.grad = None
        qe, ke = fn()
        torch.autograd.backward((qe, ke), (dq, dk))
        return qe.detach(), ke.detach(), q.grad.clone(), k.grad.clone()

    ours = run(lambda: (RotaryFunction.apply(q, cos[:, None], sin[:, None]), RotaryFunction.apply(k, cos[:, None], sin[:, None])))
    theirs = run(lambda: apply_rotary_pos_emb(q, k, cos, sin))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # qwen3 also normalises q and k per head
def test_fast_norm_rope_trains_like_transformers_and_is_put_back(family, monkeypatch):
    model = tiny_model(family)
    x = torch.randint(3, VOCAB, (2, 7))

    def grads(fast: bool):
        model.zero_grad()
        with fast_norm_rope(model) if fast else contextlib.nullcontext() as swapped:
            kinds = {type(m).__name__ for m in model.modules() if "RMSNorm" in type(m).__name__}
            out = model(input_ids=x).logits
            out.pow(2).mean().backward()
        return swapped, kinds, out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    modeling = sys.modules[type(model).__module__]
    original_rotary = modeling.apply_rotary_pos_emb
    calls = []
    real_apply = norm_rope_module.RotaryFunction.apply
    monkeypatch.setattr(norm_rope_module.RotaryFunction, "apply", lambda *a: calls.append(1) or real_apply(*a))
    swapped, kinds, fast_out, fast_grads = grads(True)
    monkeypatch.undo()
    assert kinds == {"FastRMSNorm"} and swapped == sum(1 for m in model.modules() if "RMSNorm" in type(m).__name__)
    assert len(calls) == 2 * model.config.num_hidden_layers  # q and k of every layer through RotaryFunction
    assert modeling.apply_rotary_pos_emb is original_rotary  # put back on leaving
    _, plain_kinds, plain_out, plain_grads = grads(False)
    assert "FastRMSNorm" not in plain_kinds  # put back on leaving
    assert torch.allclose(fast_out, plain_out, atol=1e-5)
    for name, grad in plain_grads.items():  # full fine-tuning: the norm weights' gradients too
        assert torch.allclose(fast_grads[name], grad, atol=1e-5), name


@pytest.mark.parametrize("checkpointing", [False, True])
def test_dropout_rows_makes_packed_and_padded_training_drop_the_same_elements(checkpointing):
    """With LoRA dropout live, the micro-batch trained padded and trained packed (split over passes, rows
    reordered) gives the same loss and gradients inside `dropout_rows`; without it the draws differ."""
    from tunesmith.train.compute import enable_gradient_checkpointing
    from tunesmith.train.loop import _micro_units
    from tunesmith.train.packing import packed_attention

    model = _lora_model(lora_dropout=0.3, target_modules="all-linear")
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    if checkpointing:
        enable_gradient_checkpointing(model)
    objective = SimpleNamespace(task="causal_lm", collate=lambda rows, key: collate(rows, pad_token_id=0))
    rows = make_rows([7, 13, 4, 10])

    def run(pass_tokens, rows_on: bool):
        torch.manual_seed(5)
        step_seed = new_mask_seed()
        units = _micro_units(objective, rows, pass_tokens, key=(0, 0, 0, 1))
        total = 0.0
        with fast_lora(model), fast_norm_rope(model), packed_attention(model):
            for unit, layout in units:
                with dropout_rows(step_seed, layout) if rows_on else contextlib.nullcontext():
                    if isinstance(unit, dict):
                        nll, _ = token_nll_sum(model, unit["input_ids"], unit["attention_mask"], unit["labels"])
                    else:
                        nll, _ = packed_nll_sum(model, unit)
                    nll.backward()
                total += float(nll.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return len(units), total, grads

    n_padded, padded, padded_grads = run(None, True)
    n_packed, packed, packed_grads = run(16, True)  # 34 tokens in 16-token passes: three passes, rows reordered
    assert (n_padded, n_packed) == (1, 3)
    assert packed == pytest.approx(padded, rel=1e-5)
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5, rtol=1e-4), name
    _, loose, _ = run(16, False)  # whole-tensor masks: the packed layout draws other elements
    assert loose != pytest.approx(padded, rel=1e-4)


def _module_classes(model) -> dict:
    return {name: type(module) for name, module in model.named_modules()}


def test_fast_kernels_off_leaves_the_model_alone_and_auto_swaps_and_puts_back():
    model = _lora_model(lora_dropout=0.1, target_modules="all-linear")
    modeling = sys.modules[type(model.get_base_model()).__module__]  # transformers' modeling_llama
    before, rotary, keys = _module_classes(model), modeling.apply_rotary_pos_emb, list(model.state_dict())

    with fast_kernels(model, "off"):
        assert _module_classes(model) == before
        assert modeling.apply_rotary_pos_emb is rotary

    with fast_kernels(model, "auto"):
        inside = _module_classes(model)
        swapped = {inside[name].__name__ for name in before if inside[name] is not before[name]}
        # PEFT's LoRA Linear, its lora_A and lora_dropout, the Llama MLP and RMSNorm; the rotary function
        assert swapped == {"FastLoraLinear", "DropoutLinear", "Identity", "FastLoraSwiGLU", "FastRMSNorm"}
        assert modeling.apply_rotary_pos_emb is not rotary
        assert list(model.state_dict()) == keys  # same parameter names: checkpoints see plain PEFT
    assert _module_classes(model) == before
    assert modeling.apply_rotary_pos_emb is rotary

    with pytest.raises(ValueError, match="'on'"), fast_kernels(model, "on"):
        pass


def test_fast_kernels_off_trains_on_the_stock_modules_with_the_same_losses(tmp_path, monkeypatch):
    """The same tiny run with `training.fast_kernels` auto and off (LoRA dropout 0: PEFT's own dropout draws
    other masks): the patched paths run only with auto, and the per-step losses agree to float rounding."""
    from conftest import save_tiny_model_folder
    from test_train import ROWS

    from tunesmith.train.loop import run_training

    model_dir, data = save_tiny_model_folder(tmp_path, ROWS)
    real_plain_adapter, real_norm = lora_module._plain_adapter, norm_rope_module.RMSNormFunction.apply

    def run(mode: str):
        calls = {"lora": 0, "norm": 0}  # forwards through the fast LoRA layers and the fused RMSNorm

        def plain_adapter(layer):
            calls["lora"] += 1
            return real_plain_adapter(layer)

        def norm(*args):
            calls["norm"] += 1
            return real_norm(*args)

        monkeypatch.setattr(lora_module, "_plain_adapter", plain_adapter)
        monkeypatch.setattr(norm_rope_module.RMSNormFunction, "apply", norm)
        cfg = load_config(None, [f"model.name={model_dir}", f"data.path={data}", "data.validation_split=0.25",
                                 "training.max_steps=5", "training.epochs=100", "training.learning_rate=5e-3",
                                 "lora.dropout=0", "eval.enabled=false", f"training.fast_kernels={mode}"])
        assert cfg.training.fast_kernels == mode
        run_training(cfg, tmp_path / mode)
        monkeypatch.undo()
        records = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r["type"] == "train"], calls

    fast, fast_calls = run("auto")
    stock, stock_calls = run("off")
    assert fast_calls["lora"] > 0 and fast_calls["norm"] > 0, fast_calls
    assert stock_calls == {"lora": 0, "norm": 0}, (
        f"training.fast_kernels=off still ran the patched modules {stock_calls}: train/loop.py must enter "
        "fast_kernels(model, cfg.training.fast_kernels)")
    assert len(fast) == len(stock) == 5
    assert fast == pytest.approx(stock, rel=1e-5)
    assert fast[-1] < fast[0]  # the run learned something, so the steps after the first compare trained weights
