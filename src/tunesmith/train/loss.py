"""Causal-LM loss computed only where it counts.

The usual path runs the output projection over every position ([tokens x vocab]
logits, 49k columns for SmolLM2) and then throws away the masked prompt and
padding positions.  Here the decoder's hidden states are gathered at the trained
positions first, and the projection + cross-entropy run on those rows only, a
chunk at a time (the idea torchtune's chunked cross-entropy uses), so the full
logits tensor never exists.  The result is the *sum* of token NLLs and the token
count, so the caller can weight by tokens across gradient accumulation.

`LinearCrossEntropySum` (used by `head_nll_sum` for a plain linear head) goes one step further (the "fused linear cross-entropy" of Liger-Kernel
and Apple's Cut Cross-Entropy): it works out the gradient of each chunk's loss with respect to the
hidden states during the forward pass, while that chunk's logits exist, and keeps only that
[tokens x hidden] gradient for the backward pass.  Plain chunking would still keep every chunk's
[tokens x vocab] log-probabilities alive until backward (200 MiB per 1024 tokens of SmolLM2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.tokens import IGNORE_INDEX
from tunesmith.models.parts import decoder_and_head
from tunesmith.train.packing import packed_attention

LOSS_CHUNK_TOKENS = 256  # rows of the output projection computed at once ([256 x vocab] fp32: 48 MiB for SmolLM2)


def token_nll_sum(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # [B, T]
    attention_mask: torch.Tensor,  # [B, T]
    labels: torch.Tensor,  # [B, T], IGNORE_INDEX where not trained
    position_ids: torch.Tensor | None = None,  # [B, T]
) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over trained positions, and how many positions that was."""
    targets = labels[:, 1:]  # [B, T-1]: position t predicts token t+1
    decoder, head = decoder_and_head(model)
    if decoder is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return nll, int((targets != IGNORE_INDEX).sum())
    selected, trained = padded_trained_hidden(decoder, input_ids, attention_mask, labels, position_ids)
    return head_nll_sum(head, selected, trained), trained.shape[0]


def padded_trained_hidden(decoder, input_ids, attention_mask, labels, position_ids=None):
    """(the decoder's last hidden states at the trained positions [N, H], their next-token targets [N]) for a
    padded batch: input_ids/attention_mask/labels [B, T], rows then positions in order."""
    targets = labels[:, 1:]  # [B, T-1]: position t predicts token t+1
    keep = targets != IGNORE_INDEX  # [B, T-1]
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # [B, T, H]
    return hidden[:, :-1][keep], targets[keep]


def head_nll_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of NLL of `targets` [N] under `head(hidden)` ([N, H] -> [N, V] logits), never all N rows at once."""
    if type(head) is torch.nn.Linear and head.bias is None:  # not a PEFT/bitsandbytes layer with its own forward
        return LinearCrossEntropySum.apply(hidden, head.weight, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS):
        chunk_logits = head(hidden[start : start + LOSS_CHUNK_TOKENS]).float()  # [n, V], upcast per chunk
        total = total + F.cross_entropy(chunk_logits, targets[start : start + LOSS_CHUNK_TOKENS], reduction="sum")
    return total


def scaled_saved_gradients(ctx, grad_total: torch.Tensor):
    """Backward of a loss whose forward saved (d total / d hidden, d total / d weight), either None when not
    wanted: those, times the incoming gradient, in the hidden states' and the weight's dtypes."""
    grad_hidden, grad_weight = ctx.saved_tensors
    gh = grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None
    gw = (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None
    return gh, gw


class LinearCrossEntropySum(torch.autograd.Function):
    """sum_i NLL(targets_i | softmax(hidden_i @ weight.T)), with the gradients computed chunk by chunk in forward.

    For one row, d NLL / d logits = softmax(logits) - onehot(target); then d/d hidden = that @ weight and
    d/d weight = that.T @ hidden.  Only those gradients ([N, H], and [V, H] when the weight trains) are
    kept for backward, which scales them by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets):  # hidden [N, H], weight [V, H], targets [N]
        want_hidden = hidden.requires_grad
        want_weight = weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        exact = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least for the softmax and the sums
        grad_weight = torch.zeros_like(weight, dtype=exact) if want_weight else None
        total = torch.zeros((), dtype=exact, device=hidden.device)
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        scratch = _cpu_logits_scratch(hidden, weight.shape[0])
        for start in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS):
            h = hidden[start : start + LOSS_CHUNK_TOKENS]  # [n, H]
            t = targets[start : start + LOSS_CHUNK_TOKENS]  # [n]
            if scratch is not None:
                logits = torch.mm(h, w.t(), out=scratch[: h.shape[0]])  # [n, V]
            else:
                logits = (h @ w.t()).to(exact)  # [n, V]
            target_logit = logits.gather(1, t[:, None]).squeeze(1)  # [n]
            # log-sum-exp by hand, keeping exp(logits - max) for the softmax: 15 ms for [256 x 49152] here,
            # where torch.logsumexp and a second exp took 40 ms
            top = logits.amax(dim=-1, keepdim=True)  # [n, 1]
            unnormalised = logits.sub_(top).exp_()  # in place of the logits
            sums = unnormalised.sum(dim=-1, keepdim=True)  # [n, 1]
            total += (top.squeeze(1) + sums.log().squeeze(1) - target_logit).sum()
            if want_hidden or want_weight:
                probs = unnormalised.div_(sums)  # softmax
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0  # minus the one-hot target
                g = probs.to(h.dtype)  # [n, V]
                if want_hidden:
                    grad_hidden[start : start + LOSS_CHUNK_TOKENS] = g @ w
                if want_weight:
                    grad_weight += (g.t() @ h).to(exact)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return *scaled_saved_gradients(ctx, grad_total), None


