"""Documents -> question/answer training data: extract a document's text, cut it into token windows, and have a
local model write question/answer pairs about each window.

    extract_text         PDF (pypdf), .txt, .md -> one text, whitespace normalised; a file that cannot give text
                         is a UserError that names it
    chunk_text           token windows of `chunk_tokens` with `overlap` tokens shared by neighbours
    generate_for_chunks  per chunk, `generate_pairs`: ask, parse, validate, retry; progress and cancelling
    model_generator      the `generate` callable for a model name as model.name takes it (the built-in one by
                         default): JSON valid by construction, parsed and validated like any reply
    pairs_to_rows        rows {"question", "answer", "source_chunk", "generated": True} for a JSONL dataset

What makes a pair valid (`QAPair` and `pair_problem`):
  - the reply is JSON: one object {"question": ..., "answer": ...} (or a list of them), optionally inside a
    ```json fence; nothing else around it.  Keys other than the two are ignored.
  - question: text, stripped, at most 300 characters, at least three words, ending with "?".
  - answer: text, stripped, non-empty, at most 1,000 characters, not a copy of the question.
  - grounded, as a floor and not a fact check: the question has content words (words of 4+ letters, not common
    function words, compared by their first 5 letters) and at least half of them occur in the chunk; so do at
    least half of the answer's, when it has any (a short "Yes." has none).  It catches a reply about something else (the prompt's worked example, an invented subject); it
    does not catch a wrong fact about the right subject, so every pair is marked "generated" for a person to
    review.
  - not a repeat of a question already accepted for the same chunk.
"""

from __future__ import annotations

import json
import re
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from tunesmith.api import load_base_chat
from tunesmith.data.tokens import encode_prompt, plain_prompt
from tunesmith.errors import UserError, visible
from tunesmith.fileio import declared_codec
from tunesmith.models.generate import generate_reply
from tunesmith.models.tasks import SEQ2SEQ

DOCUMENT_SUFFIXES = (".pdf", ".txt", ".md", ".markdown")

# --------------------------------------------------------------------------------------------------- extraction


def extract_text(path: Path, shown_name: str | None = None) -> str:
    """The document's text: a PDF's page texts (pypdf) one after another, a .txt/.md file's UTF-8 text (a
    byte-order mark is honoured, so UTF-16/32 with a mark reads too).  Runs of spaces and tabs become one
    space, line ends are stripped, and paragraphs stay apart by one blank line; a PDF's line breaks inside a
    paragraph are layout, not meaning, so they become spaces.

    A file that gives no text is a UserError naming `shown_name` (the user's name for the file; by default
    path.name): a password-protected, damaged or scanned (no text layer) PDF, text that is not UTF-8, an empty
    document, a suffix other than DOCUMENT_SUFFIXES."""
    path = Path(path)
    name = visible(shown_name if shown_name is not None else path.name, 120)
    suffix = path.suffix.lower()
    if suffix not in DOCUMENT_SUFFIXES:
        raise UserError(f"{name}: documents are read from PDF, text and Markdown files ({', '.join(DOCUMENT_SUFFIXES)}); "
                        "save it as one of these and upload it again.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{name} cannot be read ({visible(exc.strerror or exc)}); upload it again.") from None
    if not data:
        raise UserError(f"{name} is empty; upload a document that holds text.")
    text = _pdf_text(path, name) if suffix == ".pdf" else _plain_text(data, name)
    if not text:
        raise UserError(f"{name} holds no text, only blank space; upload a document that holds text.")
    return text


