"""The run's tokenizer as llama.cpp's GGUF vocabulary (`tokenizer.*` keys), and the Ollama Modelfile for ChatML.

Two kinds of tokenizer go into a GGUF, each in the shape llama.cpp's own converter (convert_hf_to_gguf.py)
writes it:

- byte-level BPE (GPT-2 style: SmolLM, Llama 3, Qwen2/Qwen3, Mistral's newer tokenizers) as llama.cpp's "gpt2"
  model: the tokens, their types, the merges, and the name of the split regex (`tokenizer.ggml.pre`).
- sentencepiece-style BPE with byte fallback (Gemma, Phi-3, Llama 2: pieces spelled with "▁" for a space, 256
  `<0xNN>` byte tokens for what no piece covers) as llama.cpp's "llama" model: the pieces, their types and a
  score each.  llama.cpp's sentencepiece tokenizer merges, among neighbouring symbols, the pair whose joined
  piece has the highest score (llm_tokenizer_spm_session in src/llama-vocab.cpp), so the score of a piece is
  minus the rank of the first merge of tokenizer.json that makes it: the merge order Hugging Face's tokenizer
  applies.  Whether a space goes in front of the text (`tokenizer.ggml.add_space_prefix`) comes from the
  tokenizer's normalizer (Phi-3, Llama 2: a "▁" is prepended; Gemma: none).

The special tokens (bos/eos/unk/pad ids), the merges of a byte-level BPE and the chat template are read by the
`gguf` package's own `SpecialVocab`, from the tokenizer saved as the run saved it, as the converter does.
Whether a BOS/EOS is added to plain text is written from what the tokenizer does (it is never left out: without
the key llama.cpp falls back to a per-tokenizer default, e.g. adding a BOS for Llama 3's split).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from tunesmith.errors import UserError

# The split regex of Llama 3's tokenizer.json.  llama.cpp calls it "llama-bpe" and Qwen2's "qwen2": the names
# transformers' GGUF tokenizer reader maps to these regexes (GGUF_PRE_TOKENIZER_SPLITS in
# transformers/integrations/gguf/gguf_tokenizer_mapping.py).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPACE = "\u2581"  # "▁", sentencepiece's spelling of a space
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # sentencepiece's byte-fallback pieces, <0x00> .. <0xFF>

_REFUSE_OTHER = ("convert the merged model (`tunesmith merge`) with llama.cpp's convert_hf_to_gguf.py instead.")


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


def _is_replace(part: dict | None, old: str, new: str) -> bool:
    return bool(part) and part.get("type") == "Replace" and (part.get("pattern") or {}).get("String") == old \
        and part.get("content") == new


def _space_prefix(normalizer: dict | None, pre: dict | None) -> bool | None:
    """Whether a sentencepiece-style tokenizer puts a "▁" in front of the text, read from its normalizer and
    pre-tokenizer; None for a shape llama.cpp's sentencepiece tokenizer does not reproduce (llama.cpp writes
    every space as "▁", optionally prepends one, and never splits the text before merging)."""
    steps = (normalizer.get("normalizers") or []) if normalizer and normalizer.get("type") == "Sequence" \
        else [normalizer] if normalizer else []
    prepend = bool(steps) and steps[0].get("type") == "Prepend" and steps[0].get("prepend") == _SPACE
    rest = steps[1:] if prepend else steps
    if len(rest) == 1 and _is_replace(rest[0], " ", _SPACE):
        # Gemma's pre-tokenizer splits on " ", which the normalizer has already replaced: it never splits
        if pre is None or (pre.get("type") == "Split" and (pre.get("pattern") or {}).get("String") == " "):
            return prepend
        return None
    if not steps and pre and pre.get("type") == "Metaspace" and pre.get("replacement") == _SPACE \
            and not pre.get("split", True):
        # llama.cpp puts a "▁" before the text and after every special token ("prefix with space if previous is
        # special" in llama_vocab::impl::tokenize), which is "always"; "first" (only before the text, as
        # transformers' Llama tokenizer has it) would split text after a special token differently.
        return {"always": True, "never": False}.get(pre.get("prepend_scheme", "always"))
    return None


def _sentencepiece_decoder(decoder: dict | None) -> bool:
    parts = (decoder.get("decoders") or []) if decoder and decoder.get("type") == "Sequence" else []
    return any(_is_replace(p, _SPACE, " ") for p in parts) and any(p.get("type") == "ByteFallback" for p in parts)


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    """tokenizer.json's merges, either "left right" strings or [left, right] lists (transformers >= 4.45)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _special_vocab(tokenizer, vocab_size: int, model_config, byte_level: bool):
    """The gguf package's reading of the tokenizer's special tokens, merges and chat template, from the tokenizer
    (and the model config, which fills ids the tokenizer leaves unset) saved the way a run saves them."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="tunesmith-gguf-") as folder:
        tokenizer.save_pretrained(folder)
        if model_config is not None:
            model_config.to_json_file(str(Path(folder) / "config.json"))
        return gguf.SpecialVocab(folder, load_merges=byte_level, n_vocab=vocab_size)


def gguf_vocabulary(tokenizer, vocab_size: int, model_config=None) -> dict:
    """The tokenizer as llama.cpp's vocabulary, one token for each of the model's `vocab_size` embedding rows
    (ids the tokenizer does not use become unused "[PADn]" tokens).  Keys: model ("gpt2" or "llama"), pre,
    tokens, types, scores (sentencepiece only), add_space_prefix (sentencepiece only), special (a
    gguf.SpecialVocab: ids, merges, chat template), add_bos, add_eos."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    byte_level = model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel"
    sentencepiece = model.get("type") == "BPE" and bool(model.get("byte_fallback")) and _sentencepiece_decoder(decoder)
    if not (byte_level or sentencepiece):
        raise UserError(
            "the run's tokenizer is neither a byte-level BPE (GPT-2 style) nor a sentencepiece-style BPE with byte "
            f"fallback (Gemma, Phi-3 style), the two kinds tunesmith writes into GGUF; {_REFUSE_OTHER}"
        )
    if byte_level:
        pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
        space_prefix = None
        if pre is None:
            raise UserError(
                "the run's tokenizer splits text before merging in a way tunesmith cannot name for llama.cpp (it "
                f"knows GPT-2's, Qwen2's and Llama 3's splits), so a GGUF would tokenize differently; {_REFUSE_OTHER}"
            )
    else:
        pre = "default"  # what llama.cpp's converter writes for a sentencepiece vocabulary
        space_prefix = _space_prefix(spec.get("normalizer"), spec.get("pre_tokenizer"))
        if space_prefix is None:
            raise UserError(
                "the run's sentencepiece-style tokenizer normalizes or splits text in a way llama.cpp's "
                f"sentencepiece tokenizer does not (it only writes spaces as \"▁\" and may prepend one); {_REFUSE_OTHER}"
            )

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UserError(
            f"the run's tokenizer has token ids up to {max(by_id)} but the model has only {vocab_size} embedding "
            "rows, so the GGUF could not embed them; check that the run's tokenizer belongs to its model."
        )
    added = tokenizer.added_tokens_decoder  # id -> AddedToken, for the tokens added on top of the merges
    pairs = _merge_pairs(model.get("merges") or [])
    rank = {}  # piece -> rank of the first merge that makes it (sentencepiece scores)
    for index, (left, right) in enumerate(pairs):
        rank.setdefault(left + right, index)
    unmerged = -float(len(pairs) + 1)  # below every merged piece: single characters, bytes, added tokens
    tokens, types, scores = [], [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        score = unmerged
        if token is None:
            token, kind, score = f"[PAD{index}]", TokenType.UNUSED, unmerged - 1
        elif index in added:
            kind = TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED
        elif sentencepiece and index == tokenizer.unk_token_id:
            kind = TokenType.UNKNOWN
        elif sentencepiece and _BYTE_PIECE.fullmatch(token):
            kind = TokenType.BYTE
        else:
            kind = TokenType.NORMAL
            score = -float(rank[token]) if token in rank else unmerged
        tokens.append(token)
        types.append(int(kind))
        scores.append(score)

    # Whether the tokenizer adds BOS/EOS to plain text, seen from what it does rather than from a flag.
    with_special = tokenizer("Hi", add_special_tokens=True)["input_ids"]
    plain = tokenizer("Hi", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "model": "gpt2" if byte_level else "llama",
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "scores": None if byte_level else scores,
        "add_space_prefix": space_prefix,
        "special": _special_vocab(tokenizer, vocab_size, model_config, byte_level),
        "add_bos": bos is not None and with_special[:1] == [bos] and plain[:1] != [bos],
        "add_eos": eos is not None and with_special[-1:] == [eos] and plain[-1:] != [eos],
    }


# llama.cpp reads meaning into a model's name (llama_vocab::impl::load, "set attributes by model name"): when
# general.name contains "phi3" or "phi-3", every special token swallows the whitespace after it except <unk>, <s>
# and <|endoftext|> (Phi-3's tokenizer.json marks its added tokens so: rstrip), and the file fails to load unless
# the vocabulary has <unk>, <s>, </s> and <|endoftext|>.
_PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)
_PHI3_KEEP_SPACE = ("<unk>", "<s>", "<|endoftext|>")


