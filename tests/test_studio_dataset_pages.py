"""The studio's dataset pages and their JSON API (tunesmith.studio.pages.datasets) through FastAPI's TestClient:
upload in every format with bad rows listed by number and field, refused uploads that leave nothing behind,
fixing rows, paging and search, adding and deleting rows, token counts and the chat-template view with the
tokenizer of the project's base model, split, download, delete."""

from __future__ import annotations

import csv
import html
import io
import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import save_tiny_model_folder, write_rows
from fastapi.testclient import TestClient
from test_studio_app import studio

from tunesmith.studio import store
from tunesmith.studio.pages import datasets as dataset_pages
from tunesmith.studio.pages.datasets import dataset_blockers

QA = [
    {"instruction": "What is the capital of France?", "output": "Paris."},
    {"instruction": "What is the capital of Italy?", "output": "Rome."},
    {"instruction": "Tell me a joke.", "output": "Why did the chicken cross the road?"},
    {"instruction": "Name three colours.", "output": "red, green and blue"},
    {"instruction": "Write a short poem about the sea.", "output": "The sea is blue and wide."},
]
BROKEN = '{"instruction": "What is 2 + 2?", "output": "4"'  # no closing brace


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama folder whose tokenizer loads in milliseconds: the projects' base model."""
    folder, _data = save_tiny_model_folder(tmp_path_factory.mktemp("model"), [])
    return folder


@pytest.fixture
def client(tmp_path):
    with studio(tmp_path / "home") as c:
        yield c


def files(client: TestClient) -> list[str]:
    return sorted(p.name for p in (client.app.state.settings.home / "files").iterdir())


def new_project(client: TestClient, base_model: Path | str, name: str = "p") -> int:
    response = client.post("/api/projects", json={"name": name, "base_model": str(base_model)})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def upload(client: TestClient, project: int, filename: str, content: bytes, name: str | None = None):
    return client.post(f"/api/projects/{project}/datasets", files={"file": (filename, content)},
                       data={"name": name} if name is not None else None)


def uploaded(client: TestClient, project: int, rows: list[dict], name: str | None = None) -> int:
    response = upload(client, project, "data.jsonl", jsonl(rows), name)
    assert response.status_code == 201, response.text
    return response.json()["dataset"]["id"]


def page(client: TestClient, url: str) -> str:
    response = client.get(url, headers={"accept": "text/html"})
    assert response.status_code == 200, response.text
    return response.text


class Elements(HTMLParser):
    """Every start tag's (tag, attributes) in a page, and the text of each textarea in order."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.textareas: list[str] = []
        self._in_textarea = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "textarea":
            self._in_textarea = True
            self.textareas.append("")

    def handle_endtag(self, tag):
        if tag == "textarea":
            self._in_textarea = False

    def handle_data(self, data):
        if self._in_textarea:
            self.textareas[-1] += data

    def having(self, tag: str, attr: str) -> list[dict]:
        return [attrs for t, attrs in self.tags if t == tag and attr in attrs]


def row_text(text: str, number: int) -> str:
    """The editor's text for row `number` on a dataset page."""
    found = re.search(rf'<tr id="row-{number}".*?<textarea class="row-json"[^>]*>(.*?)</textarea>', text, re.S)
    assert found, f"row {number} is not on the page"
    return html.unescape(found.group(1))


# --- upload, check, fix ---------------------------------------------------------------------------------------


