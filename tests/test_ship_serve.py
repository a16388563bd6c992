"""`tunesmith serve` against a live server on 127.0.0.1 (port 0, in a thread) serving a tiny trained run,
spoken to with the official `openai` client and with raw http.client: replies equal the greedy answers
computed directly with tunesmith.models.generate.generate_answers, streamed text equals non-streamed text,
concurrent requests never mix, bad requests get OpenAI's error shape with the right status, and
schemathesis finds every response of the app as its OpenAPI document says."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_train import ROWS, _config

from tunesmith.cli import build_parser
from tunesmith.data.tokens import chat_ids
from tunesmith.errors import UserError
from tunesmith.models.generate import ReplyStreamer, generate_answers
from tunesmith.models.run_folder import load_for_inference, open_run
from tunesmith.ship.serve import (
    GenerationRequest,
    Generator,
    RequestError,
    build_app,
    is_loopback,
    make_server,
)

openai = pytest.importorskip("openai", reason="the serve tests speak to the server with the `openai` client")

KEY = "test-key"
MAX_NEW = 16
LIMIT = 64  # the served run's --max-tokens-limit
# System prompts make the tiny model's greedy answers differ from prompt to prompt (it barely trained).
TOPICS = ["Say the colour of the sky.", "Count to three.", "Why did the chicken cross the road?",
          "Name three fruits: apple", "Doctor: How are you feeling today?",
          "The meeting is at three thirty on Friday.", "Translate to French: good morning.", "Multiply: 4 * 6"]
CHATS = [[{"role": "system", "content": t}, {"role": "user", "content": "Answer briefly and politely."}]
         for t in TOPICS]
TEXTS = ["The quick brown fox", "Doctor: How are you", "Name three colours:", "The capital of Italy"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A LoRA run of a tiny Llama, two steps: trained, yet still rambling, so answers are long and varied."""
    from conftest import save_tiny_model_folder

    from tunesmith import api

    root = tmp_path_factory.mktemp("serve")
    model_dir, data = save_tiny_model_folder(root, ROWS)
    run_dir = root / "run"
    api.train(_config(root / "tiny-llama", data, "training.max_steps=2", "training.learning_rate=1e-3",
                         "lora.dropout=0.0", "eval.enabled=false"), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def server(tiny_run):
    server = make_server(tiny_run, "127.0.0.1", 0, api_key=KEY, max_tokens_limit=LIMIT, log_requests=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def expected(tiny_run):
    """The greedy answers computed without the server: the run loaded the same way, generate_answers one
    prompt at a time (no padding), plus the prompt ids and each reply's token count."""
    model, tokenizer, _ = load_for_inference(open_run(tiny_run), merged=True)
    chat_prompts = [chat_ids(tokenizer, m, add_generation_prompt=True) for m in CHATS]
    text_prompts = [list(tokenizer(t)["input_ids"]) for t in TEXTS]
    prompts = chat_prompts + text_prompts
    answers = generate_answers(model, tokenizer, prompts, MAX_NEW, 1, "cpu")
    lengths = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)  # [1, prompt + new]
            lengths.append(out.shape[1] - len(ids))
    n = len(CHATS)
    return {"chat": answers[:n], "text": answers[n:], "chat_ids": chat_prompts, "text_ids": text_prompts,
            "chat_len": lengths[:n], "text_len": lengths[n:]}


def _client(server, key=KEY):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def _raw(server, method, path, body=None, headers=None):
    """(status, headers, parsed JSON or text) for one request with http.client (JSON said to be JSON)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Authorization": f"Bearer {KEY}",
                                                       "Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        raw = response.read().decode()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw
        return response.status, response.headers, parsed  # headers: looked up case-insensitively
    finally:
        conn.close()


def _assert_error(status, body, want_status, param=None):
    assert status == want_status, body
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param


# --- the reply watcher and the generation worker, without HTTP ----------------------------------------


class _CharTokenizer:
    """Token id i decodes to the i-th character of `alphabet`; id 0 is special (dropped)."""

    def __init__(self, alphabet):
        self.alphabet = alphabet

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i] for i in ids if i != 0)


def test_reply_streamer_holds_back_what_could_still_change():
    """A tail that starts a stop string, and a trailing U+FFFD, wait for the next token; the stop string
    and everything after it are never handed out, and the streamer says stop there."""
    tokenizer = _CharTokenizer("\0ab<x>c\ufffd")  # ids: a=1 b=2 <=3 x=4 >=5 c=6 U+FFFD=7
    sent = []
    streamer = ReplyStreamer(tokenizer, sent.append, stop=["<x>"])
    streamer.put(torch.tensor([[1]]))  # the prompt comes first, and is not part of the reply
    out, stops = [], []
    for token in (1, 2, 3, 6, 7, 3, 4, 5, 1):
        streamer.put(torch.tensor([token]))
        out.append("".join(sent))
        sent.clear()
        stops.append(streamer.stopped)
    # "a", "b", then "<" is held (it starts "<x>"), released with "c" once "<c" cannot be "<x>"; the
    # U+FFFD waits for the next token; the second "<" waits, "<x" waits, "<x>" stops: nothing after it
    assert out == ["a", "b", "", "<c", "", "\ufffd", "", "", ""]
    assert stops == [False] * 7 + [True, True]
    assert streamer.tokens_to_stop == 8  # the token that completed "<x>"
    streamer.end()
    assert sent == []  # after a stop string nothing more is handed out

    streamer = ReplyStreamer(tokenizer, sent.append, stop=["<x>"])
    for ids in ([[1]], [1], [3]):
        streamer.put(torch.tensor(ids))
    streamer.end()  # generation ended: the held "<" is part of the reply after all
    assert "".join(sent) == "a<"


def test_generator_stops_at_an_end_token_or_at_max_tokens(tiny_llama, tiny_tokenizer):
    prompt = chat_ids(tiny_tokenizer, [{"role": "user", "content": "Tell me a joke."}], add_generation_prompt=True)
    with torch.no_grad():
        free = tiny_llama.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert tiny_tokenizer.eos_token_id not in free, "the random model should not stop by itself"
    k = next(k for k in range(1, len(free)) if free.index(free[k]) == k)  # a token first seen at k >= 1
    cut = k + 1  # generation stops right after it
    tiny_llama.generation_config.eos_token_id = [free[k]]  # make it an end token
    generator = Generator(tiny_llama, tiny_tokenizer, "cpu")
    try:
        def run(max_tokens):
            request = GenerationRequest(prompt_ids=prompt, max_tokens=max_tokens, temperature=0.0)
            generator.submit(request)
            events = []
            while not events or events[-1][0] not in ("end", "error"):
                events.append(request.events.get(timeout=60))
            return "".join(e[1] for e in events if e[0] == "text"), events[-1]

        text, end = run(8)
        assert end == ("end", "stop", len(prompt), cut)
        assert text == tiny_tokenizer.decode(free[:cut], skip_special_tokens=True)
        text, end = run(cut - 1)
        assert end == ("end", "length", len(prompt), cut - 1)
    finally:
        generator.close()
    with pytest.raises(RequestError) as refused:
        generator.submit(GenerationRequest(prompt_ids=prompt, max_tokens=2))
    assert refused.value.status == 503


# --- the live server --------------------------------------------------------------------------------


def test_chat_completion_equals_the_greedy_answer(server, expected):
    client = _client(server)
    assert len(set(expected["chat"])) >= 6, "the test prompts should have different answers"
    for i in (0, 3):
        reply = client.chat.completions.create(model=server.model_id, messages=CHATS[i], temperature=0,
                                               max_tokens=MAX_NEW)
        assert reply.object == "chat.completion" and reply.model == server.model_id
        choice = reply.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content.strip() == expected["chat"][i]
        assert choice.finish_reason == ("length" if expected["chat_len"][i] == MAX_NEW else "stop")
        assert reply.usage.prompt_tokens == len(expected["chat_ids"][i])
        assert reply.usage.completion_tokens == expected["chat_len"][i]
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chunks_concatenate_to_the_same_reply(server, expected):
    client = _client(server)
    whole = client.chat.completions.create(model=server.model_id, messages=CHATS[1], temperature=0, max_tokens=MAX_NEW)
    chunks = list(client.chat.completions.create(model=server.model_id, messages=CHATS[1], temperature=0,
                                                 max_tokens=MAX_NEW, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([t for t in texts if t]) > 1  # it really came in pieces
    assert "".join(texts) == whole.choices[0].message.content
    assert "".join(texts).strip() == expected["chat"][1]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[:-1] == [None] * (len(finishes) - 1) and finishes[-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()

    # on the wire: `data: {json}` events, blank-line separated, ending with `data: [DONE]`
    status, headers, text = _raw(server, "POST", "/v1/chat/completions",
                                 {"messages": CHATS[1], "temperature": 0, "max_tokens": 4, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_completions_continue_plain_text(server, expected):
    client = _client(server)
    for i, prompt in enumerate(TEXTS):
        reply = client.completions.create(model=server.model_id, prompt=prompt, temperature=0, max_tokens=MAX_NEW)
        assert reply.object == "text_completion"
        assert reply.choices[0].text.strip() == expected["text"][i]
        assert reply.usage.prompt_tokens == len(expected["text_ids"][i])
        assert reply.usage.completion_tokens == expected["text_len"][i]
    streamed = client.completions.create(model=server.model_id, prompt=TEXTS[0], temperature=0, max_tokens=MAX_NEW,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed).strip() == expected["text"][0]


def test_a_stop_string_cuts_the_reply_before_it(server):
    client = _client(server)
    full = client.completions.create(model=server.model_id, prompt=TEXTS[2], temperature=0, max_tokens=MAX_NEW)
    text = full.choices[0].text
    cut = next(k for k in range(3, len(text) - 2) if text.find(text[k:k + 2]) == k)  # first occurrence at k
    stop = text[cut:cut + 2]
    short = client.completions.create(model=server.model_id, prompt=TEXTS[2], temperature=0, max_tokens=MAX_NEW,
                                      stop=[stop, "never-seen"])
    assert short.choices[0].text == text[:cut]
    assert short.choices[0].finish_reason == "stop"
    assert short.usage.completion_tokens < full.usage.completion_tokens
    streamed = client.completions.create(model=server.model_id, prompt=TEXTS[2], temperature=0, max_tokens=MAX_NEW,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:cut]


def test_sampling_with_a_seed_repeats(server):
    client = _client(server)

    def sample(seed):
        return client.chat.completions.create(model=server.model_id, messages=CHATS[0], temperature=1.0, top_p=0.9,
                                              seed=seed, max_tokens=12).choices[0].message.content

    assert sample(7) == sample(7)


def test_models_and_health(server):
    client = _client(server)
    assert [m.id for m in client.models.list()] == [server.model_id] == ["run"]  # the run folder's name
    assert client.models.retrieve(server.model_id).id == server.model_id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    status, _, body = _raw(server, "GET", "/health", headers={"Authorization": ""})
    assert (status, body) == (200, {"status": "ok"})  # no key needed


def test_bad_requests_get_openai_errors(server):
    client = _client(server)
    status, _, body = _raw(server, "POST", "/v1/chat/completions", b'{"messages": [')
    _assert_error(status, body, 400)
    assert "JSON" in body["error"]["message"]
    _assert_error(*_raw(server, "POST", "/v1/chat/completions", b"[1, 2]")[::2], 400)
    status, _, body = _raw(server, "POST", "/v1/chat/completions", {"messages": CHATS[0]}, {"Content-Type": ""})
    _assert_error(status, body, 400)  # FastAPI reads JSON only from a body said to be JSON (no CSRF by text/plain)
    assert "Content-Type: application/json" in body["error"]["message"]
    lone = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'  # JSON can spell a lone surrogate
    _assert_error(*_raw(server, "POST", "/v1/chat/completions", lone)[::2], 400, param="messages[0].content")
    _assert_error(*_raw(server, "POST", "/v1/chat/completions", {"max_tokens": 4})[::2], 400, param="messages")
    _assert_error(*_raw(server, "POST", "/v1/completions", {"prompt": [1, 2, 3]})[::2], 400, param="prompt")
    _assert_error(*_raw(server, "GET", "/v1/nothing-here")[::2], 404)
    status, headers, body = _raw(server, "GET", "/v1/chat/completions")
    _assert_error(status, body, 405)
    assert headers["Allow"] == "POST"
    _assert_error(*_raw(server, "POST", "/v1/chat/completions", {"messages": CHATS[0]},
                        headers={"Authorization": ""})[::2], 401)

    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=server.model_id, messages=[], max_tokens=4)
    assert error.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=server.model_id, messages=CHATS[0], max_tokens=LIMIT + 1)
    assert error.value.param == "max_tokens" and str(LIMIT) in error.value.message
    for bad in ({"temperature": 2.5}, {"n": 2}, {"top_p": "high"}, {"stop": ["a", "b", "c", "d", "e"]},
                {"logprobs": True}, {"presence_penalty": 0.5}):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=server.model_id, messages=CHATS[0], max_tokens=4, **bad)
        assert error.value.param == next(iter(bad)), bad
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=server.model_id, messages=[{"role": "tool", "content": "x"}])
    assert error.value.param == "messages[0].role"
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=CHATS[0], max_tokens=4)
    assert error.value.code == "model_not_found" and server.model_id in error.value.message
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong-key").chat.completions.create(model=server.model_id, messages=CHATS[0])

    big = {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    with pytest.raises(openai.APIStatusError) as error:
        client.chat.completions.create(model=server.model_id, **big)
    assert error.value.status_code == 413
    _assert_error(*_raw(server, "POST", "/v1/chat/completions", big)[::2], 413)
    # the body was read and dropped, so the same connection goes on to answer the next request
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(big), headers={"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.request("GET", "/health")
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
    conn.close()


def test_concurrent_requests_get_their_own_answers(server, expected):
    """Eight clients at once, half of them streaming: each reply is its own prompt's greedy answer."""
    barrier = threading.Barrier(len(CHATS))
    replies: dict[int, str] = {}
    failures = []

    def ask(i):
        try:
            client = _client(server)
            barrier.wait(timeout=60)
            if i % 2:
                stream = client.chat.completions.create(model=server.model_id, messages=CHATS[i], temperature=0,
                                                        max_tokens=MAX_NEW, stream=True)
                replies[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            else:
                replies[i] = client.chat.completions.create(model=server.model_id, messages=CHATS[i], temperature=0,
                                                            max_tokens=MAX_NEW).choices[0].message.content
        except Exception as exc:  # reported below, in the test's thread
            failures.append((i, exc))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(CHATS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert {i: r.strip() for i, r in replies.items()} == dict(enumerate(expected["chat"]))


def test_shutdown_ends_a_stream_in_flight_and_the_worker(tiny_run, expected):
    """shutdown() while a reply streams: the stream says it was cut short (rather than ending as if
    complete), and the worker and the socket close.  The model is held inside its first forward pass
    until shutdown cancels the reply, so how fast tokens come does not matter."""
    server = make_server(tiny_run, "127.0.0.1", 0, log_requests=False)
    generator, model = server.generator, server.generator.model
    real_forward, generating = model.forward, threading.Event()

    def held_forward(*args, **kwargs):
        if not generating.is_set():
            generating.set()
            generator._current.cancelled.wait()  # until shutdown cancels the reply being generated
        return real_forward(*args, **kwargs)

    model.forward = held_forward
    # greedy, the first token is not an end token, so one token in the reply cannot end it as complete
    assert expected["chat_len"][0] > 1
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stream = _client(server).chat.completions.create(model=server.model_id, messages=CHATS[0], temperature=0,
                                                     max_tokens=900, stream=True)
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"
    assert generating.wait(timeout=120)
    server.shutdown()
    with pytest.raises(openai.APIError, match="stopped while generating"):
        list(chunks)
    thread.join(timeout=60)
    assert not thread.is_alive() and not generator._thread.is_alive()
    with pytest.raises(openai.APIConnectionError):
        _client(server).models.list()


def test_make_server_refuses_bad_input_with_sentences(tiny_run, tmp_path, server):
    with pytest.raises(UserError, match="not a folder"):
        make_server(tmp_path / "missing", "127.0.0.1", 0)
    with pytest.raises(UserError, match="--port"):
        make_server(tiny_run, "127.0.0.1", server.server_address[1])  # taken by the module's server
    with pytest.raises(UserError, match="--max-tokens-limit"):
        make_server(tiny_run, "127.0.0.1", 0, max_tokens_limit=0)


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "myhost.example"))


def test_serve_command_flags():
    parser = build_parser()
    args = parser.parse_args(["serve", "runs/x"])
    assert (args.host, args.port, args.max_tokens_limit, args.no_merge) == ("127.0.0.1", 8000, 1024, False)
    args = parser.parse_args(["serve", "runs/x", "--port", "9001", "--api-key", "k", "--host", "0.0.0.0"])
    assert (args.port, args.api_key, args.host) == (9001, "k", "0.0.0.0")
    assert args.func.__name__ == "cmd_serve"


def test_serve_command_warns_when_public_and_stops_cleanly_on_ctrl_c(tiny_run):
    """The command in its own process: a warning for a public address without a key, the URL logged,
    a request answered, then SIGINT ends it with exit code 0."""
    script = "import sys\nfrom tunesmith.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "TUNESMITH_API_KEY": ""}
    process = subprocess.Popen([sys.executable, "-c", script, "serve", str(tiny_run), "--host", "0.0.0.0",
                                "--port", "0", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=Path(__file__).parent)
    try:
        lines = []  # the `tunesmith` logger's lines, on stdout: the warning first, then the URL
        while not lines or (lines[-1] and " on http://0.0.0.0:" not in lines[-1]):
            lines.append(process.stdout.readline())
        assert " on http://0.0.0.0:" in lines[-1], (lines, process.stderr.read() if process.poll() is not None else "")
        assert any("warning" in line and "--api-key" in line for line in lines[:-1]), lines
        port = int(lines[-1].split("http://0.0.0.0:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/v1/models")
        assert json.loads(conn.getresponse().read())["data"][0]["id"] == "run"
        conn.close()
        process.send_signal(signal.SIGINT)
        # communicate() drains both pipes while waiting: a child blocked writing to a full pipe never exits
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err[-3000:]
        assert "stopping" in out and "Traceback" not in out + err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_openapi_document_is_served_and_says_400_not_422(server):
    status, _, document = _raw(server, "GET", "/openapi.json", headers={"Authorization": ""})
    assert status == 200
    assert set(document["paths"]) == {"/health", "/v1/models", "/v1/models/{model}", "/v1/chat/completions",
                                      "/v1/completions"}
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "404", "413", "503"} <= set(chat["responses"])
    assert not any("422" in op["responses"] for path in document["paths"].values() for op in path.values())
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    schemas = document["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]["maximum"] == LIMIT
    assert chat["security"] and "security" not in document["paths"]["/health"]["get"]


def _valid_requests_accepted(ctx, response, case):
    """schemathesis's positive_data_acceptance, less one refusal no schema can rule out: a prompt longer
    than the model reads (context_length_exceeded) is a matter of tokens, not of the JSON."""
    if response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded":
        return None
    return positive_data_acceptance(ctx, response, case)


def test_schemathesis_finds_every_response_as_the_openapi_document_says(server):
    """schemathesis generates requests from the served OpenAPI document, valid ones and invalid ones, for
    every operation, and runs its checks on each response: no 5xx, status codes, content types and bodies
    as documented, valid requests accepted, invalid ones refused, the API key enforced.  The app under
    test is the module's server's (same model worker), with a max_tokens limit of 4 so replies are short."""
    app = build_app(server.generator, server.model_id, api_key=KEY, max_tokens_limit=4, log_requests=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    statuses: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode == GenerationMode.NEGATIVE and not operation.body and not list(operation.iter_parameters()):
                continue  # nothing to make invalid (GET /health)

            @given(case=operation.as_strategy(mode))
            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def check(case):
                response = case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"},
                                                  excluded_checks=[positive_data_acceptance],
                                                  additional_checks=[_valid_requests_accepted])
                statuses.setdefault(case.operation.label, set()).add(response.status_code)

            check()
    # replies were generated, and invalid requests were refused with OpenAI's 400
    assert 200 in statuses["POST /v1/chat/completions"] and 200 in statuses["POST /v1/completions"]
    assert 400 in statuses["POST /v1/chat/completions"] and 400 in statuses["POST /v1/completions"]


def test_schemathesis_follows_the_links_with_valid_and_invalid_requests(server):
    """The OpenAPI document links GET /v1/models (and GET /v1/models/{model}) to the routes that take a model
    id.  schemathesis's state machine follows those links against the live server, over HTTP, with valid
    and invalid requests mixed (positive and negative generation), and checks every response: never a 5xx,
    status codes and bodies as documented.  A 200 from GET /v1/models/{model} shows a listed id was used."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    seen: set[tuple[str, int]] = set()

    class Scenarios(schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"headers": {"Authorization": f"Bearer {KEY}"}, "timeout": 60}

        def after_call(self, response, case):
            seen.add((case.operation.label, response.status_code))

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, excluded_checks=[positive_data_acceptance],
                                   additional_checks=[_valid_requests_accepted], transport_kwargs=kwargs)

    Scenarios.run(settings=settings(max_examples=30, stateful_step_count=4, deadline=None, database=None,
                                    suppress_health_check=list(HealthCheck)))
    assert ("GET /v1/models/{model}", 200) in seen  # reached through the link: its id came from the listing
    assert ("POST /v1/chat/completions", 200) in seen and ("POST /v1/chat/completions", 400) in seen
    assert not any(status >= 500 for _, status in seen)


@pytest.mark.slow
def test_the_builtin_model_served_answers_as_generate_answers_does():
    """The real built-in model (a model folder, not a run): greedy replies equal generate_answers on the
    same weights, and a real chat model ends its answer with its end-of-turn token (finish_reason stop)."""
    from tunesmith.models import builtin_path

    server = make_server(builtin_path("smollm2-135m-instruct"), "127.0.0.1", 0, log_requests=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = _client(server)
        questions = ["What is the capital of France?"]
        replies = [client.chat.completions.create(model=server.model_id, temperature=0, max_tokens=48,
                                                  messages=[{"role": "user", "content": q}]) for q in questions]
        generator = server.generator  # idle now: its model can be used directly
        prompts = [chat_ids(generator.tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True)
                   for q in questions]
        direct = generate_answers(generator.model, generator.tokenizer, prompts, 48, 1, "cpu")
        assert [r.choices[0].message.content.strip() for r in replies] == direct
        assert replies[0].choices[0].finish_reason == "stop"
        assert "Paris" in direct[0]
    finally:
        server.shutdown()
        thread.join()