def _strips_like_phi3(tokenizer) -> bool:
    """Whether the tokenizer's added tokens swallow the whitespace after them exactly where llama.cpp's Phi-3
    rule makes them."""
    if not all(token in tokenizer.get_vocab() for token in (*_PHI3_KEEP_SPACE, "</s>")):
        return False
    return all(bool(added.rstrip) == (added.content not in _PHI3_KEEP_SPACE)
               for added in tokenizer.added_tokens_decoder.values())


def llamacpp_model_name(name: str, tokenizer, model_type: str) -> str:
    """The general.name to write: it says "phi-3" exactly when the tokenizer treats whitespace after special
    tokens as Phi-3's does (added to a Phi-3 model's name that lacks it, taken out of any other name), so that
    llama.cpp's tokenizer splits chat-templated text as the run's tokenizer does."""
    if _strips_like_phi3(tokenizer):
        return name if _PHI3_NAME.search(name) or model_type != "phi3" else f"phi-3-{name}"
    return _PHI3_NAME.sub("phi", name)


def write_vocabulary(writer, vocab: dict) -> None:
    """Add `vocab` (from `gguf_vocabulary`) to a gguf.GGUFWriter."""
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if vocab["scores"] is not None:
        writer.add_token_scores(vocab["scores"])
    if vocab["add_space_prefix"] is not None:
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    special = vocab["special"]
    special.add_special_token = {}  # written below from what the tokenizer does
    special.add_to_gguf(writer, quiet=True)  # merges, special token ids, chat template
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])


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
