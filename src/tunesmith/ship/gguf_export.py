"""`tunesmith export RUN_DIR --format gguf --quant f16|q8_0 --out FILE [--ollama]`: the run's model, adapter
merged in, as one GGUF file that llama.cpp, Ollama and transformers (`gguf_file=`) load, optionally with an
Ollama `Modelfile` beside it.

Families: the Llama family (SmolLM, the built-in model, is a Llama), Mistral, Qwen2, Qwen3, Gemma, Gemma 2,
Gemma 3 (text) and Phi-3, each under the llama.cpp architecture convert_hf_to_gguf.py gives it (Mistral is
written as `llama`, as the converter does: the two share tensors and rotary layout).  What goes into the file:

- the weights under llama.cpp's tensor names, looked up in the `gguf` package's own tables
  (gguf.get_tensor_name_map: token_embd, blk.N.attn_q, ..., output_norm, and output when the output projection is
  not the embedding matrix).  2-D weights are f16, or q8_0 (blocks of 32 weights sharing one f16 scale: 8.5 bits
  a weight) where a row is a whole number of blocks; norms, biases and rope factors stay f32, as llama.cpp's own
  converter keeps them.  Per family, what the converter does to them:
  - `llama`: the query and key rows of every head reordered (see `interleave_rotary_halves`): llama.cpp rotates
    neighbouring pairs where Hugging Face's Llama rotates halves.  Qwen2/3, Gemma and Phi-3 are rotated by halves
    in llama.cpp too, so they are written as they are.
  - Gemma (1, 2, 3): every RMS-norm weight + 1.  Hugging Face's GemmaRMSNorm scales by (1 + weight), llama.cpp's
    RMS norm by the weight.  The embedding scale (x sqrt(hidden size)) is applied by llama.cpp's Gemma graphs
    themselves, and Gemma's output projection is always the embedding matrix.
  - Gemma 2/3: the extra norms (post-attention, pre- and post-feed-forward) under their own names; Qwen3 and
    Gemma 3: the per-head query/key norms (attn_q_norm, attn_k_norm).
  - Phi-3: the fused query-key-value projection (attn_qkv) and the fused gate-up projection (ffn_up, gate rows
    first) kept fused: llama.cpp's phi3 graph splits them itself.  With LongRoPE scaling, the short and long
    per-frequency factors as rope_factors_short / rope_factors_long.
- the hyper-parameters llama.cpp reads: context length, widths, head counts, head size, RMS-norm epsilon, rope
  base and dimension count, linear or LongRoPE rope scaling; Gemma 2's attention and final-logit soft-capping,
  and for Gemma 2/3 the sliding window with which layers use it (`attention.sliding_window_pattern`, one flag a
  layer, from the model's `layer_types`) and Gemma 3's rope base for those layers.
- the tokenizer (see `tunesmith.ship.gguf_vocab`): the vocabulary, the special token ids, whether a BOS is added,
  and the chat template the run trained with (`tokenizer.chat_template`).

What llama.cpp cannot compute the way the model does is refused with a sentence before anything is written: a
Gemma 2/3 whose query scale is not the one llama.cpp hard-codes, soft-capping llama.cpp does not apply, rope
scaling other than linear (and Phi-3's LongRoPE), a Gemma whose output projection is its own matrix.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.data.tokens import ensure_chat_template
from tunesmith.errors import UserError
from tunesmith.fileio import atomic_write_file, atomic_write_text
from tunesmith.models.run_folder import load_for_inference, load_tokenizer_for, open_run
from tunesmith.ship.gguf_vocab import (
    chatml_layout,
    gguf_vocabulary,
    llamacpp_model_name,
    ollama_modelfile,
    write_vocabulary,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch is imported where it is used: `tunesmith --help` should not wait for it
    import torch

QUANTS = ("f16", "q8_0", "f32")

# Hugging Face model_type -> llama.cpp architecture (a gguf.MODEL_ARCH member name), as convert_hf_to_gguf.py
# registers them (its LlamaModel, Qwen2Model, Qwen3Model, GemmaModel, Gemma2Model, Gemma3Model, Phi3MiniModel).
ARCHITECTURES = {
    "llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3",
    "gemma": "GEMMA", "gemma2": "GEMMA2", "gemma3_text": "GEMMA3", "phi3": "PHI3",
}
FAMILY_NAMES = "Llama (SmolLM), Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text) and Phi-3"
_GEMMAS = ("gemma", "gemma2", "gemma3_text")
# Layer count at which llama.cpp takes a Gemma 2/3 for the 27B model and scales queries by 1/sqrt(hidden / heads)
# instead of 1/sqrt(head size) (src/models/gemma2.cpp and gemma3.cpp, load_arch_hparams).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}
_REFUSE_OTHER = "convert the merged model (`tunesmith merge`) with llama.cpp's convert_hf_to_gguf.py instead."


def interleave_rotary_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder a query or key projection's rows, head by head, from rotate-by-halves to rotate-by-pairs.

    Hugging Face's Llama rotates dimension i of a head together with dimension i + d/2; llama.cpp's `llama`
    architecture rotates dimensions 2i and 2i+1 together (the layout of Meta's original checkpoints, which
    Hugging Face's conversion script permuted).  Putting row i at 2i and row i + d/2 at 2i + 1 makes both
    rotate the same pairs by the same angle; queries and keys move alike, so attention scores are unchanged.
    This is the permutation llama.cpp's convert_hf_to_gguf.py applies (LlamaModel.permute); transformers'
    GGUF loader undoes it (LlamaTensorProcessor._reverse_permute_weights in modeling_gguf_pytorch_utils.py).
    Works on a bias too (one row each).
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    split = weight.reshape(n_heads, 2, half, *weight.shape[1:])  # [heads, (first half, second half), d/2, ...]
    return split.transpose(1, 2).reshape(weight.shape)  # [heads, d/2, 2, ...] -> rows 2i, 2i+1 = i, i + d/2


def _rope(config, layer_type: str = "full_attention") -> dict:
    """The rotary parameters (rope_type, rope_theta, factor...) of one kind of layer: transformers 5 keeps one
    dict, or one per layer type (Gemma 3: full_attention, sliding_attention)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        rope = dict(rope.get(layer_type) or rope.get("full_attention") or {})
    rope.setdefault("rope_type", "default")
    return rope


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_dims(config) -> int:
    """How many dimensions of each head rotate (all of them, or Phi-3's `partial_rotary_factor` of them)."""
    factor = _rope(config).get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    return int(_head_dim(config) * factor)


