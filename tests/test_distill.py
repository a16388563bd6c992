"""Distillation (tunesmith/distill/): the loss is what its formula says, value and gradient; a top-k cache
keeps the rest mass and equals the online loss when k is the whole vocabulary; a pruned student is the
teacher's own layers; with alpha = 1 the student moves towards the teacher; different tokenizers switch to
sequence-level distillation and say so; a damaged or mismatched cache is refused with a sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunesmith.config import load_config
from tunesmith.distill.loss import DenseTeacher, SparseTeacher, _autograd_chunk_loss, distill_sum
from tunesmith.distill.prune import keep_layer_indices, prune_layers
from tunesmith.errors import UserError

ROWS = [{"instruction": f"Write day {d} of month {m} in {y} as a date.", "output": f"{y}-{m:02d}-{d:02d}"}
        for d, m, y in [(1 + i % 27, 1 + i % 12, 1990 + i) for i in range(40)]]


def _tiny_teacher_folder(root: Path, layers: int = 4, vocab_size: int = 700) -> Path:
    from conftest import build_tiny_llama_config, build_tiny_tokenizer
    from transformers import LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(vocab_size=vocab_size)
    config = build_tiny_llama_config(tokenizer)
    config.num_hidden_layers = layers
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    folder = root / f"teacher-{layers}-{vocab_size}"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _data(root: Path) -> Path:
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _cfg(root: Path, teacher: Path, *extra: str):
    return load_config(None, [
        f"teacher.name={teacher}", f"data.path={_data(root)}", "data.validation_split=0.1", "data.max_length=64",
        "training.batch_size=4", "training.max_steps=3", "training.lr_scheduler=constant", "eval.enabled=false",
        "lora.dropout=0.0", *extra,
    ])


@pytest.mark.parametrize("sparse_k", [None, 5, 37])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_fused_distill_loss_and_gradients_equal_the_autograd_formula(sparse_k, alpha):
    torch.manual_seed(0)
    n, hidden_size, vocab, temperature = 300, 16, 37, 2.5  # 300 rows: two chunks
    hidden = torch.randn(n, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    teacher_logits = torch.randn(n, vocab, dtype=torch.float64) * 3
    teacher_logp = torch.log_softmax(teacher_logits / temperature, dim=-1)
    if sparse_k is None:
        teacher = DenseTeacher(teacher_logits, torch.nn.Identity())
    else:
        values, indices = teacher_logp.topk(sparse_k, dim=-1)
        teacher = SparseTeacher(indices, values)
    head = torch.nn.Linear(hidden_size, vocab, bias=False, dtype=torch.float64)
    head.weight = torch.nn.Parameter(weight.detach().clone())
    fused = distill_sum(head, hidden, targets, teacher, temperature, alpha)  # the fused path of a plain head
    fused.backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, weight.grad = None, None
    reference = sum(
        _autograd_chunk_loss(hidden[s:s + 256] @ weight.t(), targets[s:s + 256], teacher.chunk(s, s + 256, temperature),
                             temperature, alpha)
        for s in range(0, n, 256))
    reference.backward()
    assert float(fused.detach()) == pytest.approx(float(reference.detach()), rel=1e-10)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-10) and torch.allclose(grads[1], weight.grad, atol=1e-10)
    if alpha == 1.0 and sparse_k is None:  # the KL term itself, from its definition
        p = teacher_logp.exp()
        log_s = torch.log_softmax((hidden @ weight.t()) / temperature, dim=-1)
        kl = (p * (teacher_logp - log_s)).sum()
        assert float(fused) == pytest.approx(temperature**2 * float(kl), rel=1e-10)


def test_top_k_keeps_the_rest_mass_and_gives_a_kl_no_larger_than_the_full_one():
    torch.manual_seed(0)
    logits, teacher_logits = torch.randn(8, 50, dtype=torch.float64), torch.randn(8, 50, dtype=torch.float64) * 2
    targets = torch.zeros(8, dtype=torch.long)
    logp = torch.log_softmax(teacher_logits, dim=-1)
    full = _autograd_chunk_loss(logits, targets, (None, logp), 1.0, 1.0)
    kls = []
    for k in (1, 5, 20, 49, 50):
        values, indices = logp.topk(k, dim=-1)
        kls.append(float(_autograd_chunk_loss(logits, targets, (indices, values), 1.0, 1.0)))
    # coarser buckets never show more divergence (the KL of coarsened distributions is no larger), and every
    # one is a KL of distributions: not negative
    assert all(0.0 <= a <= b + 1e-12 for a, b in zip(kls, kls[1:])), kls
    assert kls[-1] == pytest.approx(float(full), rel=1e-10)  # k = vocabulary: the full KL
    # dropping the rest (renormalising nothing) would not be a distribution: the bucket is what makes it 1
    values, _ = logp.topk(5, dim=-1)
    assert float(values.exp().sum(dim=-1).max()) < 1.0


def test_keep_layer_indices_are_evenly_spaced_with_both_ends():
    assert keep_layer_indices(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert keep_layer_indices(4, 2) == [0, 3]
    assert keep_layer_indices(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(UserError, match="keep_layers: 6, but the teacher has 5"):
        keep_layer_indices(5, 6)


def test_a_pruned_copy_runs_the_teachers_own_layers(tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(_tiny_teacher_folder(tmp_path)).eval()
    student = AutoModelForCausalLM.from_pretrained(_tiny_teacher_folder(tmp_path)).eval()
    kept = prune_layers(student, 2)
    assert kept == [0, 3] and student.config.num_hidden_layers == 2
    x = torch.randint(3, 600, (1, 9))
    with torch.no_grad():  # by hand: the teacher's embedding, its layers 0 and 3, its norm and head
        h = teacher.model.embed_tokens(x)
        position_ids = torch.arange(9)[None]
        rope = teacher.model.rotary_emb(h, position_ids)
        mask = torch.full((9, 9), float("-inf")).triu(1)[None, None]
        for i in kept:
            h = teacher.model.layers[i](h, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)
            h = h[0] if isinstance(h, tuple) else h
        expected = teacher.lm_head(teacher.model.norm(h))
        assert torch.allclose(student(x).logits, expected, atol=1e-5)
    student.save_pretrained(tmp_path / "pruned", safe_serialization=True)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        assert torch.allclose(again(x).logits, student(x).logits, atol=1e-6)


def test_the_cache_with_k_as_large_as_the_vocabulary_gives_the_online_loss(tmp_path):
    from tunesmith.data import build_datasets
    from tunesmith.data.batching import collate
    from tunesmith.data.build import _tokenizer_fingerprint
    from tunesmith.distill.cache import TeacherCache, build_cache, describe
    from tunesmith.distill.run import Distiller
    from tunesmith.distill.teacher import load_teacher
    from tunesmith.models.loader import load_model
    from tunesmith.train.packing import make_pass, plan_passes

    folder = _tiny_teacher_folder(tmp_path)
    cfg = _cfg(tmp_path, folder)
    teacher = load_teacher(cfg, "cpu", torch.float32)
    vocab = len(teacher.tokenizer)
    bundle = build_datasets(cfg.data, teacher.tokenizer, cache_dir=tmp_path / "tok")
    rows = bundle.train[:12]
    about = describe(str(folder), 2.0, vocab, vocab, _tokenizer_fingerprint(teacher.tokenizer))
    # built from packed passes of another size than training uses: rows are found by their ids
    build_cache(tmp_path / "cache", teacher, [(make_pass(g), g) for g in plan_passes(rows, 100)], about)
    cache = TeacherCache(tmp_path / "cache", about)
    assert cache.rows == 12
    torch.manual_seed(3)
    student = load_model(str(folder), cfg.model_copy(update={"method": "full"}), torch.float32)
    from tunesmith.distill.prune import prune_layers

    prune_layers(student, 2)
    student.eval()
    online, offline = Distiller(teacher, 2.0, 0.5), Distiller(None, 2.0, 0.5, cache)
    for unit in (make_pass(rows[:5]), collate(rows[5:9], teacher.tokenizer.pad_token_id)):
        a, n_a = online.loss_sum(student, unit)
        b, n_b = offline.loss_sum(student, unit)
        assert n_a == n_b > 0
        assert float(b) == pytest.approx(float(a), rel=1e-5), (float(a), float(b))
    small = describe(str(folder), 2.0, 8, vocab, _tokenizer_fingerprint(teacher.tokenizer))
    with pytest.raises(UserError, match="another top_k 700"):
        TeacherCache(tmp_path / "cache", small)
    shard = next((tmp_path / "cache").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(UserError, match="checksum differs"):
        TeacherCache(tmp_path / "cache", about)


def test_alpha_one_moves_a_pruned_student_towards_the_teacher(tmp_path, log_lines):
    from tunesmith import api

    teacher = _tiny_teacher_folder(tmp_path)
    cfg = _cfg(tmp_path, teacher, "student.prune.keep_layers=2", "method=full", "distill.alpha=1.0",
               "training.max_steps=15", "training.learning_rate=3e-3", "training.batch_size=8")
    messages = log_lines
    summary = api.distill(cfg, tmp_path / "run")
    train = summary["train"]
    assert train["final_loss"] < 0.7 * train["first_loss"], train  # the loss is T^2 KL alone: it fell
    d = json.loads((tmp_path / "run" / "distill.json").read_text())
    assert d["mode"] == "logits" and d["pruned_layers_kept"] == [0, 3]
    assert d["student"]["parameters"] < d["teacher"]["parameters"]
    assert d["student"]["size_on_disk_bytes"] < d["teacher"]["size_on_disk_bytes"]
    assert "heldout_loss" in d["teacher"] and "heldout_loss" in d["student"]
    assert "Distillation: teacher vs student" in (tmp_path / "run" / "report.md").read_text()
    assert any("logits from its forward pass" in m for m in messages)


def test_different_tokenizers_switch_to_sequence_level_and_say_so(tmp_path, log_lines):
    from tunesmith import api

    teacher = _tiny_teacher_folder(tmp_path, layers=2, vocab_size=700)
    student = _tiny_teacher_folder(tmp_path, layers=2, vocab_size=500)
    cfg = _cfg(tmp_path, teacher, f"student.name={student}", "distill.max_new_tokens=6", "training.max_steps=2")
    messages = log_lines
    summary = api.distill(cfg, tmp_path / "run")
    assert summary["distill"]["mode"] == "sequence"
    assert any("sequence level" in m and "tokenizer differs" in m for m in messages), messages
    answers = [json.loads(line) for line in (tmp_path / "run" / "teacher-answers.jsonl").read_text().splitlines()]
    assert len(answers) == 36  # every training row (40 less the 10% validation), with the teacher's answer
    assert all(a["messages"][-1]["role"] == "assistant" for a in answers)
    validation = (tmp_path / "run" / "validation.jsonl").read_text().splitlines()
    assert len(validation) == 4 and "-" in json.loads(validation[0])["messages"][-1]["content"]  # the data's own


def test_train_refuses_a_distillation_config(tmp_path, capsys):
    from tunesmith.cli import main

    config = tmp_path / "d.yaml"
    config.write_text("teacher:\n  name: runs/x\n")
    assert main(["train", str(config)]) == 2
    assert "tunesmith distill" in capsys.readouterr().err


def test_a_4bit_teacher_teaches_a_lora_student(tmp_path):
    from tunesmith import api
    from tunesmith.hardware import four_bit_status

    available, detail = four_bit_status()
    if not available:
        pytest.skip(f"4-bit not available here: {detail}")
    teacher = _tiny_teacher_folder(tmp_path)
    cfg = _cfg(tmp_path, teacher, "teacher.load_in_4bit=true", "student.prune.keep_layers=2", "method=lora",
               "training.max_steps=4", "training.learning_rate=1e-2")
    summary = api.distill(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()  # the student trained LoRA
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "train"]
    assert len(losses) == 4 and all(loss == loss for loss in losses) and losses[-1] < losses[0]
    # the student is the pruned copy of the (unquantised) teacher weights
    assert summary["distill"]["pruned_layers_kept"] == [0, 3]


def test_load_in_4bit_quantises_the_teachers_linear_layers(tmp_path):
    from tunesmith.distill.teacher import load_teacher
    from tunesmith.hardware import four_bit_status

    available, detail = four_bit_status()
    if not available:
        pytest.skip(f"4-bit not available here: {detail}")
    teacher = load_teacher(_cfg(tmp_path, _tiny_teacher_folder(tmp_path), "teacher.load_in_4bit=true"), "cpu",
                           torch.float32)
    kinds = {type(m).__name__ for m in teacher.model.modules()}
    assert "Linear4bit" in kinds
