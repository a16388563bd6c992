"""A faster training path for plain LoRA layers: less copying, less memory, cheaper dropout.

PEFT computes a LoRA layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`.  Measured on the
workload of bench/RESULTS.md, "Training throughput and memory vs Hugging Face Trainer + PEFT", that
costs, besides the matmuls:
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
- on a CPU the mask comes from 16 random bits per element drawn with numpy's SFC64, 64 raw bits at a time (seeded from
  torch's generator, so `torch.manual_seed` and resumed RNG states still fix it): the drop
  probability is p rounded to a multiple of 1/65536 (0.05 -> 0.0500031);
- inside `dropout_rows` (the training loop's passes) each row's mask is drawn on its own, from the step's seed,
  the dropout site and the row's key: a row drops the same elements whether it runs padded in a batch or packed
  end to end with others, so packed and padded training take the same steps up to float rounding;
- `base(x) + B(h) * scaling` is one `addmm_`, in place into the frozen projection's output;
- a Llama/Mistral/Qwen MLP whose three projections are all plain LoRA runs as one function
  (`LoraSwiGLU`) that keeps x, gate(x) and up(x) and recomputes silu and the product in backward.
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


def new_mask_seed() -> int:
    return int(torch.randint(0, 2**62, ()))  # torch's generator: manual_seed and resumed RNG states fix it


# What fixes a mask: an int seed for the whole tensor, or (step seed, dropout site, row layout) for a mask
# drawn row by row (see `dropout_rows`).
MaskSeed = int | tuple

_rows: list = []  # [(step seed, layout)] of the running pass, innermost last (see `dropout_rows`)


@contextlib.contextmanager
def dropout_rows(step_seed: int, layout: tuple | None):
    """Inside: LoRA dropout masks are drawn row by row, each row's from (`step_seed`, the dropout site, the
    row's key) alone, so a row drops the same elements wherever it sits: packed end to end with other rows,
    or padded in a batch.  `layout` is (positions, ((key, start, length), ...)): the model's hidden tensors
    hold `positions` token positions ([1, T] packed, [B, L] padded, flattened), and the row with `key` (a
    tuple of non-negative ints) takes `length` of them from `start`.  Positions outside every row (padding)
    are dropped.  A tensor laid out otherwise, and a `layout` of None, get a whole-tensor mask as outside.
    Wrap the backward pass too: gradient checkpointing's recomputation draws its masks again there."""
    _rows.append((step_seed, layout))
    try:
        yield
    finally:
        _rows.pop()


def _mask_seed(x: torch.Tensor, site: int | None) -> MaskSeed:
    """What fixes the mask for `x` at dropout site `site`: the running pass's rows when `x` is laid out as they
    say, else one draw from torch's generator."""
    if _rows and site is not None:
        step_seed, layout = _rows[-1]
        if layout is not None and x.dim() >= 2 and x.numel() == layout[0] * x.shape[-1]:
            return (step_seed, site, layout)
    return new_mask_seed()