def test_a_broken_line_and_a_missing_field_are_listed_by_row_and_field_then_fixed(client, model_dir):
    project = new_project(client, model_dir)
    text = jsonl(QA[:1]) + BROKEN.encode() + b"\n" + jsonl([{"instruction": "Tell me a joke."}]) + jsonl(QA[3:])
    response = upload(client, project, "my data.jsonl", text)
    assert response.status_code == 201, response.text
    body = response.json()
    dataset = body["dataset"]
    assert (dataset["name"], dataset["source_name"], dataset["rows"]) == ("my data", "my data.jsonl", 5)
    assert [(p["row"], p["field"]) for p in body["check"]["problems"]] == [(2, None), (3, "output")]
    assert body["check"]["problems"][0]["message"].startswith("row 2: not valid JSON")
    assert body["check"]["problems"][1]["message"].startswith('row 3: field "output" is missing')
    assert files(client) == [dataset["file"]]  # the working copy only: the raw upload is gone

    url = f"/datasets/{dataset['id']}"
    text = page(client, url)
    listed = Elements(text).having("li", "data-row")
    assert [(li["data-row"], li["data-field"]) for li in listed] == [("2", ""), ("3", "output")]
    assert f'href="{url}?offset=0#row-2"' in text and f'href="{url}?offset=0#row-3"' in text
    assert row_text(text, 2) == BROKEN  # a broken line is shown as it was uploaded, to fix
    assert json.loads(row_text(text, 3)) == {"instruction": "Tell me a joke."}
    assert 'id="no-problems"' not in text and 'id="blockers"' in text

    api = f"/api/datasets/{dataset['id']}"
    still_broken = client.put(f"{api}/rows/2", json={"_raw": BROKEN + ","})
    assert still_broken.status_code == 400 and "row 2: not valid JSON" in still_broken.json()["error"]
    assert "unchanged" in still_broken.json()["error"]
    assert client.get(f"{api}/rows?limit=1&offset=1").json()["rows"][0]["raw"] == BROKEN

    fixed = client.put(f"{api}/rows/2", json={"_raw": BROKEN + "}"})  # the page sends the editor's text as it is
    assert fixed.status_code == 200, fixed.text
    assert fixed.json()["row"] == {"instruction": "What is 2 + 2?", "output": "4"}
    assert client.put(f"{api}/rows/3", json={"instruction": "Tell me a joke.", "output": "Knock knock."}).status_code \
        == 200
    check = client.get(api).json()["check"]
    assert check["problems"] == [] and check["valid_rows"] == check["rows"] == 5
    assert check["token_stats"]["count"] == 5 and check["token_stats"]["min"] > 0
    text = page(client, url)
    assert 'id="no-problems"' in text and not Elements(text).having("li", "data-row")
    assert 'data-stat="count">5<' in text and 'id="blockers"' not in text


def test_token_counts_follow_the_projects_data_settings(client, model_dir):
    project = client.post("/api/projects", json={"name": "short", "base_model": str(model_dir),
                                                 "settings": "data:\n  max_length: 20\n"}).json()["id"]
    dataset = uploaded(client, project, QA)
    stats = client.get(f"/api/datasets/{dataset}").json()["check"]["token_stats"]
    assert stats["count"] == 5 and stats["max"] > 20 and stats["over_max_length"] >= 1


