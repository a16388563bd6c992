"""`tunesmith export RUN_DIR --format gguf --quant f16|q8_0 --out FILE [--ollama]`: the run's model, adapter
merged in, as one GGUF file that llama.cpp, Ollama and transformers (`gguf_file=`) load, optionally with an
Ollama `Modelfile` beside it.

What goes into the file, for the Llama family (SmolLM, the built-in model, is a Llama), Mistral and Qwen2:

- the weights under llama.cpp's tensor names (token_embd, blk.N.attn_q, ..., output_norm, and output when
  the output projection is not the embedding matrix).  2-D weights are f16, or q8_0 (blocks of 32 weights
  sharing one f16 scale: 8.5 bits a weight) where a row is a whole number of blocks; norms and biases stay
  f32, as llama.cpp's own converter keeps them.
- for the `llama` architecture, the query and key rows of every head reordered (see
  `interleave_rotary_halves`): llama.cpp rotates neighbouring pairs where Hugging Face's Llama rotates halves.
  Qwen2 is rotated by halves in llama.cpp too, so it is written as it is (transformers' GGUF loader, which
  reads llama.cpp's files, undoes the reorder for `llama` files only).
- the hyper-parameters llama.cpp reads (context length, widths, head counts, RMS-norm epsilon, rope base).
- the tokenizer as a byte-level BPE ("gpt2") vocabulary: tokens, their types, merges, the special ids, whether
  a BOS is added, and the chat template the run trained with (`tokenizer.chat_template`).

Mistral is written as `llama`, as llama.cpp's converter does (the two share tensors and rotary layout).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.data.tokens import ensure_chat_template
from tunesmith.errors import UserError
from tunesmith.fileio import atomic_write_file, atomic_write_text
from tunesmith.models.run_folder import load_for_inference, load_tokenizer_for, open_run

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch is imported where it is used: `tunesmith --help` should not wait for it
    import torch

QUANTS = ("f16", "q8_0")

# Hugging Face model_type -> llama.cpp architecture (a gguf.MODEL_ARCH member name).
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}

# Hugging Face module (inside model.layers.N) -> llama.cpp tensor kind (a gguf.MODEL_TENSOR member name);
# the same for all three families.
_BLOCK_TENSORS = {
    "input_layernorm": "ATTN_NORM",
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "post_attention_layernorm": "FFN_NORM",
    "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
}
_MODEL_TENSORS = {"model.embed_tokens": "TOKEN_EMBD", "model.norm": "OUTPUT_NORM", "lm_head": "OUTPUT"}

# The split regex of Llama 3's tokenizer.json.  llama.cpp calls it "llama-bpe" and Qwen2's "qwen2": the names
# transformers' GGUF tokenizer reader maps to these regexes (GGUF_PRE_TOKENIZER_SPLITS in
# transformers/integrations/gguf/gguf_tokenizer_mapping.py).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


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


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name (tokenizer.ggml.pre) for how a byte-level BPE tokenizer splits text before merging,
    from its tokenizer.json `pre_tokenizer`; None when it is none of the splits named here."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

    def byte_level(part: dict, own_regex: bool) -> bool:
        return (part.get("type") == "ByteLevel" and bool(part.get("use_regex", True)) == own_regex
                and not part.get("add_prefix_space"))

    if not pre:
        return None
    if byte_level(pre, own_regex=True):
        return "gpt-2"  # GPT-2's split regex, built into ByteLevel
    parts = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[0].get("behavior") == "Isolated"
            and not parts[0].get("invert") and byte_level(parts[1], own_regex=False)):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        return {QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}.get(regex)
    return None


def gguf_vocabulary(tokenizer, vocab_size: int) -> dict:
    """The tokenizer as llama.cpp's byte-level BPE ("gpt2") vocabulary, one token for each of the model's
    `vocab_size` embedding rows (ids the tokenizer does not use become unused "[PADn]" tokens)."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise UserError(
            "the run's tokenizer is not a byte-level BPE (GPT-2 style) tokenizer, the only kind tunesmith writes "
            "into GGUF (sentencepiece-style ones, as in Llama 2 and older Mistral models, are not supported); "
            "convert the merged model (`tunesmith merge`) with llama.cpp's convert_hf_to_gguf.py instead."
        )
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise UserError(
            "the run's tokenizer splits text before merging in a way tunesmith cannot name for llama.cpp (it "
            "knows GPT-2's, Qwen2's and Llama 3's splits), so a GGUF would tokenize differently; convert the "
            "merged model (`tunesmith merge`) with llama.cpp's convert_hf_to_gguf.py instead."
        )
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UserError(
            f"the run's tokenizer has token ids up to {max(by_id)} but the model has only {vocab_size} embedding "
            "rows, so the GGUF could not embed them; check that the run's tokenizer belongs to its model."
        )
    added = tokenizer.added_tokens_decoder  # id -> AddedToken, for the tokens added on top of the merges
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            if index in added:
                types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
            else:
                types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    # Whether the tokenizer adds BOS/EOS to plain text, seen from what it does rather than from a flag.
    with_special = tokenizer("Hi", add_special_tokens=True)["input_ids"]
    plain = tokenizer("Hi", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "pre": pre,
        "tokens": tokens,
        "types": [int(t) for t in types],
        "merges": merges,
        "bos": bos,
        "eos": eos,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
        "add_bos": bos is not None and with_special[:1] == [bos] and plain[:1] != [bos],
        "add_eos": eos is not None and with_special[-1:] == [eos] and plain[-1:] != [eos],
    }


