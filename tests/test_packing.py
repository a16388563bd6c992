"""Padding-free training (train/packing.py) and the fused output-projection loss.

What must hold: a packed pass gives the same loss and the same gradients as the padded batch of the
same rows, on every family packing is switched on for; no row sees another; the fused loss equals
cross-entropy over full logits, value and gradients; and a whole run with packing on learns what the
padded run learns.  The fused LoRA dropout, RMSNorm and rotary paths are tested in test_fast_kernels.py.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_matrix import tiny_config

from tunesmith.data.batching import collate
from tunesmith.data.tokens import IGNORE_INDEX
from tunesmith.errors import UserError
from tunesmith.train.loss import LinearCrossEntropySum, head_nll_sum, packed_nll_sum, token_nll_sum
from tunesmith.train.packing import PACKABLE_TYPES, make_pass, plan_passes, resolve_pass_tokens, want_packing

VOCAB = 700


def make_rows(lengths, prompt=3, seed=0):
    """Rows with random tokens; the first `prompt` labels of each are masked, as a chat prompt would be."""
    rng = random.Random(seed)
    rows = []
    for n in lengths:
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        rows.append(SimpleNamespace(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return rows


def tiny_model(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, VOCAB))
    model.config.use_cache = False
    return model.train()


def test_plan_passes_puts_every_row_in_exactly_one_pass_within_the_budget():
    rows = make_rows([50, 10, 40, 30, 20, 60, 5])
    passes = plan_passes(rows, 64)
    placed = [id(r) for p in passes for r in p]
    assert sorted(placed) == sorted(id(r) for r in rows)
    assert all(sum(len(r.input_ids) for r in p) <= 64 for p in passes)
    assert len(passes) == 4  # 215 tokens in 64-token passes: first-fit decreasing needs the minimum, 4
    long = make_rows([100, 10])
    assert [len(p) for p in plan_passes(long, 64)] == [1, 1]  # a row over the budget gets its own pass


def test_make_pass_restarts_positions_and_never_predicts_across_rows():
    rows = make_rows([5, 4], prompt=1)
    p = make_pass(rows)
    assert p.input_ids.tolist() == [rows[0].input_ids + rows[1].input_ids]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert p.cu_seq_lens.tolist() == [0, 5, 9]
    first, second = rows[0].input_ids, rows[1].input_ids
    assert p.targets.tolist() == first[1:] + [IGNORE_INDEX] + second[1:] + [IGNORE_INDEX]
    assert p.n_trained == 4 + 3 and p.n_tokens == 9  # every label after the first of each row


@pytest.mark.parametrize("family", PACKABLE_TYPES)
def test_packed_pass_matches_the_padded_batch_loss_and_gradients(family):
    model = tiny_model(family)
    assert want_packing("auto", model, "causal_lm", 512)[0]
    rows = make_rows([7, 13, 4, 10])
    batch = collate(rows, pad_token_id=0)
    padded, n_padded = token_nll_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    padded.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    packed, n_packed = packed_nll_sum(model, make_pass(rows))
    packed.backward()
    assert n_packed == n_padded == sum(n - 3 for n in (7, 13, 4, 10))  # all labels after the 3-token prompt
    assert torch.allclose(packed, padded, rtol=1e-5), (family, float(packed), float(padded))
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, grads[name], atol=1e-5, rtol=1e-4), (family, name)
    # the model's own attention setting is back once the pass is done
    assert model.config._attn_implementation != "tunesmith_varlen"


def test_no_row_sees_another_in_a_pass():
    model = tiny_model("llama").eval()
    rows = make_rows([9, 8, 6])
    other = make_rows([9, 8, 6], seed=1)
    changed = [rows[0], other[1], rows[2]]  # only the middle row differs
    with torch.no_grad():
        whole_a = _per_row_nll(model, rows)
        whole_b = _per_row_nll(model, changed)
        alone = packed_nll_sum(model, make_pass(rows[2:]))[0]  # the last row in a pass of its own
    assert torch.allclose(whole_a[2], alone, atol=1e-5)
    assert torch.allclose(whole_a[0], whole_b[0], atol=1e-6) and torch.allclose(whole_a[2], whole_b[2], atol=1e-6)
    assert not torch.allclose(whole_a[1], whole_b[1])


def _per_row_nll(model, rows):
    """Each row's NLL out of one packed pass of all rows (the loss split back by row)."""
    from tunesmith.models.parts import decoder_and_head
    from tunesmith.train.packing import packed_attention

    p = make_pass(rows)
    decoder, head = decoder_and_head(model)
    with packed_attention(model):
        hidden = decoder(input_ids=p.input_ids, position_ids=p.position_ids, cu_seq_lens_q=p.cu_seq_lens).last_hidden_state[0]
    nll = F.cross_entropy(head(hidden), p.targets.clamp(min=0), reduction="none") * (p.targets != IGNORE_INDEX)
    bounds = p.cu_seq_lens.tolist()
    return [nll[s:e].sum() for s, e in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # fp32 on a CPU: logits in the kept buffer
@pytest.mark.parametrize("weight_trains", [False, True])
def test_fused_linear_cross_entropy_equals_full_logits(weight_trains, dtype, monkeypatch):
    import tunesmith.train.loss as loss

    monkeypatch.setattr(loss, "LOSS_CHUNK_TOKENS", 7)  # several chunks, the last one short
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, dtype=dtype, requires_grad=weight_trains)
    targets = torch.randint(0, 50, (23,))
    ours = LinearCrossEntropySum.apply(hidden, weight, targets)
    if dtype == torch.float32:  # one [7 x 50] buffer, the same one call after call
        kept = list(loss._logits_scratch.values())
        assert len(kept) == 1 and kept[0].shape == (7, 50)
        LinearCrossEntropySum.apply(hidden.detach(), weight.detach(), targets)
        assert loss._logits_scratch[(50, dtype, 7)].data_ptr() == kept[0].data_ptr()
    (ours * 3.0).backward()  # a non-unit incoming gradient
    got = hidden.grad.clone(), (weight.grad.clone() if weight_trains else None)
    hidden.grad = None
    weight.grad = None
    reference = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (reference * 3.0).backward()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    assert torch.allclose(ours, reference, **tol)
    assert torch.allclose(got[0], hidden.grad, **tol)
    if weight_trains:
        assert torch.allclose(got[1], weight.grad, **tol)


