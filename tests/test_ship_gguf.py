"""`tunesmith export --format gguf`: the file transformers' own GGUF loader reads back computes what the run's
merged model computes (logits, greedy tokens, tokenization, chat template), q8_0 is smaller and close, the
Ollama Modelfile carries the template, and what cannot be exported is refused with a sentence."""

import json
import math

import pytest
import torch

from tunesmith.cli import build_parser
from tunesmith.errors import UserError
from tunesmith.ship.gguf_export import (
    chatml_layout,
    export_gguf,
    interleave_rotary_halves,
)

PROMPT = "What is the capital of France? The capital of France is"


def _tiny_folder(root, family: str, tokenizer=None, tie: bool = False):
    """A random two-layer model of `family` saved as a Hugging Face folder (models.run_folder's "folder" kind), with
    norms and biases moved off their initial ones and zeros so that a misplaced one shows."""
    from conftest import build_tiny_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    tokenizer = tokenizer or build_tiny_tokenizer()
    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=1024, tie_word_embeddings=tie,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.05)
    folder = root / f"tiny-{family}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model.eval(), tokenizer


def _read_back(path, tokenizer: bool = True):
    """The GGUF file as transformers' own loader builds it: (model, tokenizer or None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if tokenizer else None


def _metadata(path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


@torch.no_grad()
def _greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def _logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0]  # [T, V]


def test_interleaving_makes_pairwise_rotation_equal_rotation_by_halves():
    """The reason for the reorder: Hugging Face's rotary embedding (halves) on the original rows gives the
    same attention scores as llama.cpp's (neighbouring pairs) on the reordered rows."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    heads, head_dim, width, positions = 2, 8, 16, 5
    assert interleave_rotary_halves(torch.arange(8.0)[:, None], 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    torch.manual_seed(0)
    w_q, w_k = torch.randn(heads * head_dim, width), torch.randn(heads * head_dim, width)
    x = torch.randn(positions, width)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)  # [d/2]
    angles = torch.arange(positions).float()[:, None] * inv_freq  # [T, d/2]

    def by_halves(w):  # Hugging Face: [B, H, T, d]
        return (x @ w.T).view(positions, heads, head_dim).transpose(0, 1)[None]

    emb = torch.cat([angles, angles], dim=-1)  # [T, d]
    q, k = apply_rotary_pos_emb(by_halves(w_q), by_halves(w_k), emb.cos()[None], emb.sin()[None])
    hf_scores = q[0] @ k[0].transpose(-1, -2)  # [H, T, T]

    def by_pairs(w):  # llama.cpp's normal rope: dimensions 2i and 2i+1 turn together by angle i
        y = (x @ interleave_rotary_halves(w, heads).T).view(positions, heads, head_dim // 2, 2)
        even, odd = y[..., 0], y[..., 1]
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [T, 1, d/2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).view(positions, heads, head_dim)

    cpp_scores = torch.einsum("thd,shd->hts", by_pairs(w_q), by_pairs(w_k))
    assert torch.allclose(hf_scores, cpp_scores, atol=1e-4)
    # without the reorder the two disagree: the test can fail
    plain = (x @ w_q.T).view(positions, heads, head_dim)
    assert not torch.allclose(plain, by_pairs(w_q), atol=1e-2)


@pytest.mark.parametrize("family,tie,pre", [("llama", False, "gpt-2"), ("mistral", False, "gpt-2"),
                                            ("qwen2", True, "qwen2"), ("llama", True, "llama-bpe")])
def test_f16_and_q8_0_read_back_by_transformers(tmp_path, family, tie, pre):
    from conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    if pre != "gpt-2":  # a family's own split regex before the byte-level BPE, as Qwen2's and Llama 3's have
        from tokenizers import Regex, pre_tokenizers
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        from tunesmith.ship.gguf_vocab import _LLAMA3_SPLIT

        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX if pre == "qwen2" else _LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    folder, model, tokenizer = _tiny_folder(tmp_path, family, tokenizer, tie=tie)
    ids = tokenizer(PROMPT)["input_ids"]
    expected = _logits(model, ids)

    f16 = export_gguf(folder, tmp_path / "out" / "model-f16.gguf", quant="f16")
    q8 = export_gguf(folder, tmp_path / "out" / "model-q8_0.gguf", quant="q8_0")
    # 2-D: embedding, output unless tied, 7 projections a layer; 1-D: 2 norms a layer, the final norm, and
    # Qwen2's q/k/v biases
    assert f16["tensor_types"] == {"F16": 1 + (not tie) + 7 * 2, "F32": 2 * 2 + 1 + 3 * 2 * (family == "qwen2")}
    assert q8["tensor_types"] == {"Q8_0": 1 + (not tie) + 7 * 2, "F32": 2 * 2 + 1 + 3 * 2 * (family == "qwen2")}
    assert q8["bytes"] < 0.75 * f16["bytes"]

    meta = _metadata(tmp_path / "out" / "model-f16.gguf")
    assert meta["general.architecture"] == ("qwen2" if family == "qwen2" else "llama")
    arch = meta["general.architecture"]
    assert (meta[f"{arch}.block_count"], meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"],
            meta[f"{arch}.embedding_length"], meta[f"{arch}.feed_forward_length"]) == (2, 4, 2, 64, 128)
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert meta["tokenizer.ggml.pre"] == pre
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["general.file_type"] == 1 and _metadata(tmp_path / "out" / "model-q8_0.gguf")["general.file_type"] == 7

    scale = float(expected.std())
    for path, tolerance in ((tmp_path / "out" / "model-f16.gguf", 0.01), (tmp_path / "out" / "model-q8_0.gguf", 0.1)):
        loaded, loaded_tokenizer = _read_back(path)
        for text in (PROMPT, "Tell me a joke. 2 + 3 = 5!\n\nBonjour.", "In 1999 and 2024, it's 12345 o'clock."):
            assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded_tokenizer.chat_template == tokenizer.chat_template
        error = float((_logits(loaded, ids) - expected).abs().max())
        assert error < tolerance * scale, (path.name, error, scale)
        if "f16" in path.name:
            assert error < 0.01 * scale
            assert _greedy(loaded, ids, 12) == _greedy(model, ids, 12)


# Chat templates in the shape of Gemma's and Phi-3's own (a turn is <start_of_turn>ROLE ... <end_of_turn>, or
# <|ROLE|> ... <|end|>).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LONG_PROMPT = ("Summarise the dialogue. Doctor: How are you feeling today? Patient: I have trouble breathing when I "
               "run. The meeting is at three thirty on Friday.")
