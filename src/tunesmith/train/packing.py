"""Padding-free micro-batches: the rows of a micro-batch run as one flat sequence, each row seeing only itself.

The ordinary way pads every row of a micro-batch to the longest one and runs a [rows x longest]
block: on the workload in bench/train_throughput.py a third of those positions are padding, and
every one of them costs a full pass through every layer.  Here the rows are laid end to end
instead (a "pass" of at most `training.pass_tokens` tokens; a micro-batch longer than that runs as
several passes whose gradients add up before the optimiser step, so the step sees exactly the same
rows and the same token-weighted loss):

- position ids restart at 0 for every row, so rotary/absolute positions are what each row alone
  would get;
- attention runs row by row (`varlen_attention`): each row's queries see only that row's keys,
  causally, so nothing leaks between rows that happen to share a pass.  Each call is PyTorch's
  fused scaled-dot-product attention with `is_causal`, which keeps no [tokens x tokens] probability
  matrix for the backward pass (the padded path with a mask does);
- the next-token targets are shifted inside each row: a row's last token predicts nothing.

Hugging Face's `DataCollatorWithFlattening` applies the same idea to flash-attention-2 on GPUs
(position ids restart per row); this module does it for any device through transformers'
`AttentionInterface`, which lets a library register its own attention function by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunesmith.data.tokens import IGNORE_INDEX
from tunesmith.errors import UserError
from tunesmith.models.parts import decoder_and_head

ATTENTION_NAME = "tunesmith_varlen"
# Model types whose decoder takes position ids, builds its mask through transformers' mask interface and
# calls attention through ALL_ATTENTION_FUNCTIONS.  Each is checked by tests/test_packing.py: packed and
# padded logits agree.
CPU_PASS_TOKENS = 1024  # the least `pass_tokens: auto` gives on a CPU
PACKABLE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")


@dataclass
class Pass:
    """One forward/backward: rows laid end to end, shape [1, tokens]."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T], 0.. within each row
    targets: torch.Tensor  # [T], the next token within the row, IGNORE_INDEX where not trained
    cu_seq_lens: torch.Tensor  # [rows + 1] int32, where each row starts (and the end)
    max_length: int  # the longest row

    def to(self, device) -> "Pass":
        return Pass(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device),
                    self.cu_seq_lens.to(device), self.max_length)

    @property
    def n_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def n_trained(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def plan_passes(rows: Sequence, max_tokens: int) -> list[list]:
    """The rows of one micro-batch, grouped into passes of at most `max_tokens` tokens each.

    First-fit decreasing (longest row first, into the first pass with room): few passes, and a
    row longer than `max_tokens` simply gets a pass of its own.  Which pass a row lands in does not
    change the gradient, only how many tokens are in memory at once.
    """
    passes: list[list] = []
    room: list[int] = []
    for row in sorted(rows, key=lambda r: -len(r.input_ids)):
        n = len(row.input_ids)
        for i, left in enumerate(room):
            if n <= left:
                passes[i].append(row)
                room[i] -= n
                break
        else:
            passes.append([row])
            room.append(max_tokens - n)
    return passes


def make_pass(rows: Sequence) -> Pass:
    """Lay `rows` (objects with `input_ids` and `labels`) end to end."""
    lengths = [len(r.input_ids) for r in rows]
    input_ids = torch.tensor([t for r in rows for t in r.input_ids], dtype=torch.long)  # [T]
    labels = torch.tensor([t for r in rows for t in r.labels], dtype=torch.long)  # [T]
    position_ids = torch.cat([torch.arange(n) for n in lengths])  # [T]
    ends = torch.tensor(lengths).cumsum(0)  # [rows]
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:-1] = labels[1:]  # position t predicts token t+1 ...
    targets[ends - 1] = IGNORE_INDEX  # ... except across a row boundary
    cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
    cu[1:] = ends
    return Pass(input_ids[None], position_ids[None], targets, cu, max(lengths))


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Causal attention row by row inside a packed sequence (transformers' attention-function signature).

    query [1, heads, T, head_dim]; key/value [1, kv_heads, T, head_dim]; `cu_seq_lens_q` (passed down
    from the decoder call) marks the rows.  Returns [1, T, heads, head_dim] as transformers expects.
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:  # an ordinary (padded) batch: transformers' own SDPA path
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = cu.tolist()
    rows = list(zip(bounds[:-1], bounds[1:]))
    drop = dropout if module.training else 0.0
    if (query.device.type == "cpu" and drop == 0.0 and query.dtype == key.dtype == value.dtype
            and not torch.is_autocast_enabled("cpu")):  # SDPA below casts under autocast; the kernel does not
        return RowsAttention.apply(query, key, value, rows, scaling), None
    return sdpa_rows(query, key, value, rows, scaling, drop), None


def sdpa_rows(query, key, value, rows: list, scale=None, dropout: float = 0.0) -> torch.Tensor:
    """`F.scaled_dot_product_attention` row by row (causal), joined as [1, T, heads, head_dim]."""
    gqa = key.shape[1] != query.shape[1]
    outs = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                       is_causal=True, scale=scale, enable_gqa=gqa)
        for s, e in rows
    ]
    if len(outs) == 1:
        return outs[0].transpose(1, 2).contiguous()
    return torch.cat([o.transpose(1, 2) for o in outs], dim=1)  # [1, T, heads, head_dim] in one copy