def _chatml_text(messages: list[dict], end: str, system: str | None, add_generation_prompt: bool) -> str:
    """What the Ollama TEMPLATE that `ollama_modelfile` writes renders for these messages: ChatML with `end`
    closing each turn, the system turn first (the conversation's own, else `system`)."""
    system = next((m["content"] for m in messages if m["role"] == "system"), system)
    text = f"<|im_start|>system\n{system}{end}\n" if system else ""
    for message in messages:
        if message["role"] != "system":
            text += f"<|im_start|>{message['role']}\n{message['content']}{end}\n"
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def chatml_layout(tokenizer) -> tuple[str, str | None] | None:
    """(end-of-turn text, the template's default system message or None) when the tokenizer's chat template
    is ChatML, checked by rendering a few conversations both ways; None when it is anything else."""
    from jinja2.exceptions import TemplateError

    def render(messages, add_generation_prompt=False):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except (TemplateError, ValueError):
            return None

    user = {"role": "user", "content": "Hello there."}
    alone = render([user])  # ChatML: [<|im_start|>system\nDEFAULT END\n] <|im_start|>user\nHello there.END\n
    turn = "<|im_start|>user\nHello there."
    if not isinstance(alone, str) or turn not in alone or not alone.endswith("\n"):
        return None
    before, end = alone[: alone.index(turn)], alone[alone.index(turn) + len(turn) : -1]
    if not end:
        return None
    default_system = None
    if before:
        head, tail = "<|im_start|>system\n", end + "\n"
        if not (before.startswith(head) and before.endswith(tail)) or len(before) <= len(head) + len(tail):
            return None
        default_system = before[len(head) : -len(tail)]
    system = {"role": "system", "content": "Answer briefly."}
    reply = {"role": "assistant", "content": "Hi! How can I help?"}
    again = {"role": "user", "content": "Tell me a joke."}
    for messages in ([user], [system, user], [user, reply, again], [system, user, reply, again]):
        for add_generation_prompt in (False, True):
            if render(messages, add_generation_prompt) != _chatml_text(messages, end, default_system,
                                                                       add_generation_prompt):
                return None
    return end, default_system


def ollama_modelfile(gguf_name: str, end: str, system: str | None) -> str:
    """An Ollama Modelfile for a ChatML model: FROM the GGUF beside it, a TEMPLATE in Ollama's Go-template
    syntax that renders what `_chatml_text` does, stop parameters for the turn markers, and SYSTEM."""
    # `.System` is the system message (the request's, else SYSTEM below); `.Messages` the conversation, whose
    # system messages are skipped here because `.System` already carries them. `{{-` trims the newline before.
    template = (
        "{{- if .System }}<|im_start|>system\n{{ .System }}" + end + "\n{{ end }}\n"
        "{{- range .Messages }}\n"
        '{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}' + end + "\n{{ end }}\n"
        "{{- end }}<|im_start|>assistant\n"
    )
    lines = [
        "# Written by `tunesmith export`. Make an Ollama model of it with: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
    ]
    for stop in dict.fromkeys([end, "<|im_start|>"]):
        lines.append(f'PARAMETER stop "{stop}"')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def _model_config(handle):
    """The run's model config (of the base for an adapter run), read without loading weights."""
    from transformers import AutoConfig

    source = handle.source if handle.kind == "adapter" else str(handle.weights)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=handle.cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not read the model config of {source} ({exc}); check that the folder is complete.") \
            from None