TEXTS = (PROMPT, "Tell me a joke. 2 + 3 = 5!\n\nBonjour.", "In 1999 and 2024, it's 12345 o'clock.", "  two  spaces",
         "Ünïcödé ☃ and emoji 🙂 fall back to bytes.")


def build_sentencepiece_tokenizer(style: str):
    """A sentencepiece-style BPE trained in memory on the tiny corpus: pieces spelled with "▁" for a space, the 256
    byte pieces <0x00>..<0xFF> for what no piece covers, a BOS added to text.  `style` "gemma": Gemma's shape (no
    "▁" in front of the text, <bos>/<eos>, turns in <start_of_turn>); "phi3": Phi-3's (a "▁" in front, Llama 2's
    <unk>/<s>/</s>, <|user|> ... <|end|> turns)."""
    from conftest import TINY_CORPUS
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    gemma = style == "gemma"
    specials = (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"] if gemma
                else ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"])
    lines = [line for line in TINY_CORPUS.split("\n") if line]
    learner = Tokenizer(models.BPE())
    learner.train_from_iterator([("" if gemma else "▁") + text.replace(" ", "▁") for text in lines + ["\n\n".join(lines)]],
                                trainers.BpeTrainer(vocab_size=420, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {piece: index for index, piece in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    replace = normalizers.Replace(" ", "▁")
    core.normalizer = replace if gemma else normalizers.Sequence([normalizers.Prepend("▁"), replace])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                     + ([] if gemma else [decoders.Strip(" ", 1, 0)]))
    bos = "<bos>" if gemma else "<s>"
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                        special_tokens=[(bos, vocab[bos])])
    # Phi-3's turn markers (and </s>) swallow the whitespace after them, as its tokenizer.json marks them
    core.add_special_tokens([AddedToken(token, special=True, normalized=False,
                                        rstrip=not gemma and token not in ("<unk>", "<s>", "<|endoftext|>"))
                             for token in specials])
    eos = "<end_of_turn>" if gemma else "<|end|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                        pad_token="<pad>" if gemma else eos)
    tokenizer.chat_template = GEMMA_TEMPLATE if gemma else PHI3_TEMPLATE
    return tokenizer


def _family_folder(root, family: str):
    """A random two-layer model of `family` ("qwen3", "gemma", "gemma2", "gemma3", "phi3", "phi3-longrope") with
    a tokenizer of its family's kind, saved as a Hugging Face folder; norms moved off their initial values so
    that a missed +1 or a misplaced norm shows."""
    from conftest import build_tiny_tokenizer
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig, Phi3Config, Qwen3Config
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    if family == "qwen3":
        tokenizer = build_tiny_tokenizer()
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tokenizer = build_sentencepiece_tokenizer("gemma" if family.startswith("gemma") else "phi3")
    common = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1024,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    # Gemma 2/3 at a head size of 256, their own: llama.cpp (and transformers' GGUF reader) scale queries by it
    gemma_windows = dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=16)
    config = {
        # Qwen3's head size of 128 (its models' own, not hidden / heads): transformers' GGUF reader assumes it
        "qwen3": lambda: Qwen3Config(**common, head_dim=128, tie_word_embeddings=False),
        "gemma": lambda: GemmaConfig(**common, head_dim=32),  # a head size that is not hidden / heads
        "gemma2": lambda: Gemma2Config(**common, **gemma_windows),
        "gemma3": lambda: Gemma3TextConfig(
            **common, **gemma_windows, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        ),
        "phi3": lambda: Phi3Config(**common, original_max_position_embeddings=1024),
        "phi3-longrope": lambda: Phi3Config(
            **{**common, "max_position_embeddings": 4096}, original_max_position_embeddings=1024,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + i / 16 for i in range(8)],
                             "long_factor": [2.0 + i for i in range(8)]},
        ),
    }[family]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    folder = root / f"tiny-{family}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model.eval(), tokenizer