def _pdf_text(path: Path, name: str) -> str:
    import pypdf
    from pypdf.errors import DependencyError, FileNotDecryptedError

    # pypdf raises many kinds of exception on a damaged file (PdfReadError, but also ValueError, KeyError,
    # struct.error, ...): any failure to read is the file's fault here, so every one becomes the same sentence.
    damaged = (f"{name} could not be read as a PDF (the file is damaged or is not a PDF); open it in a PDF viewer "
               "and save or print it to a new PDF, or upload its text as a .txt file.")
    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):  # an owner password alone still opens with ""
            raise FileNotDecryptedError("needs a password")
        pages = []
        for page in reader.pages:
            try:  # layout mode keeps the blank line between paragraphs; plain mode is the fallback
                pages.append(page.extract_text(extraction_mode="layout"))
            except Exception:
                pages.append(page.extract_text())
    except (FileNotDecryptedError, DependencyError):  # DependencyError: AES, which needs the cryptography package
        raise UserError(f"{name} is protected by a password (or encrypted); open it, save a copy without the password "
                        "or encryption (or print it to a new PDF) and upload that.") from None
    except Exception:
        raise UserError(damaged) from None
    text = "\n\n".join(_normalise(page, join_lines=True) for page in pages)
    text = _normalise(text, join_lines=False)
    if not text:
        raise UserError(f"{name} has no text layer (a scanned document, or pages of pictures); run it through OCR "
                        "(e.g. ocrmypdf) or upload its text as a .txt file.")
    return text


def _plain_text(data: bytes, name: str) -> str:
    codec = declared_codec(data) or "utf-8"
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if codec == "utf-8-sig" else 0)  # utf-8-sig counts from after the mark
        line = data.count(b"\n", 0, start) + 1
        raise UserError(f"{name}, line {line:,}: byte 0x{data[start]:02x} is not {codec.upper().replace('-SIG', '')} "
                        "text; the file is probably in another encoding (such as Latin-1 or Windows-1252); save it as "
                        "UTF-8 (most editors offer it under 'Save as') and upload it again.") from None
    if "\x00" in text:
        raise UserError(f"{name} holds NUL characters, so it is not a text file; upload the document's text as a "
                        ".txt or .md file.")
    return _normalise(text, join_lines=False)


_SPACES = re.compile(r"[^\S\n]+")  # white space other than a line break
_BLANK_LINES = re.compile(r"\n{2,}")