def test_a_large_datasets_token_checks_come_in_the_background(client, model_dir, monkeypatch):
    monkeypatch.setattr(dataset_pages, "SYNC_ROWS", 2)  # a "large" dataset is one over 2 rows here
    project = new_project(client, model_dir)
    body = upload(client, project, "qa.jsonl", jsonl(QA + [{"instruction": "Say <|im_end|>.", "output": "ok"}])).json()
    assert body["check"]["tokens_pending"] is True and body["check"]["token_stats"] is None
    assert body["check"]["problems"] == []  # the checks without the tokenizer came at once
    dataset = body["dataset"]["id"]
    deadline = time.monotonic() + 20
    while (check := client.get(f"/api/datasets/{dataset}?wait=false").json()["check"])["tokens_pending"]:
        assert time.monotonic() < deadline, "the background token check never ended"
        time.sleep(0.05)
    assert check["token_stats"]["count"] == 6 and [(p["row"], p["field"]) for p in check["problems"]] \
        == [(6, "instruction")]  # the control token, found by the token checks
    text = page(client, f"/datasets/{dataset}")
    assert 'data-pending' not in text and 'data-stat="count">6<' in text and 'data-row="6"' in text

    client.post(f"/api/datasets/{dataset}/rows", json={"instruction": "One more?", "output": "Yes."})
    pending = page(client, f"/datasets/{dataset}")  # an edit is a new version: its token checks start again
    assert 'data-pending="1"' in pending and "datasets.waitForTokens" in pending
    waited = client.get(f"/api/datasets/{dataset}").json()["check"]  # the API waits for them unless told not to
    assert waited["tokens_pending"] is False and waited["token_stats"]["count"] == 7


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_csv_parquet_and_json_uploads_give_the_rows_jsonl_gives(client, model_dir, tmp_path, suffix):
    project = new_project(client, model_dir)
    source = write_rows(tmp_path / f"qa{suffix}", QA)
    response = upload(client, project, source.name, source.read_bytes())
    assert response.status_code == 201, response.text
    dataset = response.json()["dataset"]
    assert dataset["rows"] == 5 and response.json()["check"]["problems"] == []
    rows = client.get(f"/api/datasets/{dataset['id']}/rows").json()["rows"]
    assert [r["row"] for r in rows] == QA and [r["number"] for r in rows] == [1, 2, 3, 4, 5]
    assert files(client) == [dataset["file"]] and dataset["file"].endswith(".jsonl")


def test_refused_uploads_are_sentences_and_leave_nothing(client, model_dir, monkeypatch):
    project = new_project(client, model_dir)
    wrong = upload(client, project, "notes.txt", b"hello")
    assert wrong.status_code == 400 and ".jsonl" in wrong.json()["error"] and "notes.txt" in wrong.json()["error"]
    empty = upload(client, project, "empty.jsonl", b"")
    assert empty.status_code == 400 and "empty.jsonl is empty" in empty.json()["error"]
    unreadable = upload(client, project, "list.json", b'[{"prompt": "a", "completion": "b"},')
    assert unreadable.status_code == 400 and "list.json" in unreadable.json()["error"]
    monkeypatch.setattr(store, "DATA_LIMIT", 64)
    large = upload(client, project, "big.jsonl", jsonl(QA))
    assert large.status_code == 413 and "big.jsonl is over" in large.json()["error"]
    assert upload(client, 999, "data.jsonl", jsonl(QA)).status_code == 404
    assert files(client) == []
    assert client.get(f"/api/projects/{project}/datasets").json() == []


def test_a_path_in_the_uploaded_name_is_only_shown(client, model_dir, tmp_path):
    project = new_project(client, model_dir)
    response = upload(client, project, "../../x.jsonl", jsonl(QA))
    assert response.status_code == 201, response.text
    dataset = response.json()["dataset"]
    assert (dataset["source_name"], dataset["name"]) == ("x.jsonl", "x")
    assert re.fullmatch(r"[0-9a-f]{32}\.jsonl", dataset["file"]) and files(client) == [dataset["file"]]
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "home" / "x.jsonl").exists()


# --- browsing and editing ----------------------------------------------------------------------------------------


def test_rows_page_and_search_through_the_api_and_the_page(client, model_dir):
    project = new_project(client, model_dir)
    rows = [{"prompt": f"Say number {i}.", "completion": f"number {i}"} for i in range(1, 121)]
    dataset = uploaded(client, project, rows)
    api = f"/api/datasets/{dataset}/rows"
    last = client.get(f"{api}?offset=100&limit=50").json()
    assert last["total"] == 120 and [r["number"] for r in last["rows"]] == list(range(101, 121))
    found = client.get(f"{api}?search=NUMBER 11").json()  # any value, ignoring case
    assert found["total"] == 11 and [r["number"] for r in found["rows"]] == [11] + list(range(110, 120))
    for bad in ("limit=0", "limit=501", "offset=-1"):
        refused = client.get(f"{api}?{bad}")
        assert refused.status_code == 422 and refused.json()["error"].startswith("the request is not valid")

    middle = Elements(page(client, f"/datasets/{dataset}?offset=50"))
    assert [int(tr["data-number"]) for tr in middle.having("tr", "data-number")] == list(range(51, 101))
    links = {a["id"]: a["href"] for a in middle.having("a", "id")}
    assert links["prev-page"] == f"/datasets/{dataset}?offset=0"
    assert links["next-page"] == f"/datasets/{dataset}?offset=100"
    searched = Elements(page(client, f"/datasets/{dataset}?search=number+12"))
    assert [int(tr["data-number"]) for tr in searched.having("tr", "data-number")] == [12] + list(range(120, 121))
    assert len(searched.textareas) == 3  # two rows' editors and the new row's


def test_add_and_delete_rows_keep_the_count(client, model_dir):
    project = new_project(client, model_dir)
    dataset = uploaded(client, project, QA)
    api = f"/api/datasets/{dataset}"
    added = client.post(f"{api}/rows", json={"_raw": '{"instruction": "Say hi.", "output": "Hi!"}'})
    assert added.status_code == 201 and added.json()["number"] == 6 and added.json()["rows"] == 6
    assert client.get(api).json()["dataset"]["rows"] == 6
    assert client.post(f"{api}/rows", json={"instruction": "Say bye.", "output": "Bye!"}).json()["number"] == 7

    deleted = client.delete(f"{api}/rows/1")
    assert deleted.status_code == 200 and deleted.json() == {"deleted": 1, "rows": 6}
    numbered = client.get(f"{api}/rows").json()["rows"]
    assert [r["number"] for r in numbered] == [1, 2, 3, 4, 5, 6]
    assert numbered[0]["row"] == QA[1] and numbered[-1]["row"]["output"] == "Bye!"
    assert client.get(api).json()["dataset"]["rows"] == 6

    for method, url in (("DELETE", f"{api}/rows/7"), ("DELETE", f"{api}/rows/0"), ("PUT", f"{api}/rows/99")):
        refused = client.request(method, url, json={"a": 1})
        assert refused.status_code == 404 and "there is no row" in refused.json()["error"]
    assert client.put(f"{api}/rows/1", json=["not", "an", "object"]).status_code == 422
    assert client.post(f"{api}/rows", json="text").status_code == 422
    not_json = client.post(f"{api}/rows", json={"_raw": "instruction: hi"})
    assert not_json.status_code == 400 and "row 7" in not_json.json()["error"]
    assert client.get(api).json()["dataset"]["rows"] == 6
    assert client.put("/api/datasets/99/rows/1", json={"a": 1}).status_code == 404
    unsigned = client.delete(f"{api}/rows/1", headers={"X-Tunesmith-Token": ""})
    assert unsigned.status_code == 403 and client.get(api).json()["dataset"]["rows"] == 6


# --- token counts and the template view ------------------------------------------------------------------------


def test_the_template_view_shows_the_masked_and_the_trained_parts(client, model_dir):
    project = new_project(client, model_dir)
    text = jsonl(QA[:2]) + BROKEN.encode() + b"\n"
    dataset = upload(client, project, "qa.jsonl", text).json()["dataset"]["id"]
    view = client.get(f"/api/datasets/{dataset}/rows/2/template")
    assert view.status_code == 200, view.text
    segments = view.json()["segments"]
    assert view.json()["format"] == "alpaca"
    masked = "".join(s["text"] for s in segments if s["masked"])
    trained = "".join(s["text"] for s in segments if not s["masked"])
    assert QA[1]["instruction"] in masked and QA[1]["output"] in trained and QA[1]["instruction"] not in trained
    assert "".join(s["text"] for s in segments).index(QA[1]["instruction"]) \
        < "".join(s["text"] for s in segments).index(QA[1]["output"])
    assert not any(s["cut"] for s in segments)

    raw = client.get(f"/api/datasets/{dataset}/rows/3/template")
    assert raw.status_code == 400 and "row 3" in raw.json()["error"] and "not a JSON object" in raw.json()["error"]
    missing = client.get(f"/api/datasets/{dataset}/rows/4/template")
    assert missing.status_code == 404 and missing.json()["error"] == "there is no row 4: the dataset has rows 1 to 3."
    text = page(client, f"/datasets/{dataset}")
    assert 'id="template-view"' in text and 'class="template-row' in text and 'class="masked"' in text