# llama.cpp's tensor names for each family, and the Hugging Face module each comes from (llama.cpp's
# src/models/<arch>.cpp, load_arch_tensors): written out here rather than taken from the gguf package the exporter uses.
_ATTENTION = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj"}
_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA2_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
LLAMACPP_BLOCK = {
    "qwen3": {"attn_norm": "input_layernorm", **_ATTENTION, **_QK_NORMS, "ffn_norm": "post_attention_layernorm", **_MLP},
    "gemma": {"attn_norm": "input_layernorm", **_ATTENTION, "ffn_norm": "post_attention_layernorm", **_MLP},
    "gemma2": {**_GEMMA2_NORMS, **_ATTENTION, **_MLP},
    "gemma3": {**_GEMMA2_NORMS, **_ATTENTION, **_QK_NORMS, **_MLP},
    "phi3": {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"},
}


def _gguf_tensors(path) -> dict:
    """name -> float32 array (q8_0 dequantised), from the file as the gguf package reads it."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    tensors = {}
    for tensor in GGUFReader(path).tensors:
        data = tensor.data if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) \
            else dequantize(tensor.data, tensor.tensor_type)
        tensors[tensor.name] = torch.from_numpy(data.astype("float32")).reshape(list(reversed(tensor.shape.tolist())))
    return tensors


@pytest.mark.parametrize("family", ["qwen3", "gemma", "gemma2", "gemma3", "phi3", "phi3-longrope"])
def test_family_tensors_and_metadata_as_llamacpp_expects(tmp_path, family):
    """Every tensor llama.cpp loads for the family is in the file under its name, with the Hugging Face weight's
    shape and values after the converter's transform (Gemma norms + 1), nothing else is; the architecture's keys
    carry the family's quirks, and the tokenizer is written in its kind."""
    folder, model, tokenizer = _family_folder(tmp_path, family)
    arch = {"gemma3": "gemma3", "phi3-longrope": "phi3"}.get(family, family)
    config, hf = model.config, model.state_dict()
    gemma = family.startswith("gemma")
    expected = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if not config.tie_word_embeddings:
        expected["output.weight"] = hf["lm_head.weight"]
    for layer in range(2):
        for name, module in LLAMACPP_BLOCK[arch].items():
            expected[f"blk.{layer}.{name}.weight"] = hf[f"model.layers.{layer}.{module}.weight"]
    if gemma:
        expected = {name: value + 1 if "norm" in name else value for name, value in expected.items()}
    rope = config.rope_parameters
    if family == "phi3-longrope":
        expected["rope_factors_long.weight"] = torch.tensor(rope["long_factor"])
        expected["rope_factors_short.weight"] = torch.tensor(rope["short_factor"])

    for quant in ("f16", "q8_0", "f32"):
        export_gguf(folder, tmp_path / f"{quant}.gguf", quant=quant)
    for path, tolerance in ((tmp_path / "f16.gguf", 2e-3), (tmp_path / "q8_0.gguf", 2e-2), (tmp_path / "f32.gguf", 0)):
        tensors = _gguf_tensors(path)
        assert sorted(tensors) == sorted(expected), path.name
        for name, want in expected.items():
            assert tensors[name].shape == want.shape, name
            scale = float(want.abs().max())
            assert float((tensors[name] - want.float()).abs().max()) <= tolerance * scale, (path.name, name)

    assert _metadata(tmp_path / "f32.gguf")["general.file_type"] == 0  # all f32
    meta = _metadata(tmp_path / "f16.gguf")
    assert meta["general.architecture"] == arch
    head_dim = config.head_dim if gemma or family == "qwen3" else 16
    assert (meta[f"{arch}.block_count"], meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"],
            meta[f"{arch}.embedding_length"], meta[f"{arch}.feed_forward_length"]) == (2, 4, 2, 64, 128)
    assert meta[f"{arch}.rope.dimension_count"] == head_dim
    if head_dim != 16:
        assert meta[f"{arch}.attention.key_length"] == meta[f"{arch}.attention.value_length"] == head_dim
    assert meta.get(f"{arch}.attn_logit_softcapping") == (50.0 if arch == "gemma2" else None)
    assert meta.get(f"{arch}.final_logit_softcapping") == (30.0 if arch == "gemma2" else None)
    if arch in ("gemma2", "gemma3"):
        assert meta[f"{arch}.attention.sliding_window"] == 16
        assert meta[f"{arch}.attention.sliding_window_pattern"] == [True, False]
    if arch == "gemma3":
        assert meta["gemma3.rope.freq_base"] == 1_000_000.0 and meta["gemma3.rope.freq_base_swa"] == 10_000.0
        assert (meta["gemma3.rope.scaling.type"], meta["gemma3.rope.scaling.factor"]) == ("linear", 4.0)
    if arch == "phi3":
        assert meta["phi3.rope.scaling.original_context_length"] == 1024
    if family == "phi3-longrope":
        assert meta["phi3.rope.scaling.type"] == "longrope"
        assert math.isclose(meta["phi3.rope.scaling.attn_factor"], math.sqrt(1 + math.log(4) / math.log(1024)),
                            rel_tol=1e-6)

    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert (meta.get("tokenizer.ggml.bos_token_id"), meta["tokenizer.ggml.eos_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id)
    if family == "qwen3":
        assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
        assert meta["tokenizer.ggml.add_bos_token"] is False
        assert len(meta["tokenizer.ggml.merges"]) > 100
    else:  # sentencepiece: pieces with scores, byte pieces typed BYTE (6), a space prefix for Phi-3 only
        assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("llama", "default")
        assert meta["tokenizer.ggml.add_space_prefix"] is (not gemma)
        assert meta["tokenizer.ggml.add_bos_token"] is True
        tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
        assert tokens[: len(tokenizer)] == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
        assert all(types[tokens.index(f"<0x{b:02X}>")] == 6 for b in range(256))
        assert types[tokenizer.bos_token_id] == 3  # CONTROL
        assert len(meta["tokenizer.ggml.scores"]) == config.vocab_size
        assert "tokenizer.ggml.merges" not in meta  # llama.cpp merges sentencepiece pieces by score


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "phi3"])
def test_family_read_back_by_transformers(tmp_path, family):
    """transformers' own GGUF loader (which reads Qwen3, Gemma 2 and Phi-3 files as llama.cpp writes them) builds
    a tokenizer that splits text as the run's does (for sentencepiece, from the scores alone) and a model whose
    logits and greedy tokens are the Hugging Face model's."""
    folder, model, tokenizer = _family_folder(tmp_path, family)
    export_gguf(folder, tmp_path / "out" / "f16.gguf", quant="f16")
    loaded, loaded_tokenizer = _read_back(tmp_path / "out" / "f16.gguf")
    for text in (*TEXTS, LONG_PROMPT):
        assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    ids = tokenizer(LONG_PROMPT)["input_ids"]
    assert len(ids) > 16  # past Gemma 2's sliding window
    expected = _logits(model, ids)
    assert float((_logits(loaded, ids) - expected).abs().max()) < 0.01 * float(expected.std())
    assert _greedy(loaded, ids, 12) == _greedy(model, ids, 12)


def test_the_name_says_phi3_exactly_when_special_tokens_strip_like_phi3s():
    """llama.cpp makes special tokens swallow the whitespace after them when general.name contains "phi3"."""
    from tunesmith.ship.gguf_vocab import llamacpp_model_name

    phi3, gemma = build_sentencepiece_tokenizer("phi3"), build_sentencepiece_tokenizer("gemma")
    assert phi3("<|user|>\nHi")["input_ids"][:3] == phi3("<|user|>Hi")["input_ids"][:3]  # the "\n" is swallowed
    assert llamacpp_model_name("run-7", phi3, "phi3") == "phi-3-run-7"
    assert llamacpp_model_name("my-Phi-3-tune", phi3, "phi3") == "my-Phi-3-tune"
    assert llamacpp_model_name("phi3-distilled", gemma, "gemma") == "phi-distilled"
    assert llamacpp_model_name("run-7", gemma, "gemma") == "run-7"


@pytest.mark.parametrize("family,change,message", [
    ("gemma2", {"query_pre_attn_scalar": 128}, r"query_pre_attn_scalar = 128.*by 1/sqrt\(256\)"),
    ("gemma2", {"final_logit_softcapping": None}, "soft-capping off"),
    ("gemma", {"tie_word_embeddings": False}, "output projection of its own"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "soft-caps attention logits"),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 256}}, "'yarn' rotary scaling"),
    ("phi3-longrope", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0],
                                           "long_factor": [1.0]}}, "could not read the model config .*short_factor"),
])
def test_what_llamacpp_would_compute_differently_is_refused(tmp_path, family, change, message):
    folder, _, _ = _family_folder(tmp_path, family)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message):
        export_gguf(folder, tmp_path / "out" / "m.gguf")
    assert not (tmp_path / "out").exists()


def test_a_sentencepiece_tokenizer_llamacpp_cannot_reproduce_is_refused(tmp_path):
    from tokenizers import normalizers

    folder, _, tokenizer = _family_folder(tmp_path, "phi3")
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(),
                                                                   normalizers.Replace(" ", "▁")])
    tokenizer.save_pretrained(folder)
    with pytest.raises(UserError, match="sentencepiece-style tokenizer normalizes or splits text"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.fixture(scope="module")
def tiny_adapter_run(tmp_path_factory):
    """A LoRA run of a tiny Llama (8 steps at a high learning rate, so the merged adapter matters), with a
    system prompt."""
    from test_train import ROWS, _config

    from tunesmith import api

    root = tmp_path_factory.mktemp("gguf")
    folder, _, _ = _tiny_folder(root, "llama")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = _config(folder, data, "training.max_steps=8", "training.learning_rate=1e-2", "lora.dropout=0.0",
                  "eval.enabled=false", "data.system_prompt=You are terse.")
    api.train(cfg, root / "run")
    return root / "run", root


def test_adapter_run_exports_merged_with_a_modelfile(tiny_adapter_run):
    from tunesmith.data import encode_prompt
    from tunesmith.models.run_folder import load_base, load_for_inference, open_run

    run_dir, root = tiny_adapter_run
    out = root / "export" / "tiny.gguf"
    result = export_gguf(run_dir, out, quant="f16", ollama=True)
    assert result["modelfile"] == str(root / "export" / "Modelfile")

    handle = open_run(run_dir)
    merged, tokenizer, _ = load_for_inference(handle, dtype=torch.float32, device="cpu", merged=True)
    ids = encode_prompt([{"role": "system", "content": "You are terse."},
                         {"role": "user", "content": "Say the colour of the sky."}], tokenizer)
    expected = _logits(merged, ids)
    base = _logits(load_base(handle, torch.float32, "causal_lm").eval(), ids)
    assert float((base - expected).abs().max()) > 0.05 * float(expected.std())  # the adapter changed the model

    loaded, _ = _read_back(out)
    assert float((_logits(loaded, ids) - expected).abs().max()) < 0.01 * float(expected.std())
    assert _greedy(loaded, ids, 12) == _greedy(merged, ids, 12)

    modelfile = (root / "export" / "Modelfile").read_text()
    lines = modelfile.splitlines()
    assert "FROM ./tiny.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|im_start|>"' in lines
    assert 'SYSTEM """You are terse."""' in lines  # data.system_prompt wins over the template's default
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template.startswith("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}")
    assert "{{- range .Messages }}" in template and "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in template
    assert template.endswith("{{- end }}<|im_start|>assistant\n")


def test_chatml_layout_reads_the_end_of_turn_and_default_system():
    from conftest import TINY_SYSTEM, build_tiny_tokenizer

    from tunesmith.data.tokens import ensure_chat_template

    assert chatml_layout(build_tiny_tokenizer()) == ("<|im_end|>", TINY_SYSTEM)
    plain = build_tiny_tokenizer(chat_template=None)
    ensure_chat_template(plain)  # tunesmith's own ChatML, no default system message
    assert chatml_layout(plain) == ("<|im_end|>", None)
    llama2 = build_tiny_tokenizer(
        chat_template="{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    assert chatml_layout(llama2) is None


def test_modelfile_without_system_prompt_uses_the_templates_default(tmp_path):
    from conftest import TINY_SYSTEM

    folder, _, _ = _tiny_folder(tmp_path, "llama")
    export_gguf(folder, tmp_path / "out" / "m.gguf", ollama=True)
    assert f'SYSTEM """{TINY_SYSTEM}"""' in (tmp_path / "out" / "Modelfile").read_text().splitlines()


def test_refusals_are_sentences_and_write_nothing(tmp_path):
    from conftest import build_tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tiny_tokenizer()
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    with pytest.raises(UserError, match=r"supports Llama .*Qwen3, Gemma.*Phi-3, and this run's model is gpt2"):
        export_gguf(gpt2, tmp_path / "a.gguf")

    folder, _, _ = _tiny_folder(tmp_path, "llama")
    existing = tmp_path / "existing.gguf"
    existing.write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        export_gguf(folder, existing)
    assert existing.read_text() == "keep me"
    (tmp_path / "Modelfile").write_text("mine")
    with pytest.raises(UserError, match="Modelfile already exists"):
        export_gguf(folder, tmp_path / "new.gguf", ollama=True)
    with pytest.raises(UserError, match="--quant"):
        export_gguf(folder, tmp_path / "new.gguf", quant="q4_0")

    llama2 = build_tiny_tokenizer(chat_template="{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    other, _, _ = _tiny_folder(tmp_path / "inst", "llama", llama2)
    with pytest.raises(UserError, match="not ChatML"):
        export_gguf(other, tmp_path / "inst" / "out" / "m.gguf", ollama=True)
    assert not (tmp_path / "inst" / "out").exists()  # refused before anything was written

    from tokenizers import pre_tokenizers

    words = build_tiny_tokenizer()
    words.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    odd, _, _ = _tiny_folder(tmp_path / "ws", "llama", words)
    with pytest.raises(UserError, match="splits text"):
        export_gguf(odd, tmp_path / "ws" / "m.gguf")
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["existing.gguf"]


def test_export_command_help_and_run(tmp_path, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--help"])
    text = capsys.readouterr().out
    for flag in ("RUN_DIR", "--format", "--quant", "--out FILE", "--ollama", "{f16,q8_0,f32}", "Modelfile"):
        assert flag in text
    folder, _, _ = _tiny_folder(tmp_path, "llama")
    args = parser.parse_args(["export", str(folder), "--format", "gguf", "--quant", "q8_0",
                              "--out", str(tmp_path / "m.gguf")])
    assert args.func(args) == 0
    assert "q8_0" in capsys.readouterr().out
    assert _metadata(tmp_path / "m.gguf")["general.file_type"] == 7


@pytest.mark.slow
def test_builtin_run_round_trips_through_gguf(tmp_path):
    """A tuned built-in SmolLM2 run: the f16 GGUF, read back by transformers, generates the merged model's
    greedy 20 tokens; the q8_0 file's perplexity on 12 held-out rows is within 2% of the f16 file's."""
    from pathlib import Path

    from tunesmith import api
    from tunesmith.config import load_config
    from tunesmith.data import encode_prompt, prompt_and_references
    from tunesmith.data.build import load_eval_rows
    from tunesmith.models.run_folder import load_for_inference, open_run
    from tunesmith.train.objective import Objective
    from tunesmith.train.validation import heldout_loss

    examples = Path(__file__).resolve().parent.parent / "examples"
    test_file = examples / "data" / "dates-test.jsonl"
    cfg = load_config(examples / "quickstart.yaml", [
        f"data.path={examples / 'data' / 'dates-train.jsonl'}", f"data.test_path={test_file}",
        "training.max_steps=5", "training.batch_size=4", "eval.enabled=false",  # batch 4 (not 8): half the time
    ])
    run_dir = tmp_path / "run"
    api.train(cfg, run_dir)
    f16 = export_gguf(run_dir, tmp_path / "smol-f16.gguf", quant="f16")
    q8 = export_gguf(run_dir, tmp_path / "smol-q8_0.gguf", quant="q8_0")
    assert q8["bytes"] < 0.6 * f16["bytes"]

    merged, tokenizer, _ = load_for_inference(open_run(run_dir), dtype=torch.float32, device="cpu", merged=True)
    _, samples, rows = load_eval_rows(str(test_file), "data.test_path", cfg.data, tokenizer)
    prompts = [encode_prompt(prompt_and_references(sample)[0], tokenizer) for sample in samples[:2]]
    objective = Objective("causal_lm", tokenizer)

    loaded, loaded_tokenizer = _read_back(tmp_path / "smol-f16.gguf")
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    for prompt, sample in zip(prompts, samples):
        text = prompt_and_references(sample)[0][-1]["content"]
        assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert _greedy(loaded, prompt, 20) == _greedy(merged, prompt, 20)
    f16_loss = heldout_loss(loaded, rows[:12], 12, "cpu", objective)
    del loaded
    q8_loss = heldout_loss(_read_back(tmp_path / "smol-q8_0.gguf", tokenizer=False)[0], rows[:12], 12, "cpu", objective)
    merged_loss = heldout_loss(merged, rows[:12], 12, "cpu", objective)
    assert math.isclose(f16_loss["perplexity"], merged_loss["perplexity"], rel_tol=0.002)
    assert math.isclose(q8_loss["perplexity"], f16_loss["perplexity"], rel_tol=0.02)
