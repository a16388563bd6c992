"""Documents -> question/answer data (tunesmith.studio.documents): text out of PDF/TXT/Markdown or a sentence that
names the file, token chunks that overlap, replies parsed and validated with retries, progress and stopping, and
(slow) the built-in model writing a valid pair for every chunk of a PDF, whose rows then train."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
from conftest import REPEAT_ROWS, save_tiny_model_folder

from tunesmith import api
from tunesmith.config import DataConfig
from tunesmith.data.formats import detect_format, to_samples
from tunesmith.data.read import read_records
from tunesmith.errors import UserError
from tunesmith.studio.documents import (
    DOCUMENT_SUFFIXES,
    JSON_PREFIX,
    QA_SYSTEM_PROMPT,
    Chunk,
    QAPair,
    chunk_text,
    extract_text,
    generate_for_chunks,
    generate_pairs,
    model_generator,
    pair_problem,
    pairs_to_rows,
    parse_pairs,
)

POLICY = [
    "Harbor Lantern Outfitters accepts returns of unworn clothing within 45 days of delivery. Items must still carry "
    "their original tags, and the customer needs the order number printed on the packing slip. Refunds go back to "
    "the original card within seven business days after the parcel reaches the warehouse in Portland.",
    "Footwear follows a stricter rule. Boots and trail shoes can be returned within 30 days only if they were worn "
    "indoors, and the soles must show no dirt or scuffs. Customers who live outside the United States pay their own "
    "return shipping, while domestic customers receive a prepaid label by email.",
    "Gift cards, clearance items marked final sale, and personalised embroidery cannot be returned. If an item "
    "arrives damaged, the customer should send a photograph to the support team within 48 hours, and Harbor Lantern "
    "will ship a replacement at no cost.",
]
SENTENCES = [s if s.endswith(".") else s + "." for p in POLICY for s in p.split(". ")]

GOOD = '{"question": "How many days does a customer have to return unworn clothing?", "answer": "Unworn clothing can be returned within 45 days of delivery."}'
OFF_TOPIC = '{"question": "How many books can a member of the Millbrook library borrow?", "answer": "A member can borrow eight books."}'


def make_pdf(path, paragraphs, password: str | None = None, owner_password: str | None = None):
    """A one-page PDF of `paragraphs` (fpdf2), encrypted with pypdf when a password is given."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    for paragraph in paragraphs:
        pdf.multi_cell(0, 6, paragraph, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(6)
    pdf.output(str(path))
    if password is not None or owner_password is not None:
        import pypdf

        writer = pypdf.PdfWriter(clone_from=str(path))
        writer.encrypt(user_password=password or "", owner_password=owner_password, algorithm="RC4-128")
        with open(path, "wb") as handle:
            writer.write(handle)
    return path


@pytest.fixture
def policy_pdf(tmp_path):
    return make_pdf(tmp_path / "upload-3f9c.pdf", POLICY)


# ------------------------------------------------------------------------------------------------ extract, chunk


def test_a_pdf_becomes_its_paragraphs_and_then_overlapping_token_chunks(policy_pdf, builtin_tokenizer):
    text = extract_text(policy_pdf, "Returns policy.pdf")
    for sentence in SENTENCES:
        assert sentence in text  # each sentence whole: the PDF's line breaks inside a paragraph became spaces
    assert text.split("\n\n") == POLICY  # paragraphs kept apart, nothing else added

    ids = builtin_tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = chunk_text(text, builtin_tokenizer, chunk_tokens=60, overlap=12)
    assert len(chunks) > 2 and [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].start_token == 0 and chunks[-1].start_token + chunks[-1].n_tokens == len(ids)
    for chunk in chunks:
        assert 0 < chunk.n_tokens <= 60
        assert chunk.text == builtin_tokenizer.decode(ids[chunk.start_token:chunk.start_token + chunk.n_tokens]).strip()
    for before, after in zip(chunks, chunks[1:]):
        assert after.start_token == before.start_token + before.n_tokens - 12
        shared = builtin_tokenizer.decode(ids[after.start_token:after.start_token + 12]).strip()
        assert before.text.endswith(shared) and after.text.startswith(shared)
    # a window cut short ends at a sentence end; at least one was (the text has a sentence end every ~25 tokens)
    for chunk in chunks[:-1]:
        assert chunk.n_tokens == 60 or (chunk.n_tokens >= 45 and chunk.text.endswith(".")), chunk
    assert any(c.text.endswith(".") for c in chunks[:-1])


def test_chunk_overlap_must_be_smaller_than_the_chunk(builtin_tokenizer):
    with pytest.raises(UserError, match="smaller than the chunk size"):
        chunk_text("Some text.", builtin_tokenizer, chunk_tokens=32, overlap=32)
    assert chunk_text("", builtin_tokenizer) == []
    one = chunk_text("A short note.", builtin_tokenizer, chunk_tokens=256, overlap=32)
    assert [(c.index, c.text, c.start_token) for c in one] == [(0, "A short note.", 0)]


def test_text_and_markdown_are_read_as_utf8_with_whitespace_normalised(tmp_path):
    markdown = tmp_path / "notes.md"
    markdown.write_bytes("\ufeff# Returns  \r\n\r\nUnworn\t\tclothing   within 45 days.\r\nTags on.\r\n\r\n\r\n\r\n"
                         "- café gift cards\r\n".encode())
    assert extract_text(markdown) == "# Returns\n\nUnworn clothing within 45 days.\nTags on.\n\n- café gift cards"
    utf16 = tmp_path / "notes.txt"
    utf16.write_bytes("Naïve text, written as UTF-16.".encode("utf-16"))  # with its byte-order mark
    assert extract_text(utf16) == "Naïve text, written as UTF-16."
    assert {".pdf", ".txt", ".md"} <= set(DOCUMENT_SUFFIXES)


def test_an_owner_password_alone_does_not_stop_reading(tmp_path):
    path = make_pdf(tmp_path / "owner.pdf", POLICY[:1], owner_password="only-the-owner")
    assert SENTENCES[0] in extract_text(path)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("password", "protected by a password"),
        ("garbage", "could not be read as a PDF"),
        ("scanned", "no text layer"),
        ("empty", "is empty"),
        ("blank", "holds no text"),
        ("latin1", "line 2: byte 0xe9 is not UTF-8"),
        ("binary", "NUL"),
        ("docx", "PDF, text and Markdown"),
    ],
)
def test_a_document_without_readable_text_is_a_sentence_naming_the_file(tmp_path, kind, message):
    from fpdf import FPDF

    path = tmp_path / {"password": "a.pdf", "garbage": "b.pdf", "scanned": "c.pdf", "docx": "d.docx"}.get(kind, "e.txt")
    if kind == "password":
        make_pdf(path, POLICY, password="secret")
    elif kind == "garbage":
        path.write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 8)
    elif kind == "scanned":  # a page with a drawing and no text at all
        pdf = FPDF()
        pdf.add_page()
        pdf.rect(20, 20, 100, 60, style="F")
        pdf.output(str(path))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "blank":
        path.write_bytes(b" \n\t\n\r\n   ")
    elif kind == "latin1":
        path.write_bytes("First line.\nCaf\u00e9 prices.\n".encode("latin-1"))
    elif kind == "binary":
        path.write_bytes(b"text\x00\x01\x02")
    else:
        path.write_bytes(b"PK\x03\x04 a word file")
    with pytest.raises(UserError, match=message) as caught:
        extract_text(path, "My Report (final).txt")
    assert "My Report (final).txt" in str(caught.value)
    assert str(path.parent) not in str(caught.value)  # the stored name is not the user's


