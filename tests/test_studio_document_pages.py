"""The studio's documents pages and API (tunesmith.studio.pages.documents) through FastAPI's TestClient: a PDF
uploaded to a project is cut into token chunks with its base model's tokenizer; a generation job (a fake model,
so it is quick) writes pairs per chunk with retries, reports its progress, can be cancelled and keeps what it
made; pairs are edited, added and deleted; the pairs are saved as a dataset; a document without readable text is
a sentence and leaves nothing behind.  Slow: the built-in model writes the pairs of a PDF, which then train in a
run the studio launches."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPEAT_ROWS, save_tiny_model_folder
from fastapi.testclient import TestClient
from test_studio_app import studio, wait_for
from test_studio_documents import POLICY, make_pdf

from tunesmith.studio import documents
from tunesmith.studio.db import QAPair
from tunesmith.studio.pages import documents as document_pages


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    model_dir, _ = save_tiny_model_folder(tmp_path_factory.mktemp("tiny"), REPEAT_ROWS)
    return model_dir


@pytest.fixture
def client(tmp_path):
    with studio(tmp_path / "home") as c:
        yield c


def files_of(client: TestClient) -> set[str]:
    return {p.name for p in (client.app.state.settings.home / "files").iterdir()}


def new_project(client: TestClient, base_model: str, name: str = "handbook") -> int:
    made = client.post("/api/projects", json={"name": name, "base_model": base_model})
    assert made.status_code == 201, made.text
    return made.json()["id"]


def upload(client: TestClient, project_id: int, path: Path, **form) -> dict:
    with path.open("rb") as handle:
        response = client.post(f"/api/projects/{project_id}/documents", files={"file": (path.name, handle)},
                               data={k: str(v) for k, v in form.items()})
    return response


def wait_job(client: TestClient, job_id: int, states=("finished", "failed", "cancelled"), timeout: float = 60,
             until=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if (until(job) if until else job["state"] in states):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stayed {job}")


def all_chunks(client: TestClient, document_id: int) -> list[dict]:
    page = client.get(f"/api/documents/{document_id}/chunks", params={"limit": 500}).json()
    assert page["total"] == len(page["chunks"])
    return page["chunks"]


# --- a fake model: a grounded pair about the chunk it is asked about, after one reply that is not JSON


def asked_text(messages: list[dict]) -> tuple[str, int]:
    """(the chunk's text, how many questions it already has) from the conversation documents.qa_messages makes."""
    content = messages[-1]["content"]
    text = content.split("Text:\n", 1)[1].split("\n\nWrite one question", 1)[0]
    return text, content.count("\n- ")


def grounded_reply(messages: list[dict]) -> str:
    text, asked = asked_text(messages)
    words = re.findall(r"[A-Za-z]{5,}", text)
    first, second = words[(2 * asked) % len(words)], words[(2 * asked + 1) % len(words)]
    sentence = re.split(r"(?<=\.)\s", text.strip())[0]
    return json.dumps({"question": f"What does the text say about {first} and {second}?", "answer": sentence})


class FakeModels:
    """Stands in for documents.model_generator: records each load and each reply asked for; a chunk's first
    reply is not JSON (so every chunk needs one retry) when `retry_first`; replies after `block_after` wait until
    the job's cancel event is set and come back cut short."""

    def __init__(self, retry_first: bool = True, block_after: int | None = None):
        self.retry_first, self.block_after = retry_first, block_after
        self.loads: list[tuple[str, int]] = []
        self.calls = 0
        self.events: list[threading.Event] = []
        self.cut_short = 0

    def __call__(self, model_name: str, max_new_tokens: int = 200, cancelled: threading.Event | None = None):
        self.loads.append((model_name, max_new_tokens))
        self.events.append(cancelled)

        def generate(messages, prefix, attempt):
            self.calls += 1
            assert prefix == documents.JSON_PREFIX
            if self.block_after is not None and self.calls > self.block_after:
                assert cancelled.wait(20), "the job never set its cancel event"
                self.cut_short += 1
                return prefix + "What is"
            if self.retry_first and attempt == 0 and asked_text(messages)[1] == 0:
                return "Sure! Here is a question about the text."
            return grounded_reply(messages)

        return generate


@pytest.fixture
def policy_pdf(tmp_path) -> Path:
    return make_pdf(tmp_path / "Returns policy (2024).pdf", POLICY)


# --- upload and chunks


def test_a_pdf_is_cut_into_overlapping_token_chunks_with_the_projects_tokenizer(client, tiny_model, policy_pdf):
    project_id = new_project(client, str(tiny_model))
    made = upload(client, project_id, policy_pdf, chunk_tokens=128, overlap=16)
    assert made.status_code == 201, made.text
    doc = made.json()
    assert doc["name"] == "Returns policy (2024).pdf" and doc["pairs"] == 0
    text = documents.extract_text(policy_pdf)
    assert doc["chars"] == len(text)
    from transformers import AutoTokenizer

    expected = documents.chunk_text(text, AutoTokenizer.from_pretrained(tiny_model), chunk_tokens=128, overlap=16)
    chunks = all_chunks(client, doc["id"])
    assert len(chunks) == doc["chunks"] == len(expected) > 2
    assert [(c["index"], c["text"], c["n_tokens"]) for c in chunks] == [(c.index, c.text, c.n_tokens) for c in expected]
    assert all(c["n_tokens"] <= 128 and c["pairs"] == [] for c in chunks)
    # the stored document keeps a generated name; the user's name is only shown
    stored = files_of(client)
    assert len(stored) == 1 and re.fullmatch(r"[0-9a-f]{32}\.pdf", stored.pop())

    listed = client.get(f"/api/projects/{project_id}/documents").json()
    assert [(d["id"], d["chunks"]) for d in listed] == [(doc["id"], len(expected))]
    project_page = client.get(f"/projects/{project_id}").text
    assert 'id="upload-document"' in project_page and 'id="documents"' in project_page
    assert f'href="/documents/{doc["id"]}"' in project_page and f"{len(expected)} chunks" in project_page
    page = client.get(f"/documents/{doc['id']}").text
    for marker in ('id="generate-form"', 'id="save-dataset"', 'id="qa-progress"', 'class="chunk" data-index="0"',
                   f'class="chunk" data-index="{len(expected) - 1}"', f'value="{tiny_model}"'):
        assert marker in page, marker


@pytest.mark.parametrize(("kind", "status", "sentence"), [
    ("docx", 400, "must be one of .pdf"),
    ("password", 400, "protected by a password"),
    ("latin1", 400, "is not UTF-8"),
    ("overlap", 400, "overlap must be smaller"),
    ("tokenizer", 400, "cannot be cut into chunks"),
])
def test_a_document_that_cannot_be_read_is_a_sentence_and_nothing_is_kept(client, tiny_model, tmp_path, kind, status,
                                                                        sentence):
    model = str(tmp_path / "no-such-model") if kind == "tokenizer" else str(tiny_model)
    project_id = new_project(client, model)
    form = {}
    if kind == "docx":
        path = tmp_path / "report.docx"
        path.write_bytes(b"PK\x03\x04 a word file")
    elif kind == "password":
        path = make_pdf(tmp_path / "secret.pdf", POLICY, password="secret")
    elif kind == "latin1":
        path = tmp_path / "notes.txt"
        path.write_bytes("First line.\nCaf\u00e9 prices.\n".encode("latin-1"))
    else:
        path = tmp_path / "notes.md"
        path.write_text("# Notes\n\nThe warehouse is in Portland.\n")
        form = {"chunk_tokens": 64, "overlap": 64} if kind == "overlap" else {}
    response = upload(client, project_id, path, **form)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert sentence in error and len(error.split()) > 5
    assert files_of(client) == set()
    assert client.get(f"/api/projects/{project_id}/documents").json() == []


def test_requests_that_name_nothing_or_break_bounds_are_sentences(client, tiny_model, policy_pdf):
    project_id = new_project(client, str(tiny_model))
    doc = upload(client, project_id, policy_pdf, chunk_tokens=256, overlap=0).json()
    for method, url, body in [
        ("GET", "/api/documents/999", None), ("GET", "/documents/999", None),
        ("POST", "/api/documents/999/generate", {}), ("POST", "/api/chunks/999/qa", {"question": "a b c?", "answer": "x"}),
        ("PUT", "/api/qa/999", {"question": "a b c?", "answer": "x"}), ("DELETE", "/api/qa/999", None),
        ("POST", "/api/documents/999/dataset", {}), ("DELETE", "/api/documents/999", None),
        ("POST", "/api/projects/999/documents", None), ("GET", "/api/documents/99999999999999999999/chunks", None),
    ]:
        response = client.request(method, url, json=body) if body is not None else client.request(method, url)
        if url.endswith("99999999999999999999/chunks"):
            assert response.status_code in (404, 422), response.text
        elif url == "/api/projects/999/documents":
            assert response.status_code == 422  # no file: the schema's own sentence
        else:
            assert response.status_code == 404, (url, response.text)
        assert len(response.json()["error"].split()) >= 3 if url.startswith("/api") else "there is no" in response.text
    for body in ({"pairs_per_chunk": 6}, {"max_retries": -1}, {"max_new_tokens": 5000}, {"model": "x" * 1001}):
        response = client.post(f"/api/documents/{doc['id']}/generate", json=body)
        assert response.status_code == 422 and response.json()["error"].startswith("the request is not valid")
    chunk = all_chunks(client, doc["id"])[0]
    blank = client.post(f"/api/chunks/{chunk['id']}/qa", json={"question": "  \x00 ", "answer": "Yes."})
    assert blank.status_code == 422 and "question is empty" in blank.json()["error"]
    nothing = client.post(f"/api/documents/{doc['id']}/dataset", json={"name": "empty"})
    assert nothing.status_code == 400 and "no question/answer pairs yet" in nothing.json()["error"]
    big = upload(client, project_id, policy_pdf, chunk_tokens=4096)
    assert big.status_code == 422 and "chunk_tokens" in big.json()["error"]


# --- generation


def test_generation_writes_pairs_per_chunk_with_retries_and_progress(client, tiny_model, policy_pdf, monkeypatch):
    models = FakeModels(retry_first=True)
    monkeypatch.setattr(documents, "model_generator", models)
    project_id = new_project(client, str(tiny_model))
    doc = upload(client, project_id, policy_pdf, chunk_tokens=128, overlap=16).json()
    n = doc["chunks"]

    seen = []
    real_progress = document_pages.JobContext.progress

    def progress(ctx, done, total, message=None):
        seen.append((done, total))
        real_progress(ctx, done, total, message)

    monkeypatch.setattr(document_pages.JobContext, "progress", progress)
    started = client.post(f"/api/documents/{doc['id']}/generate",
                          json={"pairs_per_chunk": 2, "max_retries": 2, "max_new_tokens": 64})
    assert started.status_code == 202, started.text
    job = wait_job(client, started.json()["id"])
    assert job["state"] == "finished", job
    assert (job["done"], job["total"]) == (n, n)
    # the model is the project's base model by default, loaded with the form's reply length
    assert models.loads == [(str(tiny_model), 64)]
    assert job["result"]["pairs"] == 2 * n and job["result"]["retries"] == n and job["result"]["failed_chunks"] == []
    assert [d for d, _ in seen if d] == list(range(1, n + 1)) and {t for _, t in seen} == {n}
    chunks = all_chunks(client, doc["id"])
    for chunk in chunks:
        assert len(chunk["pairs"]) == 2 and all(p["generated"] and not p["edited"] for p in chunk["pairs"])
        for pair in chunk["pairs"]:
            assert documents.pair_problem(documents.QAPair(question=pair["question"], answer=pair["answer"]),
                                          chunk["text"]) is None
    page = client.get(f"/documents/{doc['id']}").text
    shown = page.split('<section id="chunks">')[1]
    assert shown.count('class="pair"') == 2 * n and shown.count('class="badge generated"') == 2 * n
    assert f"{n}/{n} chunks" in page and f"{2 * n} pairs, {n} retries" in page

    # a second generation finds the model loaded; its new pairs replace the generated ones nobody edited
    first = chunks[0]["pairs"][0]
    edited = client.put(f"/api/qa/{first['id']}", json={"question": "Where do refunds go after a return?",
                                                        "answer": first["answer"]}).json()
    assert edited["edited"] and edited["generated"]
    again = client.post(f"/api/documents/{doc['id']}/generate", json={"pairs_per_chunk": 1, "max_new_tokens": 64})
    assert wait_job(client, again.json()["id"])["state"] == "finished"
    assert models.loads == [(str(tiny_model), 64)]
    after = all_chunks(client, doc["id"])
    assert [len(c["pairs"]) for c in after] == [2] + [1] * (n - 1)
    assert after[0]["pairs"][0] == edited and all(p["id"] > chunks[-1]["pairs"][-1]["id"] for p in after[1]["pairs"])


def test_a_cancelled_generation_stops_its_reply_and_keeps_the_chunks_done(client, tiny_model, policy_pdf, monkeypatch):
    models = FakeModels(retry_first=False, block_after=1)
    monkeypatch.setattr(documents, "model_generator", models)
    project_id = new_project(client, str(tiny_model))
    doc = upload(client, project_id, policy_pdf, chunk_tokens=128, overlap=16).json()
    n = doc["chunks"]
    job_id = client.post(f"/api/documents/{doc['id']}/generate", json={"max_retries": 5}).json()["id"]
    running = wait_job(client, job_id, until=lambda j: j["done"] == 1)
    assert running["state"] == "running" and running["total"] == n
    # the first chunk's pair is stored while the second one is being written
    assert [len(c["pairs"]) for c in all_chunks(client, doc["id"])] == [1] + [0] * (n - 1)
    page = client.get(f"/documents/{doc['id']}").text
    assert f"1/{n} chunks" in page and 'id="cancel-generation"' in page and 'data-active="1"' in page
    busy = client.post(f"/api/documents/{doc['id']}/generate", json={})
    assert busy.status_code == 400 and "already" in busy.json()["error"]
    refused = client.delete(f"/api/documents/{doc['id']}")
    assert refused.status_code == 400 and "cancel it" in refused.json()["error"]

    asked = time.monotonic()
    assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 200
    job = wait_job(client, job_id)
    assert job["state"] == "cancelled" and time.monotonic() - asked < 5
    assert models.events[0].is_set() and models.cut_short == 1  # the reply being written was cut short
    assert models.calls == 2  # and no further reply was asked for
    assert job["result"]["pairs"] == 1 and job["result"]["chunks_done"] == 1
    assert [len(c["pairs"]) for c in all_chunks(client, doc["id"])] == [1] + [0] * (n - 1)
    assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 400  # over already

    # going on with only the chunks without pairs: the first chunk's pair stays as it was
    kept = all_chunks(client, doc["id"])[0]["pairs"][0]
    models.block_after = None
    rest = client.post(f"/api/documents/{doc['id']}/generate", json={"only_missing": True}).json()
    done = wait_job(client, rest["id"])
    assert done["state"] == "finished" and (done["done"], done["total"]) == (n - 1, n - 1)
    assert not models.events[0].is_set()  # cleared for the new job
    chunks = all_chunks(client, doc["id"])
    assert chunks[0]["pairs"] == [kept] and all(len(c["pairs"]) == 1 for c in chunks)


def test_a_model_that_cannot_load_fails_the_job_with_a_sentence(client, tiny_model, policy_pdf, tmp_path):
    project_id = new_project(client, str(tiny_model))
    doc = upload(client, project_id, policy_pdf).json()
    started = client.post(f"/api/documents/{doc['id']}/generate", json={"model": str(tmp_path / "missing-model")})
    job = wait_job(client, started.json()["id"])
    assert job["state"] == "failed" and "does not exist" in job["message"]
    assert "does not exist" in client.get(f"/documents/{doc['id']}").text


# --- pairs by hand, and the dataset


def test_pairs_are_edited_added_deleted_and_saved_as_a_dataset(client, tiny_model, policy_pdf, monkeypatch):
    monkeypatch.setattr(documents, "model_generator", FakeModels(retry_first=False))
    project_id = new_project(client, str(tiny_model))
    doc = upload(client, project_id, policy_pdf, chunk_tokens=128, overlap=16).json()
    assert wait_job(client, client.post(f"/api/documents/{doc['id']}/generate", json={}).json()["id"])["state"] == \
        "finished"
    chunks = all_chunks(client, doc["id"])
    first, second = chunks[0]["pairs"][0], chunks[1]["pairs"][0]

    changed = client.put(f"/api/qa/{first['id']}", json={"question": " How long do customers have to return clothing? ",
                                                         "answer": "45 days from delivery."})
    assert changed.status_code == 200
    assert changed.json() == {**first, "question": "How long do customers have to return clothing?",
                              "answer": "45 days from delivery.", "generated": True, "edited": True}
    same = client.put(f"/api/qa/{second['id']}", json={"question": second["question"], "answer": second["answer"]})
    assert same.json()["edited"] is False  # saved unchanged: not an edit
    added = client.post(f"/api/chunks/{chunks[1]['id']}/qa",
                        json={"question": "Who pays the return shipping abroad?", "answer": "The customer does."})
    assert added.status_code == 201 and added.json()["generated"] is False and added.json()["edited"] is False
    assert client.delete(f"/api/qa/{second['id']}").json() == {"deleted": second["id"]}
    assert client.delete(f"/api/qa/{second['id']}").status_code == 404

    page = client.get(f"/documents/{doc['id']}").text
    assert 'class="badge edited"' in page and "written by hand" in page and "Who pays the return shipping" in page

    saved = client.post(f"/api/documents/{doc['id']}/dataset", json={"name": "policy questions"})
    assert saved.status_code == 201, saved.text
    dataset = saved.json()
    assert dataset["url"] == f"/datasets/{dataset['id']}"
    assert dataset["train_url"] == f"/projects/{project_id}/train?dataset={dataset['id']}"
    rows = [json.loads(line) for line in
            (client.app.state.settings.home / "files" / dataset["file"]).read_text().splitlines()]
    expected = [{"question": "How long do customers have to return clothing?", "answer": "45 days from delivery.",
                 "source_chunk": 0, "generated": True},
                {"question": "Who pays the return shipping abroad?", "answer": "The customer does.",
                 "source_chunk": 1, "generated": False}]
    expected += [{"question": c["pairs"][0]["question"], "answer": c["pairs"][0]["answer"], "source_chunk": c["index"],
                  "generated": True} for c in chunks[2:]]
    assert rows == expected and dataset["rows"] == len(expected)
    listed = {d["id"]: d for d in client.get(f"/api/projects/{project_id}/datasets").json()}
    assert listed[dataset["id"]]["generated"] is True and listed[dataset["id"]]["name"] == "policy questions"
    assert client.get(f"/projects/{project_id}/train", params={"dataset": dataset["id"]}).status_code == 200

    # deleting the document takes its chunks and pairs; the dataset stays
    assert client.delete(f"/api/documents/{doc['id']}").json() == {"deleted": doc["id"]}
    with client.app.state.sessions() as s:
        assert s.query(QAPair).count() == 0
    assert files_of(client) == {dataset["file"]}


# --- slow: the built-in model, then a training run on what it wrote


@pytest.mark.slow
def test_the_builtin_model_writes_pairs_that_a_studio_run_trains_on(client, policy_pdf, monkeypatch):
    started = time.monotonic()
    results = []  # each chunk's ChunkResult, to check the job's count of retries against
    real = documents.generate_for_chunks

    def recorded(*args, **kwargs):
        out = real(*args, **kwargs)
        results.extend(out)
        return out

    monkeypatch.setattr(documents, "generate_for_chunks", recorded)
    project_id = new_project(client, "smollm2-135m-instruct")
    doc = upload(client, project_id, policy_pdf, chunk_tokens=120, overlap=16)
    assert doc.status_code == 201, doc.text
    doc = doc.json()
    assert doc["chunks"] == 2
    job_id = client.post(f"/api/documents/{doc['id']}/generate",
                         json={"pairs_per_chunk": 1, "max_retries": 5, "max_new_tokens": 120}).json()["id"]
    job = wait_job(client, job_id, timeout=120)
    generated_s = time.monotonic() - started
    assert job["state"] == "finished", job
    assert (job["done"], job["total"]) == (2, 2) and job["result"]["failed_chunks"] == []
    assert len(results) == 2 and job["result"]["retries"] == sum(r.retries for r in results)
    chunks = all_chunks(client, doc["id"])
    for chunk in chunks:
        assert len(chunk["pairs"]) >= 1
        for pair in chunk["pairs"]:
            assert documents.pair_problem(documents.QAPair(question=pair["question"], answer=pair["answer"]),
                                          chunk["text"]) is None

    dataset = client.post(f"/api/documents/{doc['id']}/dataset", json={"name": "policy pairs"}).json()
    data_path = client.app.state.settings.home / "files" / dataset["file"]
    config = {"model": {"name": "smollm2-135m-instruct"},
              "data": {"path": str(data_path), "validation_split": 0},
              "training": {"max_steps": 2, "batch_size": 1, "eval_each_epoch": False},
              "eval": {"enabled": False}}
    run = client.post(f"/api/projects/{project_id}/runs", json={"name": "from the policy",
                                                                "config_yaml": yaml.safe_dump(config)})
    assert run.status_code in (200, 201), run.text
    finished = wait_for(client, run.json()["id"], ("finished", "failed", "interrupted"), timeout=120)
    assert finished["state"] == "finished", finished
    summary = json.loads((Path(finished["run_dir"]) / "summary.json").read_text())
    assert summary["train"]["steps"] == 2
    print(f"pairs: {[(p['question'], p['answer']) for c in chunks for p in c['pairs']]}; retries "
          f"{job['result']['retries']}; generation {generated_s:.1f} s; in all {time.monotonic() - started:.1f} s")
