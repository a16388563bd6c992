"""`tunesmith serve` against hostile clients, on a real server on 127.0.0.1 (a free port, in a thread)
serving a tiny random Llama, spoken to with raw sockets: clients that leave before their reply, bodies
that no JSON reader or tokenizer can take, requests sent a byte at a time or never finished.

What must hold: a client that leaves frees the one generation worker at once (streaming or not, running
or still waiting); a body that cannot be read is answered 400 with a sentence in OpenAI's error shape;
a slow request gets 408 and its connection is closed; and none of it leaves a traceback in the log."""

import asyncio
import http.client
import json
import logging
import socket
import struct
import threading
import time

import pytest
from conftest import save_tiny_model_folder

from tunesmith.errors import UserError
from tunesmith.models.generate import end_token_ids
from tunesmith.ship.serve import MAX_HEADER_BYTES, build_app, make_server

HEADER_TIMEOUT_S = 1.0  # the test server's timeouts: small, so that the tests are quick
BODY_TIMEOUT_S = 1.0
TOKEN_S = 0.025  # each forward pass of the slowed model sleeps this long, so a 900-token reply takes > 20 s
LONG = 900  # max_tokens of a reply that would keep the worker busy for long (the tiny model reads 1024)
# Tokens the worker may still generate once a client has left: the one in progress, and time for the
# event loop to notice.  40 tokens take at least 40 * TOKEN_S = 1 s, however slow the machine.
TOKENS_AFTER_LEAVING = 40
CHAT = [{"role": "user", "content": "Tell me a joke."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir, _ = save_tiny_model_folder(tmp_path_factory.mktemp("hostile"), [{"text": "unused"}])
    server = make_server(model_dir, "127.0.0.1", 0, max_tokens_limit=LONG, header_timeout_s=HEADER_TIMEOUT_S,
                         body_timeout_s=BODY_TIMEOUT_S)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join()


@pytest.fixture
def forward_passes(server):
    """The served model, slowed to TOKEN_S a forward pass and never choosing an end token (so a reply runs
    to max_tokens), counting its forward passes: the list grows by one per generated token."""
    model, calls = server.generator.model, []
    real_forward = model.forward
    ends = end_token_ids(model, server.generator.tokenizer)

    def counted_forward(*args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(TOKEN_S)
        out = real_forward(*args, **kwargs)
        out.logits[..., ends] = float("-inf")  # [batch, positions, vocab]
        return out

    model.forward = counted_forward
    yield calls
    del model.forward  # the class's forward again


@pytest.fixture(scope="module", autouse=True)
def quiet_request_lines():
    """The server's log lines (one per request, written from its thread, sometimes after the test that
    caused them has ended) go to the tests' handlers only, not to the terminal."""
    logger = logging.getLogger("tunesmith.ship.serve")
    logger.propagate = False
    yield
    logger.propagate = True


@pytest.fixture
def log_records():
    """Every log record while the test runs: tunesmith's (its loggers do not propagate), uvicorn's and
    asyncio's (they reach the root logger), each with its traceback, if any, formatted."""
    records: list[tuple[logging.LogRecord, str]] = []
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record, formatter.format(record)))

    handler = Collect(level=logging.DEBUG)
    loggers = [logging.getLogger("tunesmith.ship.serve"), logging.getLogger("tunesmith"), logging.getLogger()]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def _assert_no_traceback(log_records):
    for record, text in log_records:
        assert record.exc_info is None and "Traceback" not in text, text


def _connect(server) -> socket.socket:
    return socket.create_connection(server.server_address[:2], timeout=30)


def _request_bytes(path: str, body: bytes, content_length: int | None = None) -> bytes:
    length = len(body) if content_length is None else content_length
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode() + body


def _send(server, body: dict, path: str = "/v1/chat/completions") -> socket.socket:
    """A connection that has sent one whole request and reads nothing yet."""
    sock = _connect(server)
    sock.sendall(_request_bytes(path, json.dumps(body).encode()))
    return sock


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER on, timeout 0), as a client that crashes does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _read_until_closed(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (a reset after its answer ends it too)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _ask(server, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _tokens_until_idle(calls: list, quiet_s: float = 0.5, give_up_s: float = 5.0) -> int:
    """How many more tokens the worker generates before it goes quiet (none for quiet_s), counting for
    at most give_up_s: a worker still generating for a client that left counts on."""
    start, deadline = len(calls), time.monotonic() + give_up_s
    while time.monotonic() < deadline and not (calls and time.monotonic() - calls[-1] > quiet_s):
        time.sleep(0.05)
    return len(calls) - start


def _assert_served(server) -> None:
    """The worker answers the next request in full (greedy: a sampled reply of the random model may end early,
    which once made this check fail in a full run)."""
    status, reply = _ask(server, "POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "temperature": 0})
    assert status == 200 and reply["usage"]["completion_tokens"] == 3, reply


def _assert_error(status: int, body: dict, want: int) -> str:
    assert status == want, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    message = body["error"]["message"]
    assert message.endswith(".") and len(message) < 300, message  # a sentence, not a dump of the input
    return message


# --- clients that leave ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole-reply", "streamed"])
def test_a_client_that_leaves_frees_the_worker(server, forward_passes, log_records, stream):
    """A client asks for a long reply and hangs up once generation has begun: the worker stops within
    TOKENS_AFTER_LEAVING tokens instead of generating the other ~890, and serves the next request."""
    sock = _send(server, {"messages": CHAT, "max_tokens": LONG, "temperature": 0, "stream": stream})
    _wait_for(lambda: len(forward_passes) >= 5)
    sock.close()
    assert _tokens_until_idle(forward_passes) <= TOKENS_AFTER_LEAVING, "the worker kept generating after the client left"
    assert len(forward_passes) < LONG / 2
    _assert_served(server)
    _assert_no_traceback(log_records)
    if not stream:  # one short line says what happened
        _wait_for(lambda: any(r.getMessage().endswith("client left before the reply") for r, _ in log_records))


def test_a_request_whose_client_left_while_it_waited_is_never_generated(server, forward_passes):
    """Two long requests; the second one's client leaves while it waits in the queue, then the first
    one's: the worker goes idle instead of generating the abandoned request."""
    first = _send(server, {"messages": CHAT, "max_tokens": LONG, "stream": True})
    _wait_for(lambda: len(forward_passes) >= 5)
    second = _send(server, {"messages": CHAT, "max_tokens": LONG})
    _wait_for(lambda: server.generator.waiting == 1)
    _reset(second)
    time.sleep(0.2)  # (the server notices the second client leave; nothing to see from here)
    first.close()
    assert _tokens_until_idle(forward_passes) <= TOKENS_AFTER_LEAVING
    assert server.generator.waiting == 0
    _assert_served(server)


def test_clients_that_leave_at_any_moment_leave_no_traceback(server, forward_passes, log_records):
    """Clients that reset the connection in the headers, in the body, while their reply is generated,
    in the middle of a stream, and while a too-large body is being drained: no traceback is logged, and
    the server goes on answering."""
    whole = json.dumps({"messages": CHAT, "max_tokens": LONG}).encode()
    sock = _connect(server)
    sock.sendall(_request_bytes("/v1/chat/completions", whole)[:30])  # inside the request line
    _reset(sock)
    sock = _connect(server)
    sock.sendall(_request_bytes("/v1/chat/completions", whole)[:-10])  # the body's last bytes missing
    time.sleep(0.1)
    _reset(sock)
    for stream in (False, True):
        sock = _send(server, {"messages": CHAT, "max_tokens": LONG, "stream": stream})
        start = len(forward_passes)
        _wait_for(lambda start=start: len(forward_passes) >= start + 3)
        if stream:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        _reset(sock)
        _tokens_until_idle(forward_passes)
    sock = _connect(server)
    big = b'{"messages": "' + b"x" * (3 << 20) + b'"}'  # 3 MiB: over the 1 MiB limit, drained before the 413
    sock.sendall(_request_bytes("/v1/chat/completions", big)[: 2 << 20])
    _reset(sock)
    time.sleep(0.2)
    _assert_served(server)
    _assert_no_traceback(log_records)


def test_an_asgi_server_that_raises_on_a_closed_connection_gets_no_traceback(server, log_records):
    """Servers of ASGI spec 2.4 raise OSError from `send` once the client has gone (uvicorn returns
    quietly instead).  The app, mounted in such a server (tunesmith.api.serving_app), ends the request
    with one log line, without raising into the server, which would log a traceback."""
    app = build_app(server.generator, "tiny", max_tokens_limit=4)
    body = json.dumps({"messages": CHAT, "max_tokens": 4, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.body":
            raise OSError("the client closed the connection")  # what a spec 2.4 server does
        sent.append(message)

    asyncio.run(app(scope, receive, send))  # returns: no exception reaches the server
    assert sent[0]["status"] == 200
    _assert_no_traceback(log_records)
    assert [r.getMessage() for r, _ in log_records if r.name.startswith("tunesmith")][-1].endswith(
        "client left before the reply")
    _assert_served(server)


# --- bodies no reader can take -----------------------------------------------------------------------

DEEP = 100_000  # arrays inside arrays: far past any JSON reader's recursion limit (Python's is 1000)
UNREADABLE = {
    "deep-array": (b"[" * DEEP + b"]" * DEEP, "nested too deeply"),
    "deep-field": (b'{"messages": ' + b"[" * DEEP + b"]" * DEEP + b"}", "nested too deeply"),
    # Python reads integers of at most 4300 digits (sys.get_int_max_str_digits(), its default since 3.11)
    "long-integer": (b'{"max_tokens": ' + b"9" * 5000 + b', "messages": []}', "too many digits"),
    "latin-1": ('{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1"), "not UTF-8"),
}


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_a_body_json_cannot_read_gets_400_with_the_reason(server, log_records, name):
    body, reason = UNREADABLE[name]
    status, reply = _ask(server, "POST", "/v1/chat/completions", body)
    message = _assert_error(status, reply, 400)
    assert reply["error"]["code"] == "invalid_json" and reason in message
    _assert_no_traceback(log_records)


SURROGATE = "\ud800"  # half of a UTF-16 pair, alone: JSON can spell it ("\ud800"), UTF-8 cannot encode it
NOT_TEXT = {
    "content": ("/v1/chat/completions", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages[0].content"),
    "text-part": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hello"}, {"type": "text", "text": "a" + SURROGATE}]}]}, "messages[0].content[1].text"),
    "model": ("/v1/chat/completions", {"model": SURROGATE, "messages": CHAT}, "model"),
    "stop": ("/v1/chat/completions", {"messages": CHAT, "stop": ["ok", SURROGATE]}, "stop[1]"),
    "prompt": ("/v1/completions", {"prompt": "x" + SURROGATE}, "prompt"),
}


@pytest.mark.parametrize("name", list(NOT_TEXT))
def test_a_lone_surrogate_anywhere_gets_400_naming_the_field(server, log_records, name):
    path, body, param = NOT_TEXT[name]
    status, reply = _ask(server, "POST", path, json.dumps(body).encode())  # json.dumps writes it as \ud800
    message = _assert_error(status, reply, 400)
    assert reply["error"]["param"] == param and "surrogate" in message
    _assert_no_traceback(log_records)


def test_values_quoted_in_errors_are_cut_short(server, log_records):
    """An error that names what the client sent quotes it briefly, however long or deep it was."""
    status, reply = _ask(server, "POST", "/v1/chat/completions", {"model": "m" * 100_000, "messages": CHAT})
    assert reply["error"]["code"] == "model_not_found"
    _assert_error(status, reply, 404)
    deep = b'{"messages": [], "temperature": ' + b"[" * 500 + b"]" * 500 + b"}"  # within JSON's depth limit
    status, reply = _ask(server, "POST", "/v1/chat/completions", deep)
    assert reply["error"]["param"] == "temperature"
    _assert_error(status, reply, 400)
    _assert_no_traceback(log_records)


# --- slow requests -----------------------------------------------------------------------------------


def test_headers_sent_a_byte_at_a_time_get_408_and_the_connection_closes(server):
    """A client sends its request line and headers one byte every 0.1 s (it would need 5 s in all); the
    server answers 408 once HEADER_TIMEOUT_S has passed since the first byte, and closes."""
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"z" * 20 + b"\r\n\r\n"
    sock = _connect(server)
    sent, answer = 0, b""
    sock.settimeout(0.1)
    while sent < len(request):
        try:
            answer = sock.recv(65536)  # anything yet? (read before the next byte: a byte sent after the
            break  # server has closed draws a reset, which can discard its answer)
        except TimeoutError:
            pass
        sock.send(request[sent:sent + 1])
        sent += 1
    sock.settimeout(30)
    answer += _read_until_closed(sock)
    assert sent < len(request), "the server waited for the whole slow request"
    assert answer.startswith(b"HTTP/1.1 408 ")
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout"


def test_a_connection_that_sends_nothing_is_closed(server):
    sock = _connect(server)
    assert _read_until_closed(sock) == b""  # closed (no answer to a request never begun), not left open


def test_a_body_shorter_than_its_content_length_gets_408_and_the_connection_closes(server):
    """Content-Length says 100, 10 bytes come, and the client waits: 408 after BODY_TIMEOUT_S."""
    sock = _connect(server)
    sock.sendall(_request_bytes("/v1/chat/completions", b'{"messages', content_length=100))
    answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower()
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout" and "10 of 100 bytes" in body["error"]["message"]


def test_a_keep_alive_connection_may_idle_longer_than_the_header_timeout(server):
    """The header clock starts at a request's first byte: a connection idle between requests is kept
    (up to uvicorn's keep-alive timeout), and the next request on it is answered."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    for request in range(2):
        if request:
            time.sleep(HEADER_TIMEOUT_S * 1.5)
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
    assert conn.sock is not None  # the same connection both times (http.client would reconnect silently)
    conn.close()


def test_headers_still_unfinished_past_the_size_limit_get_400(server):
    """A client sends more than MAX_HEADER_BYTES of headers without their end: refused at once (h11's
    limit on an incomplete request), rather than buffered until the header timeout."""
    sock = _connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * (MAX_HEADER_BYTES + 1))
    sock.settimeout(HEADER_TIMEOUT_S / 2)  # the answer comes before the header timeout would close it
    assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    sock.close()


def test_make_server_refuses_timeouts_that_are_not_positive(tmp_path):
    for bad in ({"header_timeout_s": 0}, {"body_timeout_s": -1}, {"header_timeout_s": float("nan")}):
        with pytest.raises(UserError, match="timeout"):
            make_server(tmp_path, "127.0.0.1", 0, **bad)