def test_head_nll_sum_takes_the_fused_path_only_for_a_plain_linear_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20, bias=False)
    hidden, targets = torch.randn(5, 8), torch.randint(0, 20, (5,))
    expected = F.cross_entropy(head(hidden), targets, reduction="sum")
    assert torch.allclose(head_nll_sum(head, hidden, targets), expected, atol=1e-5)
    biased = torch.nn.Linear(8, 20, bias=True)  # a bias: the chunked plain path
    assert torch.allclose(head_nll_sum(biased, hidden, targets),
                          F.cross_entropy(biased(hidden), targets, reduction="sum"), atol=1e-5)


def _saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `run()` builds the graph."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(storages.values())


def test_rows_attention_is_sdpa_row_by_row_and_keeps_one_copy_of_the_output():
    from tunesmith.train.packing import RowsAttention

    torch.manual_seed(0)
    rows = [(0, 5), (5, 17), (17, 20)]
    q = torch.randn(1, 6, 20, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 20, 8, dtype=torch.float64, requires_grad=True)  # grouped-query: 3 heads per key
    v = torch.randn(1, 2, 20, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 20, 6, 8, dtype=torch.float64)
    expected = torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                                         enable_gqa=True, scale=0.3).transpose(1, 2)
                          for s, e in rows], dim=1)
    expected.backward(g)
    want = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    got, kept = _saved_bytes(lambda: RowsAttention.apply(q, k, v, rows, 0.3))
    got.backward(g)
    assert torch.allclose(got, expected, atol=1e-12)
    for grad, t in zip(want, (q, k, v)):
        assert torch.allclose(t.grad, grad, atol=1e-12)
    assert got.shape == (1, 20, 6, 8)
    # q, k, v, the output itself and three small log-sum-exps: no second copy of the output
    assert kept <= (q.numel() + k.numel() + v.numel() + got.numel() + 3 * 6 * 12) * 8


def test_want_packing_says_why_not_and_refuses_an_explicit_true():
    gpt2 = tiny_model("gpt2")
    on, why = want_packing("auto", gpt2, "causal_lm", 64)
    assert not on and "gpt2" in why
    with pytest.raises(UserError, match="training.packing: true"):
        want_packing(True, gpt2, "causal_lm", 64)
    assert want_packing("auto", tiny_model("llama"), "seq2seq", 64) == (False, "packing: off (auto: a seq2seq model trains on padded batches)")
    assert want_packing(False, tiny_model("llama"), "causal_lm", 64)[0] is False
    mistral = tiny_model("mistral")
    mistral.config.sliding_window = 32
    on, why = want_packing("auto", mistral, "causal_lm", 64)
    assert not on and "sliding" in why
    assert resolve_pass_tokens("auto", "cpu", 4, 512) == 1024
    assert resolve_pass_tokens("auto", "cpu", 4, 2048) == 2048  # a row is never split
    assert resolve_pass_tokens("auto", "cpu", 8, 128) == 1024  # never passes of a few short rows on a CPU
    assert resolve_pass_tokens("auto", "cuda", 4, 512) == 2048
    assert resolve_pass_tokens(300, "cpu", 4, 512) == 300


def test_auto_packs_and_patches_on_cpus_only():
    """On a GPU padded batches and the stock modules measured faster (bench/RESULTS.md, "GPU check"): auto
    follows the device, and an explicit setting is kept."""
    from tunesmith.models.fast import kernel_mode

    llama = tiny_model("llama")
    assert want_packing("auto", llama, "causal_lm", 64)[0] is True  # device defaults to cpu
    on, why = want_packing("auto", llama, "causal_lm", 64, device="cuda")
    assert not on and why.startswith("packing: off (auto: on cuda padded batches measured faster")
    assert want_packing(True, llama, "causal_lm", 64, device="cuda")[0] is True
    assert [kernel_mode(m, d) for m in ("auto", "off") for d in ("cpu", "cuda")] == ["auto", "off", "off", "off"]


def test_gradient_checkpointing_recomputes_a_packed_pass_the_same_way():
    """The loop keeps packed attention on for the whole run, so the backward recomputation attends row by row too."""
    from tunesmith.train.compute import enable_gradient_checkpointing
    from tunesmith.train.packing import packed_attention

    rows = make_rows([9, 5, 12])
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        if checkpointing:
            enable_gradient_checkpointing(model)
        with packed_attention(model):
            nll, _ = packed_nll_sum(model, make_pass(rows))
            nll.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-5, rtol=1e-4), name