def _keep_bits(shape: torch.Size, p: float, seed: MaskSeed) -> np.ndarray:
    """A flat numpy bool array for `shape`, True with probability 1 - round(p * 65536) / 65536.

    16 random bits per element, drawn as 64-bit words from numpy's SFC64 (measured here: 0.13 ms for
    59k words, against 0.18 ms for PCG64 and 0.8 ms for torch.rand of the same 235k elements).  A row-wise
    seed seeds one SFC64 per row from (step seed, site, row key) through numpy's SeedSequence (23 us a row).
    """
    n = int(np.prod(shape))
    threshold = -32768 + round(p * MASK_LEVELS)
    if isinstance(seed, int):
        levels = np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.int16)[:n]  # uniform on [-32768, 32767]
        return levels >= threshold
    step_seed, site, (positions, rows) = seed
    width = n // positions
    keep = np.zeros(n, dtype=bool)  # padding: dropped
    for key, start, length in rows:
        m = length * width
        levels = np.random.SFC64([step_seed, site, *key]).random_raw((m + 3) // 4).view(np.int16)[:m]
        np.greater_equal(levels, threshold, out=keep[start * width : start * width + m])
    return keep


def _keep_mask(x: torch.Tensor, p: float, seed: MaskSeed | None = None) -> torch.Tensor:
    """A bool tensor like `x`, True with probability 1 - p (p rounded to 1/65536 on a CPU).

    `seed` (default: one draw from torch's generator) fixes the whole mask, so backward can rebuild it.
    """
    if seed is None:
        seed = new_mask_seed()
    if x.device.type == "cpu":
        return torch.from_numpy(_keep_bits(x.shape, p, seed)).view(x.shape)
    if isinstance(seed, int):
        generator = torch.Generator(device=x.device).manual_seed(seed)
        return torch.rand(x.shape, device=x.device, generator=generator) >= p
    step_seed, site, (positions, rows) = seed
    keep = torch.zeros(positions, x.shape[-1], dtype=torch.bool, device=x.device)
    for key, start, length in rows:
        row_seed = int(np.random.SeedSequence([step_seed, site, *key]).generate_state(1, np.uint64)[0]) >> 1
        generator = torch.Generator(device=x.device).manual_seed(row_seed)
        keep[start : start + length] = torch.rand(length, x.shape[-1], device=x.device, generator=generator) >= p
    return keep.view(x.shape)


def keep_scale(p: float, device_type: str) -> float:
    """1 / P(keep), for the probability `_keep_mask` really uses."""
    dropped = round(p * MASK_LEVELS) / MASK_LEVELS if device_type == "cpu" else p
    return 1.0 / (1.0 - dropped)


_shared: dict = {}  # the last mask (forward) and the last rebuilt mask and dropped input (backward)


def forget_shared_mask() -> None:
    """Drop the cached masks (after each forward and each backward pass: a block kept across passes
    fragments the heap)."""
    _shared.clear()


def _scaled_mask(x: torch.Tensor, p: float, seed: MaskSeed) -> torch.Tensor:
    """The keep-mask of `seed` as floats 0 and 1/P(keep): multiplying by it is one vectorised pass
    (0.04 ms for 512 x 576 here), where `torch.where` on a bool mask takes 0.15 ms.  On a CPU the
    floats are made by numpy straight from the bool bits (0.06 ms for 409 x 576, where torch's
    bool -> float copy and scaling took 0.3 ms)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return _keep_mask(x, p, seed).to(x.dtype).mul_(keep_scale(p, x.device.type))
    kind = np.float32 if x.dtype == torch.float32 else np.float64
    scaled = np.multiply(_keep_bits(x.shape, p, seed), kind(keep_scale(p, "cpu")), dtype=kind)
    return torch.from_numpy(scaled).view(x.shape)


def _forward_mask(x: torch.Tensor, p: float, site: int | None) -> tuple[MaskSeed, torch.Tensor]:
    """(seed, scaled mask) for `x`; consecutive calls on the same tensor (q, k, v) share them (and the first
    one's site)."""
    if _shared.get("x") is x and _shared.get("p") == p and _shared.get("version") == x._version:
        return _shared["seed"], _shared["mask"]
    seed = _mask_seed(x, site)
    mask = _scaled_mask(x, p, seed)
    _shared.update(x=x, p=p, version=x._version, seed=seed, mask=mask)
    return seed, mask


def _backward_mask_and_dropped(x: torch.Tensor, p: float, seed: MaskSeed) -> tuple[torch.Tensor, torch.Tensor]:
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
    def forward(ctx, x, weight, p: float, site: int | None = None):
        seed, mask = _forward_mask(x, p, site)  # mask [.., in]: 0 where dropped, 1/P(keep) where kept
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
        return grad_x, grad_weight, None, None


class DropoutLinear(torch.nn.Linear):
    """A LoRA `A` projection that applies its layer's dropout itself (see the module docstring)."""

    dropout_p: float = 0.0
    dropout_site: int | None = None  # numbers the model's dropout sites for `dropout_rows`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_p > 0 and torch.is_grad_enabled():
            return DropoutThenLinear.apply(x, self.weight, self.dropout_p, self.dropout_site)
        return super().forward(x)


def _peft_linear_class():
    from peft.tuners.lora.layer import Linear

    return Linear


@functools.cache
def _make_fast_class(base: type) -> type:
    class FastLoraLinear(base):
        """PEFT's LoRA Linear with `base(x) + B(A(drop(x))) * scaling` as one addmm when it is plain LoRA."""

        _tunesmith_fast = True

        def forward(self, x, *args, **kwargs):
            name = _plain_adapter(self)
            if (args or kwargs or name is None or self.lora_B[name].bias is not None
                    or x.dtype != self.lora_A[name].weight.dtype):
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x)  # [.., out]
            h = self.lora_A[name](self.lora_dropout[name](x))  # [.., r]
            autocast = torch.is_autocast_enabled(x.device.type)
            if result.dtype != h.dtype and not autocast:
                return result + (self.lora_B[name](h) * self.scaling[name]).to(result.dtype)
            if autocast:  # autocast casts the operands of addmm, not of the in-place addmm_
                out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                                  self.lora_B[name].weight.t(), alpha=self.scaling[name])
                return out.view(result.shape)
            # in place: the frozen base's output is saved by nobody, and an out-of-place addmm would first copy it
            result.view(-1, result.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.lora_B[name].weight.t(),
                                                     alpha=self.scaling[name])
            return result

    return FastLoraLinear


