"""The knowledge-distillation loss, on the trained tokens only, a chunk of rows at a time.

Per trained token (Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", 2015):

    loss = alpha * T^2 * KL(p_T || s_T) + (1 - alpha) * CE(target | s)

where p_T = softmax(teacher logits / T), s_T = softmax(student logits / T) and s = softmax(student logits).
The T^2 keeps the KL term's gradient on the scale of the cross-entropy's as T changes (section 2 of the
paper): d/dz [T^2 KL] = T (s_T - p_T) for the student logits z.

The teacher's side comes either from its own forward pass on the same rows ("online", every logit) or
from a cache of its top-k log-probs per token (`--cache-teacher`).  A top-k cache does not know how the
mass beyond k is spread, and dropping it would make p_T sum to less than 1; here it is kept as one
bucket, "every other token", matched against the student's own mass outside the k tokens:

    KL = sum_{i in top k} q_i log(q_i / s_T,i) + r log(r / s_T,rest),   r = 1 - sum_i q_i

(the KL between the two distributions coarsened to k + 1 outcomes).  Its gradient is T (s_T - p~), where
p~ is q on the top k and, on every other token j, r * s_T,j / s_T,rest: the rest mass shared out the way
the student shares its own.  With k = vocabulary size, r = 0 and this is exactly the online loss.

`LinearDistillSum` works out the gradient with respect to the student's hidden states during the forward
pass, chunk by chunk, as `train.loss.LinearCrossEntropySum` does for plain cross-entropy, so no
[tokens x vocab] tensor outlives its chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.train.loss import LOSS_CHUNK_TOKENS, scaled_saved_gradients


@dataclass
class DenseTeacher:
    """The teacher's logits for the trained tokens, made chunk by chunk from its hidden states."""

    hidden: torch.Tensor  # [N, H_teacher], no grad
    head: torch.nn.Module  # the teacher's output projection

    def chunk(self, start: int, end: int, temperature: float):
        """(None, log p_T [n, V]) for rows start..end."""
        logits = self.head(self.hidden[start:end])  # [n, V]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
        return None, torch.log_softmax(logits / temperature, dim=-1)


@dataclass
class SparseTeacher:
    """Cached top-k log-probs at temperature T for the trained tokens."""

    indices: torch.Tensor  # [N, k] int64
    logprobs: torch.Tensor  # [N, k] float32, log p_T of those tokens

    def chunk(self, start: int, end: int, temperature: float):
        return self.indices[start:end], self.logprobs[start:end]


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, teacher_chunk, temperature: float,
                         alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, d loss / d logits) for one chunk.  logits [n, V] fp32; targets [n]."""
    indices, teacher_logprobs = teacher_chunk
    rows = torch.arange(targets.shape[0], device=targets.device)
    log_s = torch.log_softmax(logits, dim=-1)  # [n, V]
    ce = -log_s[rows, targets].sum()
    grad = log_s.exp_()  # s
    grad[rows, targets] -= 1.0  # s - onehot: d CE / d logits
    grad.mul_(1.0 - alpha)
    if alpha == 0.0:
        return (1.0 - alpha) * ce, grad
    log_s_t = torch.log_softmax(logits / temperature, dim=-1)  # [n, V]
    s_t = log_s_t.exp()
    if indices is None:  # every token: KL(p || s_T) = sum p (log p - log s_T), 0 log 0 = 0
        p = teacher_logprobs.exp()  # [n, V]
        kl = torch.where(p > 0, p * (teacher_logprobs - log_s_t), 0.0).sum()
        target = p
    else:  # top k and one bucket for the rest (module docstring)
        q = teacher_logprobs.exp()  # [n, k]
        rest = (1.0 - q.sum(dim=-1)).clamp_(min=0.0)  # [n]
        student_rest = s_t.scatter(1, indices, 0.0).sum(dim=-1)  # [n]: the student's mass outside the k
        kl = (q * (teacher_logprobs - log_s_t.gather(1, indices))).sum()
        has_rest = rest > 0
        kl = kl + (rest[has_rest] * (rest[has_rest].log() - student_rest[has_rest].clamp(min=1e-30).log())).sum()
        target = s_t * (rest / student_rest.clamp(min=1e-30))[:, None]  # the rest, shared as the student does
        target.scatter_(1, indices, q)
    grad.add_(s_t.sub_(target), alpha=alpha * temperature)  # alpha * T * (s_T - p~)
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce, grad


class LinearDistillSum(torch.autograd.Function):
    """Sum over rows of the distillation loss of `hidden @ weight.T`, gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher, temperature: float, alpha: float):
        # hidden [N, H]; weight [V, H]; targets [N]; teacher: DenseTeacher or SparseTeacher for the same N rows
        want_hidden, want_weight = hidden.requires_grad, weight.requires_grad
        exact = torch.promote_types(hidden.dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=exact) if want_weight else None
        total = torch.zeros((), dtype=exact, device=hidden.device)
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        for start in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS):
            end = min(start + LOSS_CHUNK_TOKENS, hidden.shape[0])
            h = hidden[start:end]  # [n, H]
            logits = (h @ w.t()).to(exact)  # [n, V]
            loss, g = _chunk_loss_and_grad(logits, targets[start:end], teacher.chunk(start, end, temperature),
                                           temperature, alpha)
            total += loss
            g = g.to(h.dtype)
            if want_hidden:
                grad_hidden[start:end] = g @ w
            if want_weight:
                grad_weight += (g.t() @ h).to(exact)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return *scaled_saved_gradients(ctx, grad_total), None, None, None, None


def distill_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, teacher, temperature: float,
                alpha: float) -> torch.Tensor:
    """The summed distillation loss of the student's `head(hidden)` ([N, H] -> [N, V]) against `teacher`."""
    if type(head) is torch.nn.Linear and head.bias is None:
        return LinearDistillSum.apply(hidden, head.weight, targets, teacher, temperature, alpha)
    total = hidden.new_zeros((), dtype=torch.float32)  # any other head: plain autograd, chunk by chunk
    for start in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS):
        end = min(start + LOSS_CHUNK_TOKENS, hidden.shape[0])
        logits = head(hidden[start:end]).float()  # [n, V]
        total = total + _autograd_chunk_loss(logits, targets[start:end], teacher.chunk(start, end, temperature),
                                             temperature, alpha)
    return total


def _autograd_chunk_loss(logits, targets, teacher_chunk, temperature: float, alpha: float) -> torch.Tensor:
    """The same loss as `_chunk_loss_and_grad`, written for autograd (heads that are not a plain Linear)."""
    indices, teacher_logprobs = teacher_chunk
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    if alpha == 0.0:
        return ce
    log_s_t = torch.log_softmax(logits / temperature, dim=-1)
    if indices is None:
        p = teacher_logprobs.exp()
        kl = torch.where(p > 0, p * (teacher_logprobs - log_s_t), 0.0).sum()
    else:
        q = teacher_logprobs.exp()
        rest = (1.0 - q.sum(dim=-1)).clamp(min=0.0)
        student_rest = log_s_t.exp().scatter(1, indices, 0.0).sum(dim=-1).clamp(min=1e-30)
        kl = (q * (teacher_logprobs - log_s_t.gather(1, indices))).sum()
        kl = kl + torch.where(rest > 0, rest * (rest.clamp(min=1e-30).log() - student_rest.log()), 0.0).sum()
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce
