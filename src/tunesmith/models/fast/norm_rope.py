"""A faster training path for Llama-style RMSNorms and rotary embeddings: fewer [tokens x hidden] temporaries.

`fast_norm_rope(model)` swaps, for the duration of training, the RMSNorm modules of the Llama, Mistral,
Qwen2 and Qwen3 families for `FastRMSNorm` (weight * x / sqrt(mean(x^2) + eps) as one autograd function,
`RMSNormFunction`), and points their modeling module's `apply_rotary_pos_emb` at one that runs q and k
through `RotaryFunction` (x * cos + rotate_half(x) * sin, one allocation each way).  Both apply only when
training (gradients on) in fp32 without autocast; anything else runs transformers' own code.  Parameter names and values
are untouched, and leaving the context puts transformers' classes and function back.  Measured in
bench/RESULTS.md, "Levers one by one": less peak memory, speed within noise.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

from tunesmith.models.fast.lora import family_class


class RMSNormFunction(torch.autograd.Function):
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension, keeping x and the [.., 1] inverse root.

    Autograd through transformers' RMSNorm allocates three [tokens x hidden] tensors in forward (x^2,
    the normalised x, the output) and about six in backward; each is a 1-2 MiB block on the workload of
    bench/RESULTS.md, "Training throughput and memory vs Hugging Face Trainer + PEFT", the size class whose
    holes kept the C heap large (its "Where the memory goes").  Here forward allocates only the output (the
    mean square comes from `linalg.vector_norm`, with no x^2 tensor) and backward two.  Backward, with
    n = x * r (r the inverse root) and g = dy * weight: dx = r * (g - n * mean(g * n)), d weight = sum over
    tokens of dy * n (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019, give the same derivative).
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        hidden = x.shape[-1]
        inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(hidden).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, inv)
        return (x * inv).mul_(weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight, inv = ctx.saved_tensors
        n = x * inv  # the normalised x, recomputed
        grad_weight = (dy * n).sum(dim=tuple(range(dy.dim() - 1))) if ctx.needs_input_grad[1] else None
        g = dy * weight
        mean_gn = torch.linalg.vecdot(g, n, dim=-1).unsqueeze(-1).div_(x.shape[-1])
        dx = g.sub_(n.mul_(mean_gn)).mul_(inv) if ctx.needs_input_grad[0] else None
        return dx, grad_weight, None


@functools.cache
def _make_fast_norm_class(base: type) -> type:
    class FastRMSNorm(base):
        """transformers' Llama-style RMSNorm through `RMSNormFunction` when training in fp32 without autocast;
        anything else (eval, no grad, autocast, another dtype) runs `base.forward`."""

        def forward(self, hidden_states):
            if (self.training and torch.is_grad_enabled() and hidden_states.dtype == torch.float32
                    and self.weight.dtype == torch.float32 and not torch.is_autocast_enabled(hidden_states.device.type)):
                return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
            return super().forward(hidden_states)

    return FastRMSNorm


def _llama_rmsnorm(module: torch.nn.Module) -> bool:
    """True for the RMSNorm of the SWIGLU_FAMILIES (checked in transformers 5.x: weight * x * rsqrt(mean(x^2) + eps),
    computed in fp32; Gemma's (1 + weight) variant is another family)."""
    return (family_class(type(module), "RMSNorm")
            and hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), torch.nn.Parameter))


class RotaryFunction(torch.autograd.Function):
    """Rotary position embedding of one of q or k, x * cos + rotate_half(x) * sin, in one allocation.

    transformers writes it as four [tokens x heads x head_dim] temporaries (the negated half, the
    concatenation, the two products) and the sum, and its backward as as many again.  With a and b the
    first and second halves of the last dimension: out_a = x_a cos_a - x_b sin_a and
    out_b = x_b cos_b + x_a sin_b; so dx_a = dy_a cos_a + dy_b sin_b and dx_b = dy_b cos_b - dy_a sin_a
    (Su et al., "RoFormer", 2021, section 3.4.2, in the half-split layout Llama uses).
    """

    @staticmethod
    def forward(ctx, x, cos, sin):  # x [B, H, T, D]; cos/sin broadcastable to it
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1.0)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        half = dy.shape[-1] // 2
        dx = dy * cos
        dx[..., :half].addcmul_(dy[..., half:], sin[..., half:])
        dx[..., half:].addcmul_(dy[..., :half], sin[..., :half], value=-1.0)
        return dx, None, None


def _fast_rotary(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if (torch.is_grad_enabled() and q.dtype == k.dtype == cos.dtype == sin.dtype == torch.float32
                and q.shape[-1] % 2 == 0 and not torch.is_autocast_enabled(q.device.type)):
            cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
            return RotaryFunction.apply(q, cos, sin), RotaryFunction.apply(k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb._tunesmith_original = original
    return apply_rotary_pos_emb


@contextlib.contextmanager
def fast_norm_rope(model: torch.nn.Module):
    """Inside: the model's Llama-style RMSNorms train through `RMSNormFunction`, and its family's rotary
    embedding through `RotaryFunction` (the modeling module's `apply_rotary_pos_emb`, which the attention
    looks up at each call); outside: as they were."""
    swapped, patched = [], []
    for module in model.modules():
        if _llama_rmsnorm(module):
            swapped.append((module, type(module)))
            module.__class__ = _make_fast_norm_class(type(module))
    families = {kind.__module__ for _, kind in swapped}
    for name in families:
        modeling = sys.modules.get(name)
        original = getattr(modeling, "apply_rotary_pos_emb", None)
        if original is not None and not hasattr(original, "_tunesmith_original"):
            modeling.apply_rotary_pos_emb = _fast_rotary(original)
            patched.append((modeling, original))
    try:
        yield len(swapped)
    finally:
        for modeling, original in patched:
            modeling.apply_rotary_pos_emb = original
        for module, kind in swapped:
            module.__class__ = kind