def _arch_name(config) -> str:
    """llama.cpp's name of the architecture the model is written as ("llama", "gemma3", ...)."""
    import gguf

    return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[ARCHITECTURES[config.model_type]]]


def _model_config(handle):
    """The run's model config (of the base for an adapter run), read without loading weights."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    source = handle.source if handle.kind == "adapter" else str(handle.weights)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=handle.cfg.model.trust_remote_code)
    except (OSError, ValueError, KeyError, StrictDataclassError) as exc:  # transformers validates rope_parameters
        reason = " ".join(str(exc).split())  # transformers' validation messages span lines
        raise UserError(f"could not read the model config of {source} ({reason}); check that the folder is complete "
                        "and its config.json valid.") from None


def _check_architecture(config) -> None:
    """Refuse, with a sentence, a model llama.cpp would read but compute differently."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"GGUF export supports {FAMILY_NAMES}, and this run's model is {model_type or 'of an unknown type'}; "
            f"{_REFUSE_OTHER}"
        )
    rope = _rope(config)
    allowed = ("default", "linear", "longrope") if model_type == "phi3" else ("default", "linear")
    if rope["rope_type"] not in allowed:
        raise UserError(
            f"the model uses {rope['rope_type']!r} rotary scaling, which tunesmith's GGUF export does not write (it "
            f"writes plain and linear rotary embeddings, and Phi-3's LongRoPE); {_REFUSE_OTHER}"
        )
    if model_type in ("gemma", "gemma2") and not config.tie_word_embeddings:
        raise UserError(
            f"this {model_type} model has an output projection of its own (tie_word_embeddings is false), and "
            f"llama.cpp's {model_type} architecture always reuses the embedding matrix; {_REFUSE_OTHER}"
        )
    if model_type == "gemma3_text" and _rope(config, "sliding_attention")["rope_type"] != "default":
        raise UserError(f"the model scales the rotary embeddings of its sliding-window layers, which llama.cpp's "
                        f"gemma3 architecture does not; {_REFUSE_OTHER}")
    if model_type in _GEMMA_27B_LAYERS:
        big = config.num_hidden_layers == _GEMMA_27B_LAYERS[model_type]
        expected = config.hidden_size // config.num_attention_heads if big else _head_dim(config)
        if config.query_pre_attn_scalar != expected:
            raise UserError(
                f"the model scales queries by 1/sqrt(query_pre_attn_scalar = {config.query_pre_attn_scalar}), and "
                f"llama.cpp scales a {config.num_hidden_layers}-layer {model_type} by 1/sqrt({expected}); the GGUF "
                "would compute a different model. Export a model whose query_pre_attn_scalar is "
                f"{expected}, or {_REFUSE_OTHER}"
            )
    if model_type == "gemma2" and (config.attn_logit_softcapping is None or config.final_logit_softcapping is None):
        raise UserError(
            "this Gemma 2 model turns attention or final-logit soft-capping off, and llama.cpp's gemma2 "
            f"architecture always applies both; {_REFUSE_OTHER}"
        )
    if model_type == "gemma3_text" and getattr(config, "attn_logit_softcapping", None) is not None:
        raise UserError(f"this Gemma 3 model soft-caps attention logits, which llama.cpp's gemma3 architecture "
                        f"does not; {_REFUSE_OTHER}")


