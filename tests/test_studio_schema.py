"""The studio's HTTP surface under hostile input.  schemathesis fuzzes every operation of the studio's OpenAPI
document with the token on every call (so changes get past the guard and are tried for real) and finds no 5xx and
no error without its sentence.  Then, one by one: uploads named with `../`, bodies over the limit, wrong file
types, garbage named .parquet, JSON where a number belongs, a foreign Host, another site's POST and a studio bound
beyond this machine without a token are refused with a sentence: JSON {"error": ...} for /api, a page for a
browser."""

from __future__ import annotations

import http.client
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import schemathesis
from conftest import REPEAT_ROWS, save_tiny_model_folder, save_tiny_run_config
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure
from studio_fixtures import StudioProcess, free_port
from test_studio_app import studio

from tunesmith import api
from tunesmith.studio import app as studio_app
from tunesmith.studio import store
from tunesmith.studio.app import StudioSettings, create_app

HOST = "127.0.0.1:7860"  # the Host header a studio on its default port answers
GENERATED = re.compile(r"[0-9a-f]{32}\.jsonl")  # the name of a dataset's working copy under HOME/files
ROWS_JSONL = "".join(json.dumps(row) + "\n" for row in REPEAT_ROWS)
ROWS_CSV = "instruction,input,output\n" + "".join(f"{r['instruction']},,{r['output']}\n" for r in REPEAT_ROWS)
EXAMPLES = 10  # requests per operation and kind (valid, invalid)


def is_sentence(text: object) -> bool:
    return isinstance(text, str) and len(text.split()) >= 3 and "Traceback" not in text


def error_of(response) -> str:
    """The sentence of an /api refusal, whose body must be exactly {"error": sentence}."""
    body = response.json()
    assert set(body) == {"error"} and is_sentence(body["error"]), body
    return body["error"]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# schemathesis over every operation


def fake_model(*_args, **_kwargs):
    """Stands in for api.load_chat/load_base_chat: the fuzz tests the HTTP layer, not generation."""
    return object(), None, "chat", None


def fake_reply(*_args, **_kwargs):
    yield from ("a tiny", " answer")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """A finished run folder of a tiny model (2 steps), made as `tunesmith train` makes one; beside it the
    tiny-llama folder and run.yaml."""
    root = tmp_path_factory.mktemp("fuzz-run")
    api.train(api.load_config(save_tiny_run_config(root), ["training.max_steps=2"]), root / "cli-run")
    return root / "cli-run"


def seed(client: TestClient, cli_run: Path) -> dict[str, list[int]]:
    """Rows for the fuzzed ids to find (each path parameter's ids: the first of each is the richest): a project
    whose base model is a tiny folder, a dataset, a finished run (`cli_run`), an interrupted one, a conversation
    with a message, a queued evaluation job."""
    config = cli_run.parent / "run.yaml"
    project = client.post("/api/projects", json={"name": "fuzz", "base_model": str(cli_run.parent / "tiny-llama")})
    assert project.status_code == 201, project.text
    pid = project.json()["id"]
    dataset = client.post(f"/api/projects/{pid}/datasets", files={"file": ("rows.jsonl", ROWS_JSONL)})
    assert dataset.status_code == 201, dataset.text
    finished = client.post("/api/runs/folder", json={"folder": str(cli_run), "project_id": pid}).json()
    assert finished["state"] == "finished", finished
    queued = client.post(f"/api/projects/{pid}/runs", json={"name": "q", "config_yaml": config.read_text()}).json()
    assert client.post(f"/api/runs/{queued['id']}/stop").json()["state"] == "interrupted"  # never launched
    chat = client.post(f"/api/runs/{finished['id']}/chat/sessions", json={}).json()
    assert client.post(f"/api/chat/sessions/{chat['id']}/messages", json={"content": "Hello"}).status_code == 201
    job = client.post(f"/api/runs/{finished['id']}/eval", json={})
    assert job.status_code == 202, job.text
    return {"project_id": [pid], "dataset_id": [dataset.json()["dataset"]["id"]],
            "run_id": [finished["id"], queued["id"]], "session_id": [chat["id"]], "job_id": [job.json()["id"]],
            "number": [1, 2], "index": [0]}