# ------------------------------------------------------------------------------------------ parsing, validation


def test_parse_pairs_takes_an_object_a_list_or_a_fenced_reply():
    (pair,) = parse_pairs(GOOD)
    assert pair.question == "How many days does a customer have to return unworn clothing?"
    (padded,) = parse_pairs('{"question": "  Where is the warehouse located?  ", "answer": " In Portland. ", "x": 1}')
    assert (padded.question, padded.answer) == ("Where is the warehouse located?", "In Portland.")
    two = parse_pairs("```json\n[" + GOOD + ", " + GOOD.replace("45 days", "the tags") + "]\n```")
    assert len(two) == 2 and two[1].answer.endswith("the tags of delivery.")


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ('{"question": "Where is it?", "answer": "Portland."', "not JSON"),
        ("Sure! Here is a question about the text.", "not JSON"),
        ('{"question": "Where is the warehouse?"}', "answer: Field required"),
        ('{"question": "   ", "answer": "Portland."}', "question: String should have at least 1 character"),
        ('{"question": "The warehouse is in Portland.", "answer": "Yes."}', "must end with '?'"),
        ('{"question": "Where?", "answer": "Portland."}', "at least three words"),
        ('{"question": 45, "answer": "Portland."}', "question: Input should be a valid string"),
        ('["Where is the warehouse?", "Portland."]', "item 1: wrong shape"),
        ("[]", "no pair"),
    ],
)
def test_parse_pairs_refuses_with_a_short_reason(reply, reason):
    with pytest.raises(ValueError, match=reason):
        parse_pairs(reply)


