"""How `model.name` is resolved: local paths, built-in names and the local Hugging Face cache without the network,
the hub only for an owner/name id and only when it answers at once; every refusal a sentence.  And how long a
sequence a model takes (`data.max_length` against the model's context)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model_folder
from huggingface_hub import constants as hub_constants

from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.models import check_max_length, context_length, loader, resolve_model_source


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """An empty Hugging Face cache and tunesmith home in the test's folder, and the hub not switched off."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads HF_HOME once, at import; its functions read the constant when called
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "tunesmith-home"))


@pytest.fixture
def network_attempts(monkeypatch):
    """Every attempt to resolve a host name or open a connection (each refused), in order."""
    attempts: list[str] = []

    def refuse(what):
        def refused(*args, **kwargs):
            attempts.append(what)
            raise OSError(f"the test forbids the network ({what})")
        return refused

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    return attempts


def resolve_error(name: str, key: str = "model.name") -> str:
    with pytest.raises(UserError) as err:
        resolve_model_source(name, key=key)
    return str(err.value)


def cache_entry(root: Path, repo_id: str, with_weights: bool = True) -> Path:
    """A model in huggingface_hub's cache layout: models--owner--name/snapshots/<commit>/ and refs/main naming the
    commit.  The snapshot holds the tiny Llama from conftest (or only its config.json)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hf" / "hub" / f"models--{repo_id.replace('/', '--')}"
    made, _ = save_tiny_model_folder(root / "made", [])
    snapshot = repo / "snapshots" / commit
    snapshot.parent.mkdir(parents=True)
    made.rename(snapshot)
    if not with_weights:
        for weights in snapshot.glob("model*.safetensors*"):
            weights.unlink()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# --- names that never need the network ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smollm2-135m-instruc", "smollm2-135m-instrcut", "SmolLM2-135M-Instruct"])
def test_a_mistyped_builtin_name_suggests_the_builtin_without_the_network(name, network_attempts):
    assert resolve_error(name) == (
        f"model.name: {name} is not a built-in model, a local folder or file, or a model in the Hugging Face cache; "
        "did you mean smollm2-135m-instruct? (`tunesmith models` lists the built-in ones)"
    )
    assert network_attempts == []


def test_a_name_close_to_nothing_says_what_a_name_can_be(network_attempts):
    message = resolve_error("qwen")
    assert "did you mean" not in message.lower() and "owner/name" in message and "`tunesmith models`" in message
    assert network_attempts == []


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_a_hub_id_with_the_hub_switched_off_fails_at_once(variable, monkeypatch, network_attempts):
    monkeypatch.setenv(variable, "1")
    message = resolve_error("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert message.startswith("model.name: HuggingFaceTB/SmolLM2-135M-Instruct is a hub id, but the Hugging Face cache")
    assert "HF_HUB_OFFLINE" in message and "set model.name to a local folder" in message
    assert message.endswith("Did you mean smollm2-135m-instruct?")
    assert network_attempts == []


@pytest.mark.parametrize("name", ["./my-modle", "../no-such-model", "/no/such/model", "~/no-such-model-3f9",
                                  "models/llama/3b", "weights.gguf", "my models/llama"])
def test_a_path_that_does_not_exist_fails_at_once(name, tmp_path, monkeypatch, network_attempts):
    monkeypatch.chdir(tmp_path)
    message = resolve_error(name)
    assert message.startswith(f"model.name: {name} does not exist (no folder or file at ") and "check the path" in message
    assert network_attempts == []


def test_a_mistyped_path_suggests_the_folder_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    assert resolve_error("./my-modle").endswith("check the path. Did you mean ./my-model?")


def test_a_long_or_odd_name_is_a_sentence(network_attempts):
    for name in ["a" * 5000, "bad\x00name", "  "]:
        assert resolve_error(name).startswith("model.name")
    assert network_attempts == []


def test_things_that_exist_but_are_no_model_each_get_their_sentence(tmp_path, network_attempts):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json, so it is not a Hugging Face model folder" in resolve_error(str(empty))

    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "tiny.Q4_0.gguf").write_bytes(b"GGUF....")
    assert resolve_error(str(holder)).endswith(f"set model.name to that file ({holder / 'tiny.Q4_0.gguf'}).")

    adapter_run = tmp_path / "adapter-run"
    (adapter_run / "adapter").mkdir(parents=True)
    (adapter_run / "config.yaml").write_text("method: lora\n")
    assert f"is a tunesmith run folder, not a model folder; merge its adapter into its base first (`tunesmith merge " \
           f"{adapter_run} --out DIR`)" in resolve_error(str(adapter_run))

    full_run = tmp_path / "full-run"
    (full_run / "model").mkdir(parents=True)
    (full_run / "model" / "config.json").write_text("{}")
    (full_run / "config.yaml").write_text("method: full\n")
    assert resolve_error(str(full_run)).endswith(f"set model.name to {full_run / 'model'}, the model it trained.")

    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("<html>404 Not Found</html>")
    assert "does not start with the GGUF magic bytes" in resolve_error(str(not_gguf))

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 16)
    assert "is a file but not a .gguf file; set model.name to the folder that holds config.json" in \
        resolve_error(str(weights))
    assert network_attempts == []


def test_a_local_folder_wins_over_the_cache_and_the_hub(tmp_path, monkeypatch, network_attempts):
    folder, _ = save_tiny_model_folder(tmp_path / "org", [])
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("org/tiny-llama") == "org/tiny-llama"  # a relative folder shaped like a hub id
    assert resolve_model_source(str(folder)) == str(folder)
    assert network_attempts == []


# --- the local Hugging Face cache --------------------------------------------------------------------------------


def test_a_cached_hub_id_resolves_to_its_snapshot_and_loads_without_the_network(tmp_path, network_attempts):
    snapshot = cache_entry(tmp_path, "tiny-org/tiny-llama")
    source = resolve_model_source("tiny-org/tiny-llama")
    assert source == str(snapshot)
    cfg = load_config(None, ["model.name=tiny-org/tiny-llama"])
    tokenizer = loader.load_tokenizer(source, cfg.model)
    model = loader.load_model(source, cfg, torch.float32)
    ids = torch.tensor([tokenizer("The capital of France is Paris.")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    assert context_length("tiny-org/tiny-llama") == 1024  # its config.json, read from the cache
    assert network_attempts == []


def test_a_mistyped_cached_hub_id_suggests_the_cached_one(tmp_path, monkeypatch, network_attempts):
    cache_entry(tmp_path, "tiny-org/tiny-llama")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_error("tiny-org/tiny-lama").endswith("Did you mean tiny-org/tiny-llama?")
    assert network_attempts == []


def test_a_cache_with_only_a_config_is_not_a_model_offline(tmp_path, monkeypatch, network_attempts):
    cache_entry(tmp_path, "tiny-org/tiny-llama", with_weights=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "holds only part of it (config.json, no weights)" in resolve_error("tiny-org/tiny-llama")
    assert network_attempts == []


# --- the hub: asked once, briefly ---------------------------------------------------------------------------------


def test_an_unreachable_hub_is_one_question_and_a_sentence(monkeypatch, network_attempts):
    import huggingface_hub

    questions = []
    ask = huggingface_hub.get_hf_file_metadata

    def counted(url, **kwargs):
        questions.append((url, kwargs))
        return ask(url, **kwargs)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", counted)
    message = resolve_error("some-org/some-model")
    assert message.startswith("model.name: some-org/some-model is not in the local Hugging Face cache and the hub "
                              "could not be reached (")
    assert "hf download some-org/some-model --local-dir DIR" in message
    assert [(url.endswith("some-org/some-model/resolve/main/config.json"), kwargs["retry_on_errors"])
            for url, kwargs in questions] == [(True, False)]  # one question, no retries
    assert network_attempts  # it did try


def test_a_hub_that_does_not_answer_is_given_up_on(monkeypatch):
    """A DNS lookup that hangs is not bounded by the request's own timeout; the probe's thread bounds it."""
    answer = threading.Event()

    def hanging_lookup(*args, **kwargs):
        answer.wait(5)
        raise OSError("no answer")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    monkeypatch.setattr(loader, "HUB_PROBE_S", 0.2)
    try:
        assert "hub could not be reached (no answer within 0.2 s)" in resolve_error("some-org/some-model")
    finally:
        answer.set()


@pytest.fixture
def fake_hub(monkeypatch):
    """A local HTTP server standing in for the hub: `fake_hub[repo_id] = (status, headers)` says how it answers a
    HEAD request for that repo's config.json (unknown repos: 404 RepoNotFound)."""
    answers: dict[str, tuple[int, dict]] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 (http.server's name)
            repo_id = "/".join(self.path.strip("/").split("/")[:2])
            status, headers = answers.get(repo_id, (404, {"X-Error-Code": "RepoNotFound"}))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    local = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", local + "/{repo_id}/resolve/{revision}/{filename}")
    # huggingface_hub also fetches a list from the hub once per process (utils/_detect_agent.py); keep it local too
    monkeypatch.setattr(hub_constants, "ENDPOINT", local)
    yield answers
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status, headers, expected", [
    (404, {"X-Error-Code": "RepoNotFound"}, "is not a model on the Hugging Face hub (or it is private"),
    (403, {"X-Error-Code": "GatedRepo"}, "is a gated model on the Hugging Face hub; accept its terms at "
                                         "https://huggingface.co/some-org/some-model"),
    (404, {"X-Error-Code": "EntryNotFound"}, "on the Hugging Face hub has no config.json"),
    (503, {}, "the Hugging Face hub answered 503 when asked for some-org/some-model"),
])
def test_hub_refusals_are_sentences(fake_hub, status, headers, expected):
    fake_hub["some-org/some-model"] = (status, headers)
    message = resolve_error("some-org/some-model")
    assert message.startswith("model.name: ") and expected in message