def fuzz(operation, mode, seeded: dict, headers: dict, statuses: dict, failures: list) -> None:
    """EXAMPLES requests of `operation` in `mode`; each response's status goes to `statuses`, each 5xx or error
    without its sentence to `failures` (so one run lists them all)."""

    @given(case=operation.as_strategy(mode), pick=st.integers(-1, 1))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def check(case, pick):
        if pick >= 0 and mode == GenerationMode.POSITIVE:  # a row that is there, else the fuzzed id
            for name in case.path_parameters or {}:
                if name in seeded:
                    case.path_parameters[name] = seeded[name][pick % len(seeded[name])]
        response = case.call(headers=headers, timeout=10)  # an event stream of a queued run never ends
        statuses.setdefault(case.operation.label, set()).add(response.status_code)
        try:
            case.validate_response(response, checks=[not_a_server_error])
            if response.status_code >= 400:
                error_of(response)
        except (AssertionError, Failure) as exc:
            failures.append(f"{case.as_curl_command()}\n  -> {response.status_code} {response.text[:300]}\n"
                            f"  {str(exc)[:300]}")

    check()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_schemathesis_finds_no_5xx_and_every_error_is_a_sentence(backend, cli_run, tmp_path, monkeypatch, request):
    """On each database the studio keeps its state in (PostgreSQL refuses what SQLite takes: a NUL character, an
    id past 4 bytes): every operation, valid and invalid requests (EXAMPLES of each, drawn the same way every
    run), each path id either fuzzed or one of the seeded rows, DELETEs last so the rows live through the rest.
    Nothing heavy starts: the run manager and the job runner are not started (a run fuzzed into the queue stays
    queued), the chat's models are stand-ins, and the hub is off (a fuzzed base model name is never looked up)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(api, "load_base_chat", fake_model)
    monkeypatch.setattr(api, "load_chat", fake_model)
    monkeypatch.setattr(api, "reply", fake_reply)
    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    app = create_app(StudioSettings(home=tmp_path / "home", db=url))
    app.state.runs.start = lambda: None
    app.state.jobs.start = lambda: None
    headers = {"X-Tunesmith-Token": app.state.token, "Host": HOST}
    with TestClient(app, base_url=f"http://{HOST}", headers=headers) as client:
        seeded = seed(client, cli_run)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Host": HOST})
    operations = sorted((result.ok() for result in schema.get_all_operations()),
                        key=lambda op: op.method.upper() == "DELETE")
    assert len(operations) >= 20  # the whole API, not an empty document
    statuses: dict[str, set[int]] = {}
    failures: list[str] = []
    try:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if mode == GenerationMode.NEGATIVE and not operation.body and not list(operation.iter_parameters()):
                    continue  # nothing to make invalid
                fuzz(operation, mode, seeded, headers, statuses, failures)
    finally:  # schemathesis keeps the app's lifespan open until the interpreter exits: let go of the database now
        app.state.engine.dispose()
    assert not failures, f"{len(failures)} failing request(s):\n" + "\n".join(failures[:20])
    # the seeded rows were reached: the fuzz went past the 404s
    for label in ("GET /api/runs/{run_id}", "GET /api/datasets/{dataset_id}", "GET /api/chat/sessions/{session_id}",
                  "GET /api/jobs/{job_id}", "POST /api/chat/sessions/{session_id}/reply"):
        assert 200 in statuses[label], (label, statuses[label])
    assert 201 in statuses["POST /api/projects"] and 422 in statuses["POST /api/projects"]


# ---------------------------------------------------------------------------------------------------------------
# each refusal, one by one


@pytest.fixture
def project(tmp_path):
    """(client, project id, home): a studio on tmp_path/home with a project whose base model is a tiny folder."""
    model_dir, _ = save_tiny_model_folder(tmp_path, REPEAT_ROWS)
    with studio(tmp_path / "home") as client:
        made = client.post("/api/projects", json={"name": "p", "base_model": str(model_dir)})
        assert made.status_code == 201, made.text
        yield client, made.json()["id"], tmp_path / "home"


def test_upload_names_never_reach_the_file_system(project, tmp_path):
    client, pid, home = project
    before = files_under(tmp_path)
    for sent, shown, body in (("../../etc/passwd.jsonl", "passwd.jsonl", ROWS_JSONL), ("..\\x.csv", "x.csv", ROWS_CSV),
                              ("..\\..\\win\\x.jsonl", "x.jsonl", ROWS_JSONL),
                              ("/abs/olute/rows.jsonl", "rows.jsonl", ROWS_JSONL)):
        made = client.post(f"/api/projects/{pid}/datasets", files={"file": (sent, body)})
        assert made.status_code == 201, made.text
        dataset = made.json()["dataset"]
        assert dataset["source_name"] == shown and dataset["rows"] == len(REPEAT_ROWS)
        assert GENERATED.fullmatch(dataset["file"]) and (home / "files" / dataset["file"]).is_file()
    new = files_under(tmp_path) - before
    # the working copies (and the database's files), nothing else, and nothing outside the studio's home
    kept = {home / "files" / d["file"] for d in client.get(f"/api/projects/{pid}/datasets").json()}
    assert len(kept) == 4 and {p for p in new if p.parent == home / "files"} == kept
    assert all(p.parent == home / "files" or p.name.startswith("studio.db") for p in new), sorted(new)
    assert not (tmp_path / "etc").exists() and not (home / "etc").exists() and not Path("/abs").exists()


@pytest.mark.parametrize("name", ["setup.exe", "model.pkl", "rows", "rows.jsonl.exe"])
def test_a_wrong_file_type_is_refused_with_a_sentence(project, name):
    client, pid, home = project
    refused = client.post(f"/api/projects/{pid}/datasets", files={"file": (name, ROWS_JSONL)})
    assert refused.status_code == 400
    assert ".jsonl" in error_of(refused) and name in error_of(refused)
    assert not any((home / "files").iterdir())  # nothing kept


def test_garbage_named_parquet_or_json_is_refused_with_a_sentence(project):
    client, pid, home = project
    for name, body in (("rows.parquet", pickle.dumps({"a": [1, 2, 3]})), ("rows.parquet", os.urandom(4096)),
                       ("rows.json", b"\x80\x03garbage"), ("rows.csv", b"")):
        refused = client.post(f"/api/projects/{pid}/datasets", files={"file": (name, body)})
        assert refused.status_code == 400, (name, refused.text)
        assert name in error_of(refused)
    assert not any((home / "files").iterdir())


def test_a_body_over_the_limit_is_refused_with_413(project, monkeypatch):
    client, pid, home = project
    # a Content-Length over the limit is refused before the body is read
    said = client.post(f"/api/projects/{pid}/datasets", content=b"x" * 100,
                       headers={"Content-Length": str(studio_app.MAX_BODY + 1),
                                "Content-Type": "multipart/form-data; boundary=b"})
    assert said.status_code == 413 and "MiB" in error_of(said)
    # a body that grows past the data file limit while it is read (chunked: no Content-Length to judge by)
    monkeypatch.setattr(store, "DATA_LIMIT", 2 * store.CHUNK)
    big = client.post(f"/api/projects/{pid}/datasets", files={"file": ("big.jsonl", ROWS_JSONL * 30_000)})
    assert big.status_code == 413 and "big.jsonl" in error_of(big)
    assert not any((home / "files").iterdir())


def test_the_wrong_json_types_are_422_sentences(project):
    client, pid, _ = project
    for method, url, body in (("POST", f"/api/projects/{pid}/runs", {"config_yaml": "{}", "parent_id": "abc"}),
                              ("PUT", f"/api/projects/{pid}", {"name": ["a list"]}),
                              ("POST", "/api/projects", [1, 2]),
                              ("POST", "/api/config/yaml", {"values": {"training.max_steps": 5}})):
        refused = client.request(method, url, json=body)
        assert refused.status_code == 422, (url, refused.text)
        assert error_of(refused).startswith("the request is not valid")
    refused = client.post(f"/api/projects/{pid}/runs", content=b"{not json", headers={"Content-Type":
                                                                                        "application/json"})
    assert refused.status_code == 422 and error_of(refused)
    assert client.get("/api/runs/abc").status_code == 422 and error_of(client.get("/api/runs/abc"))
    assert client.get("/api/runs/99999999999999999999999").status_code == 404  # past the database's integers


def test_foreign_host_and_another_sites_post_are_refused_json_for_the_api_and_a_page_for_a_browser(project):
    client, pid, _ = project
    token = client.headers["X-Tunesmith-Token"]
    rebound = client.get("/api/projects", headers={"Host": "evil.example:7860"})
    assert rebound.status_code == 403 and "127.0.0.1" in error_of(rebound)
    page = client.get("/", headers={"Host": "evil.example", "Accept": "text/html"})
    assert page.status_code == 403 and page.headers["content-type"].startswith("text/html")
    assert "answers requests for 127.0.0.1" in page.text and token not in page.text  # a refusal never shows it
    other_site = client.post("/api/projects", json={"name": "x"}, headers={"Origin": "https://evil.example"})
    assert other_site.status_code == 403 and "another site" in error_of(other_site)
    referred = client.post(f"/api/projects/{pid}/runs", json={"config_yaml": "{}"},
                           headers={"Referer": "http://evil.example/page"})
    assert referred.status_code == 403 and "another site" in error_of(referred)
    cross = client.post("/api/projects", json={"name": "y"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    assert [p["name"] for p in client.get("/api/projects").json()] == ["p"]  # nothing was made
    # pages' errors are pages with the sentence
    missing = client.get("/projects/999", headers={"Accept": "text/html"})
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    assert "there is no project 999" in missing.text
    wrong = client.get("/runs/abc", headers={"Accept": "text/html"})
    assert wrong.status_code == 422 and "the request is not valid" in wrong.text
    nowhere = client.get("/no/such/page", headers={"Accept": "text/html"})
    assert nowhere.status_code == 404 and "<html" in nowhere.text.lower()
    assert client.get("/api/no/such").status_code == 404 and error_of(client.get("/api/no/such"))


def test_a_studio_with_a_token_refuses_readers_without_it_with_a_page_that_does_not_show_it(tmp_path):
    with studio(tmp_path / "home", token="s3cret-token") as client:
        client.headers.pop("X-Tunesmith-Token")
        page = client.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 401 and "s3cret-token" not in page.text and "?token=" in page.text
        assert client.get("/api/projects").status_code == 401 and "token" in error_of(client.get("/api/projects"))


def test_binding_beyond_this_machine_without_a_token_exits_with_a_sentence(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TUNESMITH_STUDIO_TOKEN", "TUNESMITH_STUDIO_DB")}
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "studio", "--host", "0.0.0.0", "--port",
                           str(free_port()), "--home", str(tmp_path / "home")], capture_output=True, text=True,
                          env=env, timeout=120, stdin=subprocess.DEVNULL)
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "--token" in said and "Traceback" not in said, said
    assert "tunesmith studio: http" not in said  # it never served


def test_a_served_studio_refuses_an_oversized_body_before_reading_it(tmp_path):
    """Over the wire: a Content-Length of 300 MiB with a few bytes sent is answered 413 at once (the studio does
    not wait for the rest), and a foreign Host is refused there too."""
    with StudioProcess(tmp_path / "studio") as served:
        connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
        connection.putrequest("POST", "/api/projects/1/datasets")
        connection.putheader("Content-Length", str(300 * 2**20))
        connection.putheader("Content-Type", "multipart/form-data; boundary=b")
        connection.putheader("X-Tunesmith-Token", served.token)
        connection.endheaders(b"--b\r\n")
        response = connection.getresponse()
        assert response.status == 413 and "MiB" in json.loads(response.read())["error"]
        connection.close()
        connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
        connection.request("GET", "/api/projects", headers={"Host": "rebound.example"})
        response = connection.getresponse()
        assert response.status == 403 and "127.0.0.1" in json.loads(response.read())["error"]
        connection.close()
        assert "Traceback" not in served.log_text()