def test_a_pair_must_be_grounded_in_its_chunk_and_new():
    chunk = POLICY[0]
    (good,) = parse_pairs(GOOD)
    assert pair_problem(good, chunk) is None
    (off,) = parse_pairs(OFF_TOPIC)  # the prompt's worked example, copied
    assert "question is not grounded" in pair_problem(off, chunk)
    invented = QAPair(question="How many days does a customer have to return unworn clothing?",
                      answer="Penguins migrate across frozen oceans every winter.")
    assert "answer is not grounded" in pair_problem(invented, chunk)
    assert pair_problem(good, chunk, earlier=[good]) == "the question repeats an earlier one"
    vague = QAPair(question="What is this about?", answer="It is about returns.")
    assert pair_problem(vague, chunk) == "the question names nothing from the chunk (it has no content word)"
    short = QAPair(question="Can unworn clothing be returned?", answer="Yes.")
    assert pair_problem(short, chunk) is None
    echo = QAPair(question="Can unworn clothing be returned?", answer="Can unworn clothing be returned?")
    assert pair_problem(echo, chunk) == "the answer repeats the question"
    assert '"question"' in QA_SYSTEM_PROMPT and '"required":["question","answer"]' in QA_SYSTEM_PROMPT


# ------------------------------------------------------------------------------------------- retries, progress


class FakeModel:
    """A `generate` callable that hands out `replies` in turn (the last one for ever) and records each call."""

    def __init__(self, *replies, on_call=None):
        self.replies, self.calls, self.on_call = list(replies), [], on_call

    def __call__(self, messages, prefix, attempt):
        self.calls.append((messages, prefix, attempt))
        if self.on_call is not None:
            self.on_call(len(self.calls))
        return self.replies[min(len(self.calls), len(self.replies)) - 1]


CHUNK = Chunk(index=4, text=POLICY[0], start_token=100, n_tokens=60)


def test_a_bad_reply_is_retried_and_counted():
    model = FakeModel("I think the answer is 45 days.", GOOD)
    result = generate_pairs(model, CHUNK)
    assert (result.chunk_index, result.attempts, result.retries, result.error) == (4, 2, 1, None)
    assert [p.answer for p in result.pairs] == ["Unworn clothing can be returned within 45 days of delivery."]
    assert result.failures == ["not JSON (Expecting value at character 1)"]
    assert [attempt for _, _, attempt in model.calls] == [0, 1]  # the retry is told it is one (so it samples)
    messages, prefix, _ = model.calls[0]
    assert prefix == JSON_PREFIX and messages[0] == {"role": "system", "content": QA_SYSTEM_PROMPT}
    assert messages[-1]["role"] == "user" and POLICY[0] in messages[-1]["content"]


def test_a_chunk_that_never_gets_a_valid_pair_says_why_after_its_retries():
    model = FakeModel('{"question": "Where is it?"}', OFF_TOPIC)
    result = generate_pairs(model, CHUNK, max_retries=3)
    assert (result.pairs, result.attempts, result.retries) == ([], 4, 3)
    assert result.error.startswith("no valid pair after 4 replies (last: the question is not grounded")
    assert len(result.failures) == 4 and result.failures[0] == "answer: Field required"


def test_several_pairs_are_asked_for_one_at_a_time_and_a_repeat_is_refused():
    second = GOOD.replace("How many days does a customer have to return unworn clothing?",
                          "When do refunds reach the original card?").replace(
        "Unworn clothing can be returned within 45 days of delivery.",
        "Refunds reach the original card within seven business days.")
    model = FakeModel(GOOD, GOOD, second)
    result = generate_pairs(model, CHUNK, n_pairs=2)
    assert [p.question for p in result.pairs] == ["How many days does a customer have to return unworn clothing?",
                                                  "When do refunds reach the original card?"]
    assert (result.attempts, result.retries, result.failures) == (3, 1, ["the question repeats an earlier one"])
    asked_second = model.calls[1][0][-1]["content"]
    assert "Ask something other than:\n- How many days does a customer have to return unworn clothing?" in asked_second


