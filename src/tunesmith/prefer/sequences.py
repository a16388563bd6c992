"""Whole answers' log-probabilities, from one forward pass over a micro-batch's answers.

A micro-batch of pairs becomes one unit: every pair's prompt + chosen and prompt + rejected as rows of their
own (chosen first), laid end to end in one padding-free pass where the model packs (train/packing.py), or
right-padded in one batch where it does not.  The decoder's hidden states are taken at the answer
positions only, and the output projection turns them into each answer token's log-probability a chunk at
a time (`token_logprobs`): the [tokens x vocab] logits never exist whole, as for SFT (train/loss.py).
Summing those per row gives each answer's log-probability.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tunesmith.data.batching import collate
from tunesmith.data.tokens import IGNORE_INDEX, TokenizedRow
from tunesmith.models.parts import decoder_and_head
from tunesmith.train.loss import LOSS_CHUNK_TOKENS, packed_trained_hidden, padded_trained_hidden
from tunesmith.train.packing import make_pass


@dataclass
class AnswerUnit:
    """One micro-batch's answers as one pass: `rows[k]` is answer k (prompt + answer, the answer trained)."""

    batch: object  # a train.packing.Pass, or a padded batch {input_ids, attention_mask, labels}
    rows: list  # the TokenizedRow of each answer, in pass order
    examples: list  # the PairRow / UnpairedRow / group each answer came from (what the loss is averaged over)
    extra: dict = field(default_factory=dict)  # per-objective tensors: reference log-probs, advantages, labels ...

    def to(self, device) -> AnswerUnit:
        batch = {k: v.to(device) for k, v in self.batch.items()} if isinstance(self.batch, dict) else self.batch.to(device)
        extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.extra.items()}
        return AnswerUnit(batch, self.rows, self.examples, extra)

    @property
    def n_tokens(self) -> int:
        if isinstance(self.batch, dict):
            return int(self.batch["attention_mask"].sum())
        return self.batch.n_tokens

    @property
    def n_trained(self) -> int:
        return int(self.answer_lengths().sum())

    def answer_lengths(self) -> torch.Tensor:
        """Tokens in each answer [A] (float, for averaging)."""
        return torch.tensor([sum(1 for t in r.labels[1:] if t != IGNORE_INDEX) for r in self.rows],
                            dtype=torch.float32)


def answer_row(prompt_ids: list[int], answer_ids: list[int]) -> TokenizedRow:
    """Prompt + answer as one row whose answer tokens train."""
    return TokenizedRow(input_ids=list(prompt_ids) + list(answer_ids),
                        labels=[IGNORE_INDEX] * len(prompt_ids) + list(answer_ids))


def make_unit(rows: list[TokenizedRow], examples: list, packed: bool, pad_id: int, key: int) -> tuple[AnswerUnit, tuple]:
    """The unit and its row layout for `models.fast.dropout_rows` (answer k of micro-batch `key` has key (key, k))."""
    if packed:
        batch = make_pass(rows)
        starts = batch.cu_seq_lens.tolist()
        layout = (batch.n_tokens, tuple(((key, k), s, len(r.input_ids)) for k, (r, s) in enumerate(zip(rows, starts))))
    else:
        batch = collate(rows, pad_id)
        width = batch["input_ids"].shape[1]
        layout = (len(rows) * width, tuple(((key, k), k * width, len(r.input_ids)) for k, r in enumerate(rows)))
    return AnswerUnit(batch, rows, examples), layout


def answer_logps(model, unit: AnswerUnit) -> torch.Tensor:
    """Each answer's summed token log-probability [A], differentiable (with the fused output projection)."""
    logp, rows_of = answer_token_logps(model, unit)
    total = torch.zeros(len(unit.rows), dtype=logp.dtype, device=logp.device)
    return total.index_add(0, rows_of, logp)


def answer_token_logps(model, unit: AnswerUnit) -> tuple[torch.Tensor, torch.Tensor]:
    """(each answer token's log-probability [N], the answer it belongs to [N]), answers in order."""
    decoder, head = decoder_and_head(model)
    if decoder is None:
        raise RuntimeError("preference tuning needs a model whose decoder and output projection tunesmith can reach")
    if isinstance(unit.batch, dict):
        b = unit.batch
        hidden, targets = padded_trained_hidden(decoder, b["input_ids"], b["attention_mask"], b["labels"])
        rows_of = (b["labels"][:, 1:] != IGNORE_INDEX).nonzero()[:, 0]  # [N]: the padded row of each trained position
    else:
        hidden, targets = packed_trained_hidden(model, decoder, unit.batch)
        rows_of = _packed_rows(unit.batch)
    return token_logprobs(head, hidden, targets), rows_of


def _packed_rows(one_pass) -> torch.Tensor:
    """The row of each trained position of a packed pass [N], in position order."""
    cu = one_pass.cu_seq_lens.to(one_pass.targets.device).long()
    lengths = cu[1:] - cu[:-1]
    row_of_position = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)  # [T]
    return row_of_position[one_pass.targets != IGNORE_INDEX]


def token_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden))[target] per row [N], a chunk of rows at a time, never all N x vocab logits."""
    if (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and torch.is_grad_enabled() and hidden.requires_grad):
        return LinearTokenLogprobs.apply(hidden, head.weight, targets)
    pieces = []
    for start in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS):
        h, t = hidden[start : start + LOSS_CHUNK_TOKENS], targets[start : start + LOSS_CHUNK_TOKENS]
        if torch.is_grad_enabled() and h.requires_grad:
            # recomputed in backward: only the chunk's hidden states are kept, not its [n x vocab] logits
            pieces.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, head, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(head, h, t))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def _chunk_logprobs(head, h, t):
    logits = head(h).float()  # [n, V]
    return logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


class LinearTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row, for a frozen weight: the gradient of each row's log-prob
    with respect to its hidden state, (onehot(target) - softmax) @ weight, is worked out chunk by chunk in
    forward and kept ([N, H]); backward scales each row by its incoming gradient.  (train/loss.py's
    LinearCrossEntropySum does the same for a summed NLL.)"""

    @staticmethod
    def forward(ctx, hidden, weight, targets):  # hidden [N, H], weight [V, H], targets [N]
        exact = torch.promote_types(hidden.dtype, torch.float32)
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        out = torch.empty(hidden.shape[0], dtype=exact, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS):
            h = hidden[start : start + LOSS_CHUNK_TOKENS]
            t = targets[start : start + LOSS_CHUNK_TOKENS]
            logits = (h @ w.t()).to(exact)  # [n, V]
            # logsumexp, as `_chunk_logprobs` (the reference pass) computes it: fp32 log_softmax on a CPU read a few
            # 1e-6 nats a token higher over a 49k vocabulary, so a policy equal to its reference did not tie with it
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [n, 1]
            out[start : start + h.shape[0]] = (logits.gather(1, t[:, None]) - lse).squeeze(1)
            g = logits.sub_(lse).exp_().neg_()  # -softmax, in place of the logits
            g[torch.arange(t.shape[0], device=t.device), t] += 1.0  # onehot - softmax
            grad_hidden[start : start + h.shape[0]] = g.to(h.dtype) @ w
        ctx.save_for_backward(grad_hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_out.to(grad_hidden.dtype)[:, None], None, None