def _sliding_layers(config) -> list[bool]:
    """One flag a layer: True where the layer attends over a sliding window (Gemma 2/3's `layer_types`)."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [kind == "sliding_attention" for kind in types]


def _write_hyperparameters(writer, config, quant: str) -> None:
    """The architecture's keys (`{arch}.context_length`, ...), through gguf.GGUFWriter's add_* methods, which
    spell them from gguf.Keys."""
    import gguf

    model_type = config.model_type
    heads = config.num_attention_heads
    head_dim = _head_dim(config)
    rope = _rope(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(_rope_dims(config))
    writer.add_rope_freq_base(float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0))
    if head_dim != config.hidden_size // heads or model_type in _GEMMAS:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "f32": gguf.LlamaFileType.ALL_F32}[quant]
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    if model_type == "phi3":  # as Phi3MiniModel.set_gguf_parameters writes them
        original = rope.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None) or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))  # llama.cpp ignores it for phi3
        if rope["rope_type"] == "longrope":
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            # cos and sin are multiplied by this in both (transformers' _compute_longrope_parameters, llama.cpp's
            # rope_attn_factor)
            writer.add_rope_scaling_attn_factors(float(ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")[1]))
    if model_type == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if model_type == "gemma3_text" and config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if model_type in _GEMMA_27B_LAYERS:
        # written even when no layer slides: without them llama.cpp's gemma2 slides every other layer over 4096
        writer.add_sliding_window(int(config.sliding_window or 0))
        writer.add_sliding_window_pattern(_sliding_layers(config))
    if model_type == "gemma3_text":
        writer.add_rope_freq_base_swa(float(_rope(config, "sliding_attention")["rope_theta"]))


def _tensors(model, arch, quant: str):
    """(GGUF name, array, ggml type) for every weight, renamed by the gguf package's name map, reordered or
    shifted as llama.cpp's converter does for the family, and converted."""
    import gguf
    import numpy as np
    import torch

    config = model.config
    model_type = config.model_type
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    types = gguf.GGMLQuantizationType
    block = gguf.GGML_QUANT_SIZES[types.Q8_0][0]  # 32 weights share a scale

    def converted(gguf_name: str, array):
        if array.ndim == 1 or quant == "f32":
            return gguf_name, array, types.F32  # norms, biases, rope factors; everything for f32
        if quant == "q8_0" and array.shape[-1] % block == 0:
            return gguf_name, gguf.quants.quantize(array, types.Q8_0), types.Q8_0  # uint8 [rows, row bytes]
        return gguf_name, array.astype(np.float16), types.F16

    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and (config.tie_word_embeddings or model_type in ("gemma", "gemma2")):
            continue  # llama.cpp reuses token_embd when there is no output tensor
        found = names.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise UserError(f"the model has a tensor {name} that the GGUF {gguf.MODEL_ARCH_NAMES[arch]} layout has "
                            f"no place for; {_REFUSE_OTHER}")
        kind, gguf_name = found
        data = tensor.detach().to("cpu", torch.float32)
        if arch == gguf.MODEL_ARCH.LLAMA and kind == gguf.MODEL_TENSOR.ATTN_Q:
            data = interleave_rotary_halves(data, heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and kind == gguf.MODEL_TENSOR.ATTN_K:
            data = interleave_rotary_halves(data, kv_heads)
        if model_type in _GEMMAS and name.endswith("norm.weight"):
            data = data + 1  # GemmaRMSNorm: x * (1 + weight)
        yield converted(gguf_name, data.numpy())

    rope = _rope(config)
    if rope["rope_type"] == "longrope":  # Phi3MiniModel.generate_extra_tensors
        for kind, key in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"),
                          (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor")):
            yield converted(gguf.TENSOR_NAMES[kind] + ".weight", np.asarray(rope[key], dtype=np.float32))


def write_gguf(path: Path, model, tokenizer, vocab: dict, name: str, quant: str) -> dict:
    """Write `model` (a merged model of one of the families in ARCHITECTURES) and `tokenizer`, whose llama.cpp
    vocabulary is `vocab` (gguf_vocabulary), to the GGUF file `path`; returns how many tensors of each type went
    in."""
    import gguf

    config = model.config
    arch = gguf.MODEL_ARCH[ARCHITECTURES[config.model_type]]

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(llamacpp_model_name(name, tokenizer, config.model_type))
    writer.add_type(gguf.GGUFType.MODEL)
    _write_hyperparameters(writer, config, quant)
    write_vocabulary(writer, vocab)

    counts: dict[str, int] = {}
    for gguf_name, array, ggml_type in _tensors(model, arch, quant):
        writer.add_tensor(gguf_name, array, raw_dtype=ggml_type)
        counts[ggml_type.name] = counts.get(ggml_type.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def export_gguf(run_dir: str | Path, out_file: str | Path, quant: str = "f16", ollama: bool = False) -> dict:
    """Export RUN_DIR's model (adapter merged in, in float32 first) to the GGUF file `out_file` in `quant`
    (f16 or q8_0), written at a temporary name and then renamed; with `ollama`, also a Modelfile beside it.
    Nothing that exists is written over.  Returns where things went and what the file holds."""
    import torch

    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: give one of {', '.join(QUANTS)}.")
    out_file = Path(out_file)
    if out_file.exists():
        raise UserError(f"--out {out_file} already exists; tunesmith never writes over a file. Give a new file name "
                        "(or delete that one first).")
    modelfile = out_file.parent / "Modelfile"
    if ollama and modelfile.exists():
        raise UserError(f"--ollama: {modelfile} already exists and tunesmith never writes over it; give an --out in "
                        "another folder (or delete that Modelfile first).")

    handle = open_run(run_dir)
    config = _model_config(handle)
    _check_architecture(config)
    # Checked before the weights load: a tokenizer or template that cannot be exported stops here.
    tokenizer = load_tokenizer_for(handle)
    ensure_chat_template(tokenizer)  # what training did, so the file carries the template the run used
    vocab = gguf_vocabulary(tokenizer, config.vocab_size, config)
    layout = None
    if ollama:
        layout = chatml_layout(tokenizer)
        if layout is None:
            raise UserError(
                "--ollama: the run's chat template is not ChatML, the only one tunesmith translates into Ollama's "
                "template syntax; export without --ollama (the GGUF carries the template in tokenizer.chat_template) "
                "and write the Modelfile's TEMPLATE by hand."
            )
        system = handle.cfg.data.system_prompt or layout[1]
        if system and '"""' in system:
            raise UserError('--ollama: data.system_prompt contains """, which a Modelfile SYSTEM line cannot hold; '
                            "remove it from the system prompt.")

    window = getattr(config, "sliding_window", None)
    windowed = config.model_type in ("mistral", "phi3") or getattr(config, "use_sliding_window", False)
    if window and windowed and window < config.max_position_embeddings:
        log.info(f"export: note: the model attends over a sliding window of {window} tokens; llama.cpp's "
                 f"{_arch_name(config)} architecture has none, so prompts longer than that are read with full "
                 "attention (as llama.cpp's own converter does).")

    log.info(f"export: loading {handle.path} ({handle.kind}{', merging the adapter' if handle.kind == 'adapter' else ''})")
    model, _, _ = load_for_inference(handle, dtype=torch.float32, device="cpu", merged=True)
    log.info(f"export: writing {out_file} ({quant})")
    counts: dict[str, int] = {}

    def fill(tmp: Path) -> None:
        counts.update(write_gguf(tmp, model, tokenizer, vocab, handle.path.name, quant))

    atomic_write_file(out_file, fill)
    result = {
        "path": str(out_file),
        "quant": quant,
        "bytes": out_file.stat().st_size,
        "architecture": _arch_name(config),
        "tensor_types": counts,
        "modelfile": None,
    }
    if ollama:
        end, _ = layout
        atomic_write_text(modelfile, ollama_modelfile(out_file.name, end, system))
        result["modelfile"] = str(modelfile)
    size = result["bytes"] / 2**20
    log.info(f"export: wrote {out_file} ({size:.1f} MiB; tensors: "
           + ", ".join(f"{n} {kind.lower()}" for kind, n in counts.items()) + ")")
    if ollama:
        log.info(f"export: wrote {modelfile}; make an Ollama model with: cd {modelfile.parent} && "
               "ollama create NAME -f Modelfile")
    return result