def test_a_hub_id_the_hub_has_is_handed_to_transformers(fake_hub):
    fake_hub["some-org/some-model"] = (200, {"X-Repo-Commit": "0" * 40, "ETag": '"abc"'})
    assert resolve_model_source("some-org/some-model") == "some-org/some-model"


def test_a_mistyped_hub_id_suggests_a_cached_one(tmp_path, fake_hub):
    cache_entry(tmp_path, "tiny-org/tiny-llama")
    assert resolve_error("tiny-org/tiny-lama").endswith("check the id. Did you mean tiny-org/tiny-llama?")


def test_the_config_key_is_named(network_attempts):
    assert resolve_error("smollm2-135m-instruc", key="teacher.name").startswith("teacher.name: smollm2-135m-instruc ")


# --- context length ----------------------------------------------------------------------------------------------


def saved_config(folder: Path, config) -> str:
    config.save_pretrained(folder)
    return str(folder)


def written_config(folder: Path, raw: dict) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(raw))
    return str(folder)


def test_context_length_reads_each_familys_key(tmp_path, tiny_llama_config):
    from transformers import GPT2Config, LlamaConfig, T5Config

    assert context_length(saved_config(tmp_path / "llama", tiny_llama_config)) == 1024
    assert context_length(saved_config(tmp_path / "gpt2", GPT2Config(n_positions=256))) == 256
    assert context_length(written_config(tmp_path / "old-gpt2", {"model_type": "gpt2", "n_ctx": 1024})) == 1024
    # T5 places tokens by relative position: no hard limit, even where an old config.json says n_positions: 512
    assert context_length(saved_config(tmp_path / "t5", T5Config(d_model=32))) is None
    assert context_length(written_config(tmp_path / "old-t5", {"model_type": "t5", "n_positions": 512})) is None
    # a multimodal model's text part
    gemma3 = {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "max_position_embeddings": 8192}}
    assert context_length(written_config(tmp_path / "gemma3", gemma3)) == 8192
    # YaRN stretching the original window (as Qwen2.5 documents it) counts; Llama 3.1 already writes the stretched one
    yarn = LlamaConfig(max_position_embeddings=4096,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096})
    assert context_length(saved_config(tmp_path / "yarn", yarn)) == 16384
    llama31 = {"model_type": "llama", "max_position_embeddings": 131072, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}}
    assert context_length(written_config(tmp_path / "llama31", llama31)) == 131072
    dynamic = LlamaConfig(max_position_embeddings=2048, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert context_length(saved_config(tmp_path / "dynamic", dynamic)) is None
    assert context_length(str(tmp_path / "nowhere")) is None
    assert context_length(written_config(tmp_path / "broken", {})) is None


def test_check_max_length_refuses_a_longer_max_length(tmp_path, tiny_llama_config):
    folder = saved_config(tmp_path / "tiny", tiny_llama_config)
    cfg = load_config(None, ["model.name=tiny-org/tiny", "data.max_length=4096"])
    with pytest.raises(UserError) as err:
        check_max_length(cfg, folder)
    assert str(err.value) == ("data.max_length: 4096 is longer than tiny-org/tiny's context of 1024 tokens; set "
                              "data.max_length to 1024 or less.")
    check_max_length(load_config(None, ["model.name=tiny-org/tiny", "data.max_length=1024"]), folder)