def test_progress_is_reported_after_each_chunk_and_a_stop_is_honoured():
    chunks = [Chunk(i, POLICY[0], 0, 60) for i in range(3)]
    seen = []
    results = generate_for_chunks(FakeModel(GOOD), chunks, on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)] and [r.chunk_index for r in results] == [0, 1, 2]
    assert pairs_to_rows(results)[2] == {"question": "How many days does a customer have to return unworn clothing?",
                                         "answer": "Unworn clothing can be returned within 45 days of delivery.",
                                         "source_chunk": 2, "generated": True}

    # stopped between chunks: the first chunk's result and no more
    stop = threading.Event()
    model = FakeModel(GOOD)
    results = generate_for_chunks(model, chunks, on_progress=lambda done, total: stop.set(), should_stop=stop.is_set)
    assert [r.chunk_index for r in results] == [0] and len(model.calls) == 1

    # stopped between the attempts of a chunk: the chunk is left out, no further reply is asked for
    stop.clear()
    model = FakeModel("not json", on_call=lambda n: stop.set() if n == 2 else None)
    results = generate_for_chunks(model, chunks, max_retries=3, should_stop=stop.is_set)
    assert results == [] and len(model.calls) == 2


def test_generated_rows_read_as_question_answer_data(tmp_path):
    results = generate_for_chunks(FakeModel(GOOD), [Chunk(0, POLICY[0], 0, 60), Chunk(1, POLICY[0], 48, 60)])
    path = tmp_path / "generated.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in pairs_to_rows(results)))
    records = read_records(path)
    assert detect_format(records) == "prompt_completion"
    samples = to_samples(records, DataConfig())
    assert samples[1]["messages"] == [
        {"role": "user", "content": "How many days does a customer have to return unworn clothing?"},
        {"role": "assistant", "content": "Unworn clothing can be returned within 45 days of delivery."},
    ]


def test_model_replies_are_json_by_construction_or_left_unclosed(tmp_path):
    """A random tiny model writes nonsense, but what comes back either parses as a JSON object with the two keys
    or is left unclosed (cut short), never some other broken JSON; a cancelled generation is never a pair."""
    model_dir, _ = save_tiny_model_folder(tmp_path, REPEAT_ROWS)
    cancelled = threading.Event()
    generate = model_generator(str(model_dir), max_new_tokens=48, cancelled=cancelled)
    messages = [{"role": "user", "content": "Text:\nRepeat the word river.\n\nWrite one question as JSON."}]
    for attempt in range(4):
        reply = generate(messages, JSON_PREFIX, attempt)
        assert reply.startswith(JSON_PREFIX)
        if reply.endswith('"}'):
            assert set(json.loads(reply)) == {"question", "answer"}
        else:
            with pytest.raises(ValueError, match="not JSON"):
                parse_pairs(reply)
    cancelled.set()
    with pytest.raises(ValueError, match="not JSON"):
        parse_pairs(generate(messages, JSON_PREFIX, 0))


# --------------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_the_builtin_model_turns_a_pdf_into_pairs_that_train(tmp_path, policy_pdf, builtin_tokenizer):
    started = time.monotonic()
    chunks = chunk_text(extract_text(policy_pdf), builtin_tokenizer, chunk_tokens=120, overlap=16)
    assert len(chunks) == 2
    generate = model_generator("smollm2-135m-instruct", max_new_tokens=120)
    progress = []
    results = generate_for_chunks(generate, chunks, n_pairs=1, max_retries=5,
                                  on_progress=lambda done, total: progress.append(done))
    assert progress == [1, 2]
    for result, chunk in zip(results, chunks):
        assert result.error is None and len(result.pairs) == 1, result
        assert result.retries == result.attempts - 1 == len(result.failures)
        assert pair_problem(result.pairs[0], chunk.text) is None
    print(f"retries per chunk: {[r.retries for r in results]}; failures: {[r.failures for r in results]}; "
          f"pairs: {[(p.question, p.answer) for r in results for p in r.pairs]}; "
          f"generation {time.monotonic() - started:.1f} s")

    data = tmp_path / "generated.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in pairs_to_rows(results)))
    cfg = api.load_config(None, [
        "model.name=smollm2-135m-instruct", f"data.path={data}", "data.validation_split=0", "method=lora",
        "training.max_steps=2", "training.batch_size=1", "eval.enabled=false",
    ])
    summary = api.train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train"]["steps"] == saved["train"]["steps"] == 2
    assert math.isfinite(summary["train"]["final_loss"]) and math.isfinite(summary["train"]["first_loss"])
    print(f"end to end {time.monotonic() - started:.1f} s")