_logits_scratch: dict = {}


def _cpu_logits_scratch(hidden: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """A [LOSS_CHUNK_TOKENS x vocab] fp32 buffer for the chunk logits, kept for the life of the process.

    48 MiB for SmolLM2: more than glibc's largest mmap threshold (32 MiB), so a fresh tensor per
    chunk is a fresh mapping, faulted in 4 KiB page by page while the output-projection product writes
    it; on bench/train_throughput.py's workload that was two thirds of the training loop's page faults, and
    it slowed that product from ~160 to ~90 GFLOP/s (bench/RESULTS.md, "Training throughput and memory vs
    Hugging Face Trainer + PEFT (CPU)", the levers table of "Levers one by one").  Reused, it is faulted in once.  Only for
    fp32 on a CPU without autocast: a GPU's caching allocator already reuses its blocks, and `mm(out=)`
    does not cast.
    """
    if hidden.device.type != "cpu" or hidden.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return None
    key = (vocab, hidden.dtype, LOSS_CHUNK_TOKENS)
    buffer = _logits_scratch.get(key)
    if buffer is None:
        _logits_scratch.clear()  # one at a time: a buffer for another vocabulary or chunk size goes
        buffer = _logits_scratch[key] = torch.empty(LOSS_CHUNK_TOKENS, vocab, dtype=hidden.dtype)
    return buffer


def packed_nll_sum(model: torch.nn.Module, one_pass) -> tuple[torch.Tensor, int]:
    """`token_nll_sum` for a padding-free pass (`train.packing.Pass`): rows end to end, each attending to itself."""
    decoder, head = decoder_and_head(model)
    if decoder is None:
        raise RuntimeError("packed passes need a model whose decoder and output projection tunesmith can reach")
    selected, trained = packed_trained_hidden(model, decoder, one_pass)
    return head_nll_sum(head, selected, trained), trained.shape[0]


def packed_trained_hidden(model, decoder, one_pass):
    """(last hidden states at the trained positions [N, H], their targets [N]) of a padding-free pass, its
    rows attending each to itself (`model` is whose attention setting `packed_attention` switches)."""
    cu = one_pass.cu_seq_lens
    with packed_attention(model):
        hidden = decoder(
            input_ids=one_pass.input_ids, position_ids=one_pass.position_ids, use_cache=False,
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=one_pass.max_length, max_length_k=one_pass.max_length,
        ).last_hidden_state[0]  # [T, H]
    keep = one_pass.targets != IGNORE_INDEX  # [T]
    return hidden[keep], one_pass.targets[keep]