def test_a_base_model_without_a_tokenizer_is_a_sentence_not_an_error_page(client, tmp_path):
    project = new_project(client, tmp_path / "no-such-model")
    dataset = uploaded(client, project, QA[:1] + [{"instruction": "no answer"}])
    check = client.get(f"/api/datasets/{dataset}").json()["check"]
    assert check["token_stats"] is None and "no-such-model" in check["tokenizer_error"]
    assert [(p["row"], p["field"]) for p in check["problems"]] == [(2, "output")]  # checks without tokens still run
    text = page(client, f"/datasets/{dataset}")
    assert 'id="tokenizer-error"' in text and "no-such-model" in text and 'data-row="2"' in text
    view = client.get(f"/api/datasets/{dataset}/rows/1/template")
    assert view.status_code == 400 and view.json()["error"].startswith("No template view")


# --- split, download, delete -----------------------------------------------------------------------------------


def test_split_makes_two_datasets_whose_rows_add_up(client, model_dir):
    project = new_project(client, model_dir)
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(10)]
    dataset = uploaded(client, project, rows, name="questions")
    made = client.post(f"/api/datasets/{dataset}/split", json={"val_fraction": 0.2, "seed": 3})
    assert made.status_code == 201, made.text
    train, val = made.json()["train"], made.json()["validation"]
    assert (train["name"], val["name"]) == ("questions (train)", "questions (validation)")
    assert (train["rows"], val["rows"]) == (8, 2)
    got = {side["id"]: [r["row"] for r in client.get(f"/api/datasets/{side['id']}/rows").json()["rows"]]
           for side in (train, val)}
    together = got[train["id"]] + got[val["id"]]
    assert sorted(together, key=json.dumps) == sorted(rows, key=json.dumps) and len(together) == 10
    again = client.post(f"/api/datasets/{dataset}/split", json={"val_fraction": 0.2, "seed": 3}).json()
    assert [r["row"] for r in client.get(f"/api/datasets/{again['validation']['id']}/rows").json()["rows"]] \
        == got[val["id"]]
    listed = client.get(f"/api/projects/{project}/datasets").json()
    assert [d["rows"] for d in listed] == [10, 8, 2, 8, 2] and len(files(client)) == 5

    for bad in ({"val_fraction": 1.5}, {"val_fraction": 0}, {"val_fraction": "half"}, {"seed": -1}):
        assert client.post(f"/api/datasets/{dataset}/split", json=bad).status_code == 422
    single = uploaded(client, project, rows[:1])
    refused = client.post(f"/api/datasets/{single}/split", json={"val_fraction": 0.5})
    assert refused.status_code == 400 and "at least 2 rows" in refused.json()["error"]
    assert len(files(client)) == 6


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_download_has_a_safe_name_and_reads_back_as_the_same_rows(client, model_dir, fmt):
    project = new_project(client, model_dir)
    rows = [{"prompt": 'Quote "this", then a comma', "completion": "line one\nline two"},
            {"prompt": "Bonjour ?", "completion": "ça va"}]
    dataset = uploaded(client, project, rows, name='../my "data"/ü set')
    response = client.get(f"/api/datasets/{dataset}/download?format={fmt}")
    assert response.status_code == 200, response.text
    disposition = response.headers["content-disposition"]
    name = re.fullmatch(r'attachment; filename="([A-Za-z0-9._-]+)"', disposition).group(1)
    assert name.endswith(f".{fmt}") and "/" not in name and not name.startswith(".")
    if fmt == "csv":
        assert list(csv.DictReader(io.StringIO(response.content.decode()))) == rows
    again = upload(client, project, f"again.{fmt}", response.content)
    assert again.status_code == 201, again.text
    assert [r["row"] for r in client.get(f"/api/datasets/{again.json()['dataset']['id']}/rows").json()["rows"]] \
        == rows