def _plain_adapter(layer) -> str | None:
    """The one active adapter of a PEFT LoRA layer when it is plain LoRA, unmerged and enabled; else None."""
    active = layer.active_adapters
    name = active[0] if len(active) == 1 else None
    if name is None or layer.disable_adapters or layer.merged or name not in layer.lora_A or name in layer.lora_variant:
        return None
    return name


def _plain_parts(layer, x: torch.Tensor):
    """(base weight, A weight, B weight, scaling, dropout p, dropout site) of a fast-path LoRA layer in its plain state
    (one active adapter, unmerged, no bias anywhere, frozen base, dtypes matching `x`), or None."""
    name = _plain_adapter(layer) if getattr(type(layer), "_tunesmith_fast", False) else None
    if name is None:
        return None
    base, a, b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if (type(base) is not torch.nn.Linear or base.bias is not None or base.weight.requires_grad
            or a.bias is not None or b.bias is not None or type(b) is not torch.nn.Linear
            or not x.dtype == base.weight.dtype == a.weight.dtype == b.weight.dtype):
        return None
    if type(a) is DropoutLinear:
        p, site = a.dropout_p, a.dropout_site
    elif type(a) is torch.nn.Linear and isinstance(layer.lora_dropout[name], torch.nn.Identity):
        p, site = 0.0, None
    else:
        return None
    return base.weight, a.weight, b.weight, float(layer.scaling[name]), p, site


class LoraSwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) for three plain LoRA projections (the Llama/Mistral/Qwen MLP), keeping for
    backward only x, gate(x), up(x) and the three rank-r activations.

    Layer by layer, autograd would keep x (for gate/up's A), gate(x) (for silu), silu(gate(x)) and up(x)
    (for the product) and the product (for down's A): 1 + 4 x intermediate floats per token.  Here the
    product and silu are recomputed in backward from gate(x) and up(x) (two elementwise passes), which
    keeps 1 + 2 x intermediate: 28% of a SmolLM2 layer's activations (bench/RESULTS.md, "Levers one by one").  The
    dropout masks are drawn in the same order as the unfused path (gate/up's, then down's) and rebuilt from
    their seeds in backward, as `DropoutThenLinear` does.
    """

    @staticmethod
    def forward(ctx, x, wg, wu, wd, ag, bg, au, bu, ad, bd, scales, p_in: float, p_mid: float, sites=(None, None)):
        sg, su, sd = scales  # x [N, H]; wg, wu [I, H]; wd [H', I]; a* [r, in]; b* [out, r]
        seed_in = _mask_seed(x, sites[0]) if p_in > 0 else None
        dropped = x * _scaled_mask(x, p_in, seed_in) if seed_in is not None else x
        hg, hu = dropped @ ag.t(), dropped @ au.t()  # [N, r]
        del dropped
        g = torch.nn.functional.linear(x, wg).addmm_(hg, bg.t(), alpha=sg)  # [N, I]
        u = torch.nn.functional.linear(x, wu).addmm_(hu, bu.t(), alpha=su)
        a = torch.nn.functional.silu(g).mul_(u)  # [N, I]
        seed_mid = _mask_seed(a, sites[1]) if p_mid > 0 else None
        dropped = a * _scaled_mask(a, p_mid, seed_mid) if seed_mid is not None else a
        hd = dropped @ ad.t()  # [N, r]
        del dropped
        y = torch.nn.functional.linear(a, wd).addmm_(hd, bd.t(), alpha=sd)  # [N, H']
        ctx.save_for_backward(x, g, u, hg, hu, hd, wg, wu, wd, ag, bg, au, bu, ad, bd)
        ctx.scales, ctx.p, ctx.seeds = scales, (p_in, p_mid), (seed_in, seed_mid)
        return y

    @staticmethod
    def backward(ctx, dy):  # dy [N, H']
        x, g, u, hg, hu, hd, wg, wu, wd, ag, bg, au, bu, ad, bd = ctx.saved_tensors
        sg, su, sd = ctx.scales
        (p_in, p_mid), (seed_in, seed_mid) = ctx.p, ctx.seeds
        need = ctx.needs_input_grad
        silu_g = torch.nn.functional.silu(g)
        a = silu_g * u  # the product, recomputed
        mask_mid = _scaled_mask(a, p_mid, seed_mid) if seed_mid is not None else None
        dhd = (dy @ bd).mul_(sd)  # [N, r]
        grad_bd = (dy.t() @ hd).mul_(sd) if need[9] else None
        grad_ad = dhd.t() @ (a.mul_(mask_mid) if mask_mid is not None else a) if need[8] else None
        del a
        da = dy @ wd  # d loss / d product: through the frozen down projection ...
        if mask_mid is not None:
            da.addcmul_(dhd @ ad, mask_mid)  # ... and through its LoRA, one pass
        else:
            da.add_(dhd @ ad)
        del mask_mid
        du = da * silu_g
        del silu_g
        # silu's own backward kernel: d/dg [silu(g)] * (da * u) in one pass (four here before)
        dg = torch.ops.aten.silu_backward(da.mul_(u), g)
        del da
        dhg, dhu = (dg @ bg).mul_(sg), (du @ bu).mul_(su)  # [N, r]
        grad_bg = (dg.t() @ hg).mul_(sg) if need[5] else None
        grad_bu = (du.t() @ hu).mul_(su) if need[7] else None
        mask_in = _scaled_mask(x, p_in, seed_in) if seed_in is not None else None
        grad_ag = grad_au = None
        if need[4] or need[6]:
            dropped = x * mask_in if mask_in is not None else x
            grad_ag = dhg.t() @ dropped if need[4] else None
            grad_au = dhu.t() @ dropped if need[6] else None
            del dropped
        dx = None
        if need[0]:
            dx = (dg @ wg).addmm_(du, wu)
            through_lora = (dhg @ ag).addmm_(dhu, au)
            if mask_in is not None:
                dx.addcmul_(through_lora, mask_in)  # as for da above: one pass
            else:
                dx.add_(through_lora)
        return dx, None, None, None, grad_ag, grad_bg, grad_au, grad_bu, grad_ad, grad_bd, None, None, None, None


SILU_TYPES: tuple = (torch.nn.SiLU,)
try:  # transformers' own SiLU module (ACT2FN["silu"])
    from transformers.activations import SiLUActivation

    SILU_TYPES += (SiLUActivation,)
except ImportError:  # pragma: no cover - transformers always ships it in the versions we support
    pass


@functools.cache
def _make_fast_mlp_class(base: type) -> type:
    class FastLoraSwiGLU(base):
        """A `down(act(gate(x)) * up(x))` MLP that trains through `LoraSwiGLU` when its three projections
        are plain LoRA layers; any other case (eval, no grad, autocast, DoRA, merged...) runs `base.forward`."""

        def forward(self, x, *args, **kwargs):
            if not args and not kwargs and self.training and torch.is_grad_enabled() \
                    and not torch.is_autocast_enabled(x.device.type):
                parts = [_plain_parts(layer, x) for layer in (self.gate_proj, self.up_proj, self.down_proj)]
                if all(part is not None for part in parts) and parts[0][4] == parts[1][4]:
                    (wg, ag, bg, sg, p_in, site_in), (wu, au, bu, su, _, _), (wd, ad, bd, sd, p_mid, site_mid) = parts
                    flat = x.reshape(-1, x.shape[-1])
                    y = LoraSwiGLU.apply(flat, wg, wu, wd, ag, bg, au, bu, ad, bd, (sg, su, sd), p_in, p_mid,
                                         (site_in, site_mid))
                    return y.view(*x.shape[:-1], y.shape[-1])
            return super().forward(x, *args, **kwargs)

    return FastLoraSwiGLU


def _swiglu_mlp(module: torch.nn.Module) -> bool:
    """True for a transformers MLP computing exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)) with SiLU
    (checked in transformers 5.x: Llama, Mistral, Qwen2, Qwen3; Gemma's GELU and Phi-3's fused gate_up do not match)."""
    return (family_class(type(module), "MLP")
            and isinstance(getattr(module, "act_fn", None), SILU_TYPES)
            and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")))


SWIGLU_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # their *MLP.forward is the SwiGLU above


def family_class(kind: type, suffix: str) -> bool:
    """True for transformers' `<Family><suffix>` class of one of SWIGLU_FAMILIES (e.g. LlamaMLP, Qwen3RMSNorm)."""
    return (kind.__module__.startswith("transformers.models.") and kind.__name__.endswith(suffix)
            and kind.__name__.split(suffix)[0].lower() in SWIGLU_FAMILIES)


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
                a.dropout_p, a.dropout_site = drop.p, len(swapped_a)
                module.lora_dropout[name] = torch.nn.Identity()
                swapped_a.append((module, name, a, drop))
    swapped_mlps = []
    for module in model.modules():
        if _swiglu_mlp(module) and all(type(getattr(module, n)) is _make_fast_class(peft_linear)
                                       for n in ("gate_proj", "up_proj", "down_proj")):
            swapped_mlps.append((module, type(module)))
            module.__class__ = _make_fast_mlp_class(type(module))
    try:
        yield len(swapped_a)
    finally:
        _shared.clear()
        for module, kind in swapped_mlps:
            module.__class__ = kind
        for module, name, a, drop in swapped_a:
            a.__class__ = torch.nn.Linear
            del a.dropout_p, a.dropout_site
            module.lora_dropout[name] = drop
        for module in swapped_layers:
            module.__class__ = peft_linear