def _normalise(text: str, join_lines: bool) -> str:
    """Spaces and tabs collapsed, lines stripped, paragraphs (split by blank lines) one blank line apart; with
    `join_lines` the lines of a paragraph become one line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    paragraphs = [p.strip("\n") for p in _BLANK_LINES.split("\n".join(lines))]
    if join_lines:
        paragraphs = [p.replace("\n", " ") for p in paragraphs]
    return "\n\n".join(p for p in paragraphs if p)


# ----------------------------------------------------------------------------------------------------- chunking


@dataclass
class Chunk:
    index: int  # 0-based position in the document
    text: str  # the window's tokens decoded
    start_token: int  # its first token in the document's token ids (tokenizer, no special tokens)
    n_tokens: int


_SENTENCE_END = (".", "!", "?", '."', '?"', '!"', ".'", ".)")


def chunk_text(text: str, tokenizer, chunk_tokens: int = 256, overlap: int = 32) -> list[Chunk]:
    """The text as windows of at most `chunk_tokens` tokens (the tokenizer's ids, no special tokens), each
    starting `overlap` tokens before the previous one ended, so a fact cut by one boundary is whole in one of
    the two chunks.  A window ends early at a sentence end when one falls in its last quarter (a chunk that
    stops mid-sentence invites a question about half a sentence).  Empty text gives no chunks."""
    if chunk_tokens < 1:
        raise UserError(f"the chunk size is {chunk_tokens} tokens; it must be at least 1.")
    if not 0 <= overlap < chunk_tokens:
        raise UserError(f"the chunk overlap is {overlap} tokens with chunks of {chunk_tokens}; the overlap must be "
                        "at least 0 and smaller than the chunk size.")
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    chunks: list[Chunk] = []
    start = 0
    while start < len(ids):
        end = min(start + chunk_tokens, len(ids))
        if end < len(ids):
            end = _sentence_end(ids, tokenizer, start, end, earliest=max(start + overlap + 1, end - chunk_tokens // 4))
        chunks.append(Chunk(len(chunks), tokenizer.decode(ids[start:end]).strip(), start, end - start))
        if end >= len(ids):
            break
        start = end - overlap
    return chunks


def _sentence_end(ids: list[int], tokenizer, start: int, end: int, earliest: int) -> int:
    """The last position in [earliest, end] where a sentence ends (a token ending in . ! ? followed by a token
    that starts with white space), else `end`."""
    for cut in range(end, max(earliest, start + 1) - 1, -1):
        last = tokenizer.decode(ids[cut - 1:cut])
        if not last.rstrip().endswith(_SENTENCE_END):
            continue
        # the next token's leading space shows only when decoded after another (SentencePiece drops it alone)
        both = tokenizer.decode(ids[cut - 1:cut + 1])
        if both.startswith(last) and both[len(last):len(last) + 1].isspace():
            return cut
    return end


# ------------------------------------------------------------------------------------------ pairs and validation


class QAPair(BaseModel):
    """A question about one fact in a text, and its answer."""

    # What else makes a pair valid (grounding, repeats) is pair_problem's; the module docstring lists it all.

    model_config = ConfigDict(extra="ignore")

    question: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=300)] = Field(
        description="A question, ending with '?', about one fact stated in the text.")
    answer: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)] = Field(
        description="The answer, in a full sentence, using only the text.")

    @field_validator("question")
    @classmethod
    def _is_a_question(cls, value: str) -> str:
        if not value.endswith("?"):
            raise ValueError("a question must end with '?'")
        if len(value.split()) < 3:
            raise ValueError("a question needs at least three words")
        return value


def parse_pairs(text: str) -> list[QAPair]:
    """The pairs in a model's reply: one JSON object or a list of objects, each checked against QAPair; a
    ```json fence around it is allowed.  A ValueError says in a few words why not (not JSON, wrong shape, which
    field fails the schema)."""
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    if fenced:
        body = fenced.group(1)
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at character {exc.pos + 1})") from None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("an empty list, no pair")
    pairs = []
    for number, item in enumerate(items, start=1):
        where = f"item {number}: " if isinstance(value, list) else ""
        if not isinstance(item, dict):
            raise ValueError(f"{where}wrong shape: a JSON object with question and answer was expected, "
                             f"not {type(item).__name__}")
        try:
            pairs.append(QAPair.model_validate(item))
        except ValidationError as exc:
            first = exc.errors()[0]
            field_name = ".".join(str(part) for part in first["loc"]) or "the object"
            raise ValueError(f"{where}{field_name}: {first['msg']}") from None
    return pairs


_STOPWORDS = frozenset(
    "about above after again also because been before being below between both could does doing down during each "
    "from have having here into itself just more most much once only other over same should some such than that "
    "their them then there these they this those through under until very were what when where which while whom "
    "will with would your yours answer question text".split()
)


def content_words(text: str) -> set[str]:
    """Grounding's unit: the lower-cased words of 4+ letters that are not common function words, each cut to its
    first 5 letters (a crude stem: return, returns, returned are one word)."""
    return {w[:5] for w in re.findall(r"[^\W\d_]{4,}", text.lower()) if w not in _STOPWORDS}


GROUNDED_SHARE = 0.5  # the least share of a question's, and of an answer's, content words found in the chunk


def pair_problem(pair: QAPair, chunk_text_: str, earlier: Sequence[QAPair] = ()) -> str | None:
    """Why `pair` is not kept for the chunk beyond the schema (None: kept): a question or answer not grounded in
    the chunk (fewer than GROUNDED_SHARE of its content words are in it), an answer that repeats the question,
    a question already accepted."""
    words = content_words(chunk_text_)
    if not content_words(pair.question):
        return "the question names nothing from the chunk (it has no content word)"
    for name, text in (("question", pair.question), ("answer", pair.answer)):
        own = content_words(text)  # an answer may have none ("Yes.")
        if own and len(own & words) < GROUNDED_SHARE * len(own):
            return f"the {name} is not grounded in the chunk ({len(own & words)} of its {len(own)} content words are in it)"
    if _key(pair.answer) == _key(pair.question):
        return "the answer repeats the question"
    if any(_key(pair.question) == _key(e.question) for e in earlier):
        return "the question repeats an earlier one"
    return None


def _key(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


# ------------------------------------------------------------------------------------------------------ prompts

QA_SYSTEM_PROMPT = (
    "You write question and answer pairs for training data. Each question asks about one fact stated in the "
    "given text; the answer states that fact in a full sentence, using only the text. Reply with JSON only, "
    "matching this JSON schema: " + json.dumps(QAPair.model_json_schema(), separators=(",", ":"))
)

# One worked example in the conversation (a small model copies a format it has seen far more faithfully than one
# it was told about).  Its subject shares nothing with a real document, and the grounding check refuses a reply
# that copies it.
_EXAMPLE_TEXT = ("The Millbrook library opens at 9 a.m. on weekdays and at noon on Saturdays. Members may borrow "
                 "up to eight books at a time for three weeks.")
_EXAMPLE_PAIR = {"question": "How many books can a member of the Millbrook library borrow at a time?",
                 "answer": "A member can borrow up to eight books at a time."}

JSON_PREFIX = '{"question": "'  # how every reply starts: the generator may prefill it


def qa_messages(chunk_text_: str, asked: Sequence[str] = ()) -> list[dict]:
    """The conversation that asks for one pair about `chunk_text_`; `asked` are questions already accepted
    for it (the model is told to ask something else)."""
    def request(text: str, avoid: Sequence[str]) -> str:
        ask = "".join(f"\n- {q}" for q in avoid)
        other = f"\n\nAsk something other than:{ask}" if avoid else ""
        return f"Text:\n{text}\n\nWrite one question about this text and its answer as JSON.{other}"

    return [
        {"role": "system", "content": QA_SYSTEM_PROMPT},
        {"role": "user", "content": request(_EXAMPLE_TEXT, ())},
        {"role": "assistant", "content": json.dumps(_EXAMPLE_PAIR)},
        {"role": "user", "content": request(chunk_text_, asked)},
    ]


# --------------------------------------------------------------------------------------------------- generation

Generate = Callable[[list[dict], str, int], str]
"""generate(messages, prefix, attempt) -> the assistant's whole reply, which should start with `prefix` (the
generator may prefill it); `attempt` counts the tries for the same pair from 0 (0: decode greedily, later
ones: sample, so that a retry can differ)."""


@dataclass
class ChunkResult:
    chunk_index: int
    pairs: list[QAPair]
    attempts: int  # replies asked for
    retries: int  # replies asked for again after a refused one (at most max_retries)
    error: str | None  # None when n_pairs were kept, else why the chunk has fewer
    failures: list[str] = field(default_factory=list)  # why each refused reply was refused, in order
    stopped: bool = False  # should_stop ended it before it was done


def generate_pairs(generate: Generate, chunk: Chunk, n_pairs: int = 1, max_retries: int = 3,
                   should_stop: Callable[[], bool] | None = None) -> ChunkResult:
    """Up to `n_pairs` valid pairs about `chunk`, asked for one at a time; a reply that fails (not JSON,
    schema, grounding, repeat) is asked for again, `max_retries` times for the chunk in all.  When the retries
    run out, the chunk keeps the pairs it has and `error` says why it has fewer.  `should_stop` is asked
    before every reply; when true the result comes back with `stopped` set."""
    pairs: list[QAPair] = []
    failures: list[str] = []
    attempts = retries = try_number = 0
    error = None
    while len(pairs) < n_pairs:
        if should_stop is not None and should_stop():
            return ChunkResult(chunk.index, pairs, attempts, retries, "stopped", failures, stopped=True)
        reply = generate(qa_messages(chunk.text, [p.question for p in pairs]), JSON_PREFIX, try_number)
        attempts += 1
        reason = None
        try:
            kept = 0
            for pair in parse_pairs(reply):
                reason = pair_problem(pair, chunk.text, pairs)
                if reason is None and len(pairs) < n_pairs:
                    pairs.append(pair)
                    kept += 1
            if kept:
                reason = None
        except ValueError as exc:
            reason = str(exc)
        if reason is None:
            try_number = 0
            continue
        failures.append(reason)
        if retries >= max_retries:
            error = f"no valid pair after {attempts} replies (last: {reason})" if not pairs else \
                f"{len(pairs)} of {n_pairs} pairs after {attempts} replies (last: {reason})"
            break
        retries += 1
        try_number += 1
    return ChunkResult(chunk.index, pairs, attempts, retries, error, failures)


def generate_for_chunks(generate: Generate, chunks: Sequence[Chunk], n_pairs: int = 1, max_retries: int = 3,
                        on_progress: Callable[[int, int], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> list[ChunkResult]:
    """generate_pairs for each chunk in order; `on_progress(done, total)` after each one.  `should_stop` is
    asked before each chunk and each reply: when true, the results of the chunks finished so far come back (a
    chunk stopped half-way is left out, its pairs with it), so fewer results than chunks means it stopped."""
    results: list[ChunkResult] = []
    for chunk in chunks:
        if should_stop is not None and should_stop():
            break
        result = generate_pairs(generate, chunk, n_pairs, max_retries, should_stop)
        if result.stopped:
            break
        results.append(result)
        if on_progress is not None:
            on_progress(len(results), len(chunks))
    return results


RETRY_TEMPERATURE = 0.8  # a retry samples (top-p 0.95): a greedy retry of the same prompt would repeat the reply
_VALUE_STOPS = ('"', "\n")  # a JSON string value ends at its closing quote; a line break ends it too


def model_generator(model_name: str, max_new_tokens: int = 200,
                    cancelled: threading.Event | None = None) -> Generate:
    """The `generate` callable for a model as model.name names it (the built-in smollm2-135m-instruct, a hub
    id, a local folder, a .gguf file), loaded once with tunesmith.api.load_base_chat.

    A small model is unreliable at writing JSON, so the reply is JSON by construction: the assistant turn is
    prefilled with `{"question": "`, the model writes the question until its closing quote (or a line break),
    then `", "answer": "` is appended and it writes the answer the same way, and `"}` closes the object.  What
    the model wrote is escaped as JSON string content (a stray backslash cannot break the JSON).  The result
    is then parsed and validated like any model's reply (parse_pairs, pair_problem): the construction makes
    the syntax right, not the content.  A value cut short (its share of `max_new_tokens` ran out, or
    `cancelled` was set) is returned unclosed, so it fails to parse instead of passing as a pair.  The
    question gets a third of `max_new_tokens` (at most 64 tokens), the answer the rest.

    Attempt 0 decodes greedily; attempt k samples at RETRY_TEMPERATURE with a seed from the prompt and k (so
    a run repeats).  A `prefix` other than JSON_PREFIX is prefilled and the model writes the rest of the reply
    freely; a seq2seq model (no assistant turn to prefill) writes the whole reply.  Either must then be JSON by
    itself."""
    model, tokenizer, task, _system = load_base_chat(model_name)
    question_budget = max(16, min(64, max_new_tokens // 3))
    answer_budget = max(16, max_new_tokens - question_budget)

    def generate(messages: list[dict], prefix: str, attempt: int) -> str:
        sampling = {"temperature": 0.0}
        if attempt > 0:
            seed = zlib.crc32(json.dumps(messages).encode("utf-8")) + attempt
            sampling = {"temperature": RETRY_TEMPERATURE, "top_p": 0.95, "seed": seed}
        if task == SEQ2SEQ:
            ids = list(tokenizer(plain_prompt(messages))["input_ids"])
            return generate_reply(model, tokenizer, ids, max_new_tokens, cancelled=cancelled, **sampling).text
        prompt = encode_prompt(messages, tokenizer)

        def write(text: str, budget: int, stop=()):
            ids = prompt + list(tokenizer(text, add_special_tokens=False)["input_ids"])
            return generate_reply(model, tokenizer, ids, budget, stop=stop, cancelled=cancelled, **sampling)

        if prefix != JSON_PREFIX:
            return prefix + write(prefix, max_new_tokens).text
        text = prefix
        for key, budget in (("question", question_budget), ("answer", answer_budget)):
            if key != "question":
                text += f'", "{key}": "'
            piece = write(text, budget, _VALUE_STOPS)
            text += json.dumps(piece.text.rstrip("\\"), ensure_ascii=False)[1:-1]
            if piece.finish_reason != "stop":  # cut short: leave the JSON unclosed, so it is not taken as a pair
                return text
        return text + '"}'

    return generate


# --------------------------------------------------------------------------------------------------------- rows


def pairs_to_rows(results: Sequence[ChunkResult]) -> list[dict]:
    """Every kept pair as a dataset row: {"question", "answer", "source_chunk", "generated": True}.  tunesmith's
    reader takes question/answer as the prompt/completion format (data/formats.py) and ignores the other two
    columns, so the rows train as they are."""
    return [
        {"question": pair.question, "answer": pair.answer, "source_chunk": result.chunk_index, "generated": True}
        for result in results
        for pair in result.pairs
    ]
