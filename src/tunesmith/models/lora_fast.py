"""A faster training path for plain LoRA layers: less copying, less memory, cheaper dropout.

PEFT computes a LoRA layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`.  Measured on the
issue-8 workload (bench/RESULTS.md, "Training throughput and memory"), that costs, besides the matmuls:
- a dropped copy of every projection input, kept for `lora_A`'s weight gradient (5 x 576 + 1536
  floats per token per layer on SmolLM2, about a third of what the backward pass keeps);
- a fresh mask per projection from torch's CPU random generator, about 9% of a training step;
- three [tokens x out_features] temporaries for `lora_B(...)`, `* scaling` and `+`.

`fast_lora(model)` swaps, for the duration of training, each vanilla LoRA `Linear` for `FastLoraLinear`
and its `A` for `DropoutLinear`:
- dropout and `A` run as one autograd function that keeps only `x` (which its neighbours keep anyway)
  and the mask's random seed, and rebuilds the mask and the dropped input in backward (a few percent
  more random numbers for no mask memory at all); the mask is applied as floats 0 and 1/(1-p), one
  multiply;
- projections fed the same tensor (q/k/v, gate/up) share one keep-mask, as they do in PEFT for
  models whose q/k/v are one fused layer (Phi-3, GPT-2);
- on a CPU the mask comes from 16 random bits per element drawn with numpy's PCG64, 64 raw bits at a time (seeded from
  torch's generator, so `torch.manual_seed` and resumed RNG states still fix it): the drop
  probability is p rounded to a multiple of 1/65536 (0.05 -> 0.0500031);
- `base(x) + B(h) * scaling` is one `addmm`.
Parameter names and values are untouched, so checkpoints, merging and resuming see an ordinary PEFT
model, and leaving the context puts PEFT's classes back.  DoRA, AdaLoRA, several active adapters,
merged or disabled adapters take PEFT's own forward.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

MASK_LEVELS = 65536  # 16 random bits per element


def _keep_mask(x: torch.Tensor, p: float, seed: int | None = None) -> torch.Tensor:
    """A bool tensor like `x`, True with probability 1 - p (p rounded to 1/65536 on a CPU).

    `seed` (default: one draw from torch's generator) fixes the whole mask, so backward can rebuild it.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    if x.device.type != "cpu":
        generator = torch.Generator(device=x.device).manual_seed(seed)
        return torch.rand(x.shape, device=x.device, generator=generator) >= p
    raw = np.random.PCG64(seed).random_raw((x.numel() + 3) // 4)  # 64 random bits each, 4 elements' worth
    levels = torch.from_numpy(raw).view(torch.int16)[: x.numel()].view(x.shape)  # uniform on [-32768, 32767]
    return levels >= -32768 + round(p * MASK_LEVELS)


def keep_scale(p: float, device_type: str) -> float:
    """1 / P(keep), for the probability `_keep_mask` really uses."""
    dropped = round(p * MASK_LEVELS) / MASK_LEVELS if device_type == "cpu" else p
    return 1.0 / (1.0 - dropped)


_shared: dict = {}  # the last mask (forward) and the last rebuilt mask and dropped input (backward)


def forget_shared_mask() -> None:
    """Drop the cached masks (after each forward and each backward pass: a block kept across passes
    fragments the heap)."""
    _shared.clear()


def _scaled_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The keep-mask of `seed` as floats 0 and 1/P(keep): multiplying by it is one vectorised pass
    (0.04 ms for 512 x 576 here), where `torch.where` on a bool mask takes 0.15 ms."""
    return _keep_mask(x, p, seed).to(x.dtype).mul_(keep_scale(p, x.device.type))


def _forward_mask(x: torch.Tensor, p: float) -> tuple[int, torch.Tensor]:
    """(seed, scaled mask) for `x`; consecutive calls on the same tensor (q, k, v) share them."""
    if _shared.get("x") is x and _shared.get("p") == p and _shared.get("version") == x._version:
        return _shared["seed"], _shared["mask"]
    seed = int(torch.randint(0, 2**62, ()))  # torch's generator: manual_seed and resumed RNG states fix it
    mask = _scaled_mask(x, p, seed)
    _shared.update(x=x, p=p, version=x._version, seed=seed, mask=mask)
    return seed, mask


def _backward_mask_and_dropped(x: torch.Tensor, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask rebuilt from its seed and the dropped input, once for all the projections that shared them.

    Saved tensors come back as new Python objects, so the match is on the seed and x's storage; the
    cache holds `x` itself, so its address cannot be reused by another tensor while it is cached.
    """
    key = (seed, x.data_ptr(), tuple(x.shape))
    cached = _shared.get("backward")
    if cached is not None and cached[0] == key:
        return cached[2], cached[3]
    mask = _scaled_mask(x, p, seed)
    dropped = x * mask
    _shared["backward"] = (key, x, mask, dropped)
    return mask, dropped


class DropoutThenLinear(torch.autograd.Function):
    """(x * keep / P(keep)) @ weight.T, keeping only x and the mask's seed: backward rebuilds the mask."""

    @staticmethod
    def forward(ctx, x, weight, p: float):
        seed, mask = _forward_mask(x, p)  # mask [.., in]: 0 where dropped, 1/P(keep) where kept
        out = torch.nn.functional.linear(x * mask, weight)  # [.., r]; the dropped copy dies here
        ctx.save_for_backward(x, weight)
        ctx.seed, ctx.p = seed, p
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out [.., r]
        x, weight = ctx.saved_tensors
        mask, dropped = _backward_mask_and_dropped(x, ctx.p, ctx.seed)
        grad_x = grad_weight = None
        g = grad_out
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.to(g.dtype)).mul_(mask).to(x.dtype)
        if ctx.needs_input_grad[1]:
            flat = dropped.to(g.dtype).reshape(-1, x.shape[-1])  # [N, in]
            grad_weight = (g.reshape(-1, g.shape[-1]).t() @ flat).to(weight.dtype)  # [r, in]
        return grad_x, grad_weight, None


class DropoutLinear(torch.nn.Linear):
    """A LoRA `A` projection that applies its layer's dropout itself (see the module docstring)."""

    dropout_p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_p > 0 and torch.is_grad_enabled():
            return DropoutThenLinear.apply(x, self.weight, self.dropout_p)
        return super().forward(x)


def _peft_linear_class():
    from peft.tuners.lora.layer import Linear

    return Linear


@functools.cache
def _make_fast_class(base: type) -> type:
    class FastLoraLinear(base):
        """PEFT's LoRA Linear with `base(x) + B(A(drop(x))) * scaling` as one addmm when it is plain LoRA."""

        def forward(self, x, *args, **kwargs):
            active = self.active_adapters
            name = active[0] if len(active) == 1 else None
            if (args or kwargs or name is None or self.disable_adapters or self.merged or name not in self.lora_A
                    or name in self.lora_variant or self.lora_B[name].bias is not None
                    or x.dtype != self.lora_A[name].weight.dtype):
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x)  # [.., out]
            h = self.lora_A[name](self.lora_dropout[name](x))  # [.., r]
            if result.dtype != h.dtype and not torch.is_autocast_enabled(x.device.type):
                return result + (self.lora_B[name](h) * self.scaling[name]).to(result.dtype)
            out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                              self.lora_B[name].weight.t(), alpha=self.scaling[name])
            return out.view(result.shape)

    return FastLoraLinear