def _check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"GGUF export supports the Llama family (Llama, SmolLM), Mistral and Qwen2, and this run's model is "
            f"{model_type or 'of an unknown type'}; merge it with `tunesmith merge` and convert that folder with "
            "llama.cpp's convert_hf_to_gguf.py instead."
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(
            f"the model uses {rope['rope_type']!r} rotary scaling, which tunesmith's GGUF export does not write "
            "(it writes plain rotary embeddings only); convert the merged model (`tunesmith merge`) with "
            "llama.cpp's convert_hf_to_gguf.py instead."
        )


def _tensors(model, arch, quant: str):
    """(GGUF name, array, ggml type) for every weight, renamed, reordered and converted."""
    import gguf
    import numpy as np
    import torch

    config = model.config
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    permute = arch == gguf.MODEL_ARCH.LLAMA
    types = gguf.GGMLQuantizationType
    block = gguf.GGML_QUANT_SIZES[types.Q8_0][0]  # 32 weights share a scale
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")  # "model.layers.3.self_attn.q_proj", "weight"
        bid, part = None, module
        if module.startswith("model.layers."):
            bid, _, part = module[len("model.layers."):].partition(".")
            kind = _BLOCK_TENSORS.get(part)
        else:
            kind = _MODEL_TENSORS.get(module)
        if kind is None or leaf not in ("weight", "bias"):
            raise UserError(f"the model has a tensor {name} that the GGUF {gguf.MODEL_ARCH_NAMES[arch]} layout has "
                            "no place for; convert the merged model with llama.cpp's convert_hf_to_gguf.py instead.")
        if module == "lm_head" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        data = tensor.detach().to("cpu", torch.float32)
        if permute and part == "self_attn.q_proj":
            data = interleave_rotary_halves(data, heads)
        elif permute and part == "self_attn.k_proj":
            data = interleave_rotary_halves(data, kv_heads)
        gguf_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]].format(bid=bid) + "." + leaf
        array = data.numpy()
        if array.ndim == 1:
            yield gguf_name, array, types.F32  # norms and biases
        elif quant == "q8_0" and array.shape[-1] % block == 0:
            yield gguf_name, gguf.quants.quantize(array, types.Q8_0), types.Q8_0  # uint8 [rows, row bytes]
        else:
            yield gguf_name, array.astype(np.float16), types.F16


def write_gguf(path: Path, model, tokenizer, name: str, quant: str) -> dict:
    """Write `model` (a merged Llama / Mistral / Qwen2) and `tokenizer` to the GGUF file `path`; returns how
    many tensors of each type went in."""
    import gguf

    config = model.config
    arch = gguf.MODEL_ARCH[ARCHITECTURES[config.model_type]]
    vocab = gguf_vocabulary(tokenizer, config.vocab_size)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden_size / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if vocab[key] is not None:
            add(vocab[key])
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates
        template = [{"name": key, "template": value} for key, value in template.items()]
    if template:
        writer.add_chat_template(template)

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
    gguf_vocabulary(tokenizer, config.vocab_size)
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
    if window and (config.model_type == "mistral" or getattr(config, "use_sliding_window", False)) \
            and window < config.max_position_embeddings:
        log.info(f"export: note: the model attends over a sliding window of {window} tokens; llama.cpp's "
               f"{ARCHITECTURES[config.model_type].lower()} architecture has none, so prompts longer than that are "
               "read with full attention (as llama.cpp's own converter does).")

    log.info(f"export: loading {handle.path} ({handle.kind}{', merging the adapter' if handle.kind == 'adapter' else ''})")
    model, _, _ = load_for_inference(handle, dtype=torch.float32, device="cpu", merged=True)
    log.info(f"export: writing {out_file} ({quant})")
    counts: dict[str, int] = {}

    def fill(tmp: Path) -> None:
        counts.update(write_gguf(tmp, model, tokenizer, handle.path.name, quant))

    atomic_write_file(out_file, fill)
    result = {
        "path": str(out_file),
        "quant": quant,
        "bytes": out_file.stat().st_size,
        "architecture": ARCHITECTURES[config.model_type].lower(),
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