def test_a_download_of_a_wrong_format_or_with_broken_lines_is_a_sentence(client, model_dir):
    project = new_project(client, model_dir)
    dataset = upload(client, project, "d.jsonl", jsonl(QA[:1]) + BROKEN.encode() + b"\n").json()["dataset"]["id"]
    wrong = client.get(f"/api/datasets/{dataset}/download?format=xlsx")
    assert wrong.status_code == 422 and "'jsonl', 'csv' or 'parquet'" in wrong.json()["error"]
    broken = client.get(f"/api/datasets/{dataset}/download?format=csv")
    assert broken.status_code == 400 and "row 2" in broken.json()["error"]
    as_uploaded = client.get(f"/api/datasets/{dataset}/download?format=jsonl")
    assert as_uploaded.status_code == 200 and as_uploaded.content.decode().splitlines()[1] == BROKEN


def test_deleting_a_dataset_removes_its_working_copy(client, model_dir):
    project = new_project(client, model_dir)
    keep = uploaded(client, project, QA)
    gone = uploaded(client, project, QA[:2])
    assert len(files(client)) == 2
    assert client.delete(f"/api/datasets/{gone}").json() == {"deleted": gone}
    assert len(files(client)) == 1 and [d["id"] for d in client.get(f"/api/projects/{project}/datasets").json()] \
        == [keep]
    assert client.get(f"/api/datasets/{gone}").status_code == 404
    missing = client.get(f"/datasets/{gone}", headers={"accept": "text/html"})
    assert missing.status_code == 404 and f"there is no dataset {gone}" in missing.text
    assert client.get(f"/api/datasets/{2**70}").status_code == 422  # beyond any database id: refused, not a 500


def test_the_project_page_lists_datasets_with_the_upload_form_and_train_links(client, model_dir):
    project = new_project(client, model_dir)
    dataset = uploaded(client, project, QA, name="qa pairs")
    found = Elements(page(client, f"/projects/{project}"))
    forms = {f["id"] for f in found.having("form", "id")}
    assert "upload-dataset" in forms
    assert any(i.get("name") == "file" and i.get("type") == "file" for i in found.having("input", "name"))
    hrefs = {a["href"] for a in found.having("a", "href")}
    assert f"/datasets/{dataset}" in hrefs and f"/projects/{project}/train?dataset={dataset}" in hrefs
    on_page = Elements(page(client, f"/datasets/{dataset}"))
    ids = {attrs["id"] for _tag, attrs in on_page.tags if "id" in attrs}
    assert {"rows", "add-row", "token-stats", "template-view", "split-form", "download", "train-on",
            "download-jsonl", "download-csv", "download-parquet", "search-form"} <= ids
    train = page(client, f"/projects/{project}/train?dataset={dataset}")
    assert "selected" in re.search(r"<option value=\"[0-9a-f]{32}\.jsonl\"[^>]*>qa pairs", train).group(0)


def test_dataset_blockers_name_the_lines_still_to_fix(client, model_dir):
    project = new_project(client, model_dir)
    dataset = upload(client, project, "d.jsonl", jsonl(QA[:1]) + BROKEN.encode() + b"\n").json()["dataset"]
    path = client.app.state.settings.home / "files" / dataset["file"]
    assert "row 2" in dataset_blockers(path)
    client.delete(f"/api/datasets/{dataset['id']}/rows/2")
    assert dataset_blockers(path) is None