# PEFT LoRA layers whose forward applies `lora_A(dropout(x))` (checked in peft 0.21: layer.py, bnb.py)
DROPOUT_FIRST_LAYERS = ("Linear", "Linear8bitLt", "Linear4bit")


@contextlib.contextmanager
def fast_lora(model: torch.nn.Module):
    """Inside: plain LoRA layers run the fast path above; outside: PEFT's modules exactly as they were."""
    try:
        peft_linear = _peft_linear_class()
    except ImportError:
        yield 0
        return
    swapped_layers, swapped_a = [], []
    for module in model.modules():
        kind = type(module)
        if not (kind.__module__.startswith("peft.tuners.lora.") and kind.__name__ in DROPOUT_FIRST_LAYERS):
            continue  # only layers whose forward is lora_B(lora_A(dropout(x))) take the A swap below
        if kind is peft_linear:
            module.__class__ = _make_fast_class(peft_linear)
            swapped_layers.append(module)
        variants = getattr(module, "lora_variant", {}) or {}
        for name, a in module.lora_A.items():
            drop = module.lora_dropout[name] if name in module.lora_dropout else None
            if (type(a) is torch.nn.Linear and a.bias is None and isinstance(drop, torch.nn.Dropout)
                    and drop.p > 0 and name not in variants):
                a.__class__ = DropoutLinear  # same parameters and state-dict names, another forward
                a.dropout_p = drop.p
                module.lora_dropout[name] = torch.nn.Identity()
                swapped_a.append((module, name, a, drop))
    try:
        yield len(swapped_a)
    finally:
        _shared.clear()
        for module, name, a, drop in swapped_a:
            a.__class__ = torch.nn.Linear
            del a.dropout_p
            module.lora_dropout[name] = drop
        for module in swapped_layers:
            module.__class__ = peft_linear