class RowsAttention(torch.autograd.Function):
    """CPU causal attention row by row, written straight into the [1, T, heads, head_dim] output, which is
    also what backward keeps.

    Through `F.scaled_dot_product_attention` each row's output is kept by SDPA's backward and the joined
    copy again by the output projection's LoRA (its input): the same numbers twice, 576 floats per token
    and layer on SmolLM2.  Here the flash kernel's backward is handed views of the joined output (it
    accepts strided tensors), so that copy is the only one (bench/RESULTS.md, "Training throughput and memory
    vs Hugging Face Trainer + PEFT (CPU)", the levers table of "Levers one by one").
    """

    @staticmethod
    def forward(ctx, query, key, value, rows: list, scale):  # query [1, H, T, D]; key/value [1, KV, T, D]
        out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])  # [1, T, H, D]
        lses = []
        for s, e in rows:
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], 0.0, True, scale=scale)
            out[:, s:e].copy_(o.transpose(1, 2))
            lses.append(lse)
        ctx.save_for_backward(query, key, value, out, *lses)
        ctx.rows, ctx.scale = rows, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # [1, T, H, D]
        query, key, value, out, *lses = ctx.saved_tensors
        grads = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        for (s, e), lse in zip(ctx.rows, lses):
            row = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out[:, s:e].transpose(1, 2), query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                out[:, s:e].transpose(1, 2), lse, 0.0, True, scale=ctx.scale)
            for whole, part in zip(grads, row):
                whole[:, :, s:e] = part
        return *grads, None, None


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, varlen_attention)
    # The mask is SDPA's: padded batches need it, and a packed pass ignores the block mask it gets.
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _registered = True


def packing_unsupported(model: torch.nn.Module, max_length: int) -> str | None:
    """Why this model cannot train padding-free (a phrase), or None when it can."""

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKABLE_TYPES:
        return f"model type {model_type!r} is not one tunesmith has checked packed attention on"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < max_length:
        return f"its sliding attention window ({window}) is shorter than data.max_length ({max_length})"
    if getattr(config, "attn_logit_softcapping", None):
        return "it soft-caps attention scores"
    if decoder_and_head(model)[0] is None:
        return "tunesmith cannot reach its decoder and output layer separately"
    return None


def want_packing(setting: bool | str, model: torch.nn.Module, task: str, max_length: int,
                 device: str = "cpu") -> tuple[bool, str]:
    """Whether to train padding-free, and a sentence why (printed at the start of the run).

    `auto` packs on CPUs only: there a pass costs about the same whatever it holds, so padding is pure loss; on a
    GPU the row-by-row attention of a packed pass measured 13% slower than padded batches (an H200, bench/RESULTS.md,
    "GPU check"), so auto pads there, and `training.packing: true` still packs."""
    if setting is False:
        return False, "packing: off (training.packing: false)"
    if setting == "auto" and device != "cpu":
        return False, (f"packing: off (auto: on {device} padded batches measured faster than tunesmith's row-by-row "
                       "packed attention; training.packing: true packs)")
    reason = f"a {task} model trains on padded batches" if task != "causal_lm" else packing_unsupported(model, max_length)
    if reason is None:
        return True, "packing: on (rows end to end, each attending only to itself; no padding computed)"
    if setting is True:
        raise UserError(f"training.packing: true, but {reason}; set training.packing to auto or false.")
    return False, f"packing: off (auto: {reason})"


def resolve_pass_tokens(setting: int | str, device: str, batch_size: int, max_length: int) -> int:
    """Tokens per forward/backward pass: `training.pass_tokens`, or its `auto` value for this device.

    On a CPU every pass reads all the frozen weights twice (forward and backward), which costs about
    0.3 s on SmolLM2-135M whatever the pass holds; so passes are made as large as activation memory
    allows (at least CPU_PASS_TOKENS: on bench/train_throughput.py's workload 1024 trained 10% faster than 512,
    see bench/RESULTS.md, "Training throughput and memory vs Hugging Face Trainer + PEFT (CPU)", "Levers one
    by one").  A GPU wants the whole micro-batch at once.
    """
    if setting != "auto":
        return int(setting)
    return max(max_length, CPU_PASS_TOKENS) if device == "cpu" else batch_size * max_length


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module):
    """Inside: the model's attention is `varlen_attention`: row by row for a packed pass (the decoder call
    passes cu_seq_lens_q), transformers' SDPA otherwise.  The training loop stays inside for the whole run,
    so that gradient checkpointing's recomputation in the backward pass attends the same way."""
    _register()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
