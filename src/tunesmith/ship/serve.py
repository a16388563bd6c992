"""`tunesmith serve`: a run (or any model folder) behind an OpenAI-compatible HTTP API.

    POST /v1/chat/completions   chat messages -> a reply (chat.completion, or chat.completion.chunk events)
    POST /v1/completions        plain prompt text -> its continuation (text_completion)
    GET  /v1/models             the one model served, as a list; GET /v1/models/ID retrieves it
    GET  /health                {"status": "ok"} (no API key needed, for load balancers and scripts)

The standard library's ThreadingHTTPServer answers each connection on its own thread, but only one
thread touches the model: every request is put on one queue, and a single generation worker takes
them in turn, one at a time, and feeds the text back on the request's own queue.  So replies never
mix, a request's greedy answer is the same whatever else is being served, and a slow client costs
a waiting thread, not model time.  Requests are not batched together: batching pads prompts to one
width, which changes float rounding, and then a greedy answer could differ with the company it
keeps.

Generation is the model's own `generate` (KV cache on; greedy at temperature 0, else sampling with
temperature and top-p), called as tunesmith.evaluate.quick.generate_answers calls it, so a served
greedy reply is what generate_answers gives for the same prompt ids alone (batch size 1: no
padding) on the same weights.  A small stopping criterion watches the reply as it grows: it decodes the new tokens,
sends the text that is final, holds back what could still become a stop string, and stops at a stop
string or when a streaming client has gone away.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the HTTP status
that fits: 400 bad JSON or fields, 401 API key, 404 route or model, 405 method, 411/413 body,
503 queue full or shutting down.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import os
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tunesmith.errors import UserError
from tunesmith.ship.chat import stop_ids
from tunesmith.data.tokens import ensure_chat_template
from tunesmith.hardware import cpu_threads, detect_device
from tunesmith.models.run_folder import load_for_inference, open_run
from tunesmith.models.tasks import MASKED_LM
from tunesmith.hardware import release_free_memory
from tunesmith.data.tokens import chat_ids
from tunesmith.data.tokens import plain_prompt

MAX_BODY_BYTES = 1 << 20  # a request body larger than 1 MiB is refused with 413
DRAIN_FACTOR = 16  # a body up to 16x that is read and dropped before the 413; a larger one closes the connection
DEFAULT_MAX_TOKENS_LIMIT = 1024  # the most tokens one request may ask for (--max-tokens-limit)
DEFAULT_MAX_QUEUE = 64  # requests waiting for the model beyond this get 503
MAX_STOP_SEQUENCES = 4  # OpenAI's API reference allows up to 4 stop sequences
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# Request fields tunesmith does not implement, with the values that mean "not used" (sent by many
# clients as defaults).  Any other value is refused, rather than silently ignored.
UNSUPPORTED_FIELDS = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}


class RequestError(Exception):
    """A request the server refuses, sent back as OpenAI's error object with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """One reply to generate, and the queue its handler thread reads the reply from.

    Events put on `events`: ("text", str) for each new piece of the reply, then ("end", finish_reason,
    prompt_tokens, completion_tokens), or ("error", RequestError) instead.
    """

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class _ReplyWatcher(StoppingCriteria):
    """`generate` calls this after every new token with all ids so far.  It decodes the reply, sends the
    part that can no longer change to the request, and says stop at a stop string or on cancellation.

    Held back until the next token: a trailing U+FFFD (a character whose bytes are still arriving) and
    a tail that is the start of a stop string.  The stop string itself and what follows are never sent.
    """

    def __init__(self, request: GenerationRequest, tokenizer, lock: threading.Lock, start: int):
        self.request, self.tokenizer, self.lock, self.start = request, tokenizer, lock, start
        self.text = ""  # the reply decoded so far
        self.sent = 0  # characters of `text` already sent
        self.stopped = False  # a stop string was found

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if not self.stopped:
            with self.lock:
                self.text = self.tokenizer.decode(input_ids[0, self.start:], skip_special_tokens=True)
            self._send(final=False)
        done = self.stopped or self.request.cancelled.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def finish(self) -> None:
        """Send whatever was held back (generation has ended)."""
        if not self.stopped:
            self._send(final=True)

    def _send(self, final: bool) -> None:
        text, stop = self.text, self.request.stop
        found = [i for i in (text.find(s) for s in stop) if i >= 0]
        if found:
            end = min(found)
            self.stopped = True
        else:
            end = len(text)
            if not final:
                while end > self.sent and text[end - 1] == "\ufffd":
                    end -= 1
                # the longest tail of text[:end] that some stop string starts with
                held = max((k for s in stop for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
                end -= held
        if end > self.sent:
            self.request.events.put(("text", text[self.sent:end]))
            self.sent = end


def _shutting_down(message: str) -> RequestError:
    return RequestError(503, message, type="server_error", code="shutting_down")


class Generator:
    """The model, its tokenizer and the one worker thread that generates for every request in turn."""

    def __init__(self, model, tokenizer, device: str, max_queue: int = DEFAULT_MAX_QUEUE):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.end_ids = sorted(stop_ids(model, tokenizer))  # the same end tokens `tunesmith chat` stops at
        # Fast tokenizers refuse to be used from two threads at once ("Already borrowed"): handler
        # threads encode prompts and the worker decodes replies, so every use takes this lock.
        self.tokenizer_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._current: GenerationRequest | None = None
        self._closing = False
        self._state = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="tunesmith-generate", daemon=True)
        self._thread.start()

    @property
    def context_length(self) -> int | None:
        """Prompt plus reply tokens the model can attend to (None when its config does not say)."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def submit(self, request: GenerationRequest) -> None:
        with self._state:
            if self._closing:
                raise _shutting_down("the server is shutting down; send the request to another server.")
            try:
                self._queue.put_nowait(request)
            except queue.Full:
                raise RequestError(503, f"{self._queue.maxsize} requests are already waiting for the model; "
                                   "try again shortly.", type="server_error", code="queue_full") from None

    def close(self) -> None:
        """Stop the reply being generated, answer every waiting request with 503, end the worker."""
        with self._state:
            if self._closing:
                return
            self._closing = True
            if self._current is not None:
                self._current.cancelled.set()
        shutting = _shutting_down("the server shut down before answering; send the request again.")
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                request.events.put(("error", shutting))
        self._queue.put(None)  # room is certain: the queue was just emptied and submit() refuses now
        self._thread.join()

    def _work(self) -> None:
        while True:
            request = self._queue.get()
            if request is None:
                return
            with self._state:
                if self._closing:
                    request.events.put(("error", _shutting_down("the server shut down before answering; "
                                                                 "send the request again.")))
                    continue
                self._current = request
            try:
                if not request.cancelled.is_set():
                    self._generate(request)
            except Exception as exc:  # our bug or the model's: report it on this request, keep serving
                traceback.print_exc()
                request.events.put(("error", RequestError(500, f"generation failed: {exc}", type="server_error")))
            finally:
                with self._state:
                    self._current = None

    @torch.no_grad()
    def _generate(self, request: GenerationRequest) -> None:
        input_ids = torch.tensor([request.prompt_ids], device=self.device)  # [1, prompt]
        # generate returns the prompt and then the reply; an encoder-decoder returns its decoder start
        # token and then the reply
        start = 1 if self.encoder_decoder else input_ids.shape[1]
        watcher = _ReplyWatcher(request, self.tokenizer, self.tokenizer_lock, start)
        options = {"do_sample": False}
        if request.temperature > 0:
            if request.seed is not None:
                torch.manual_seed(request.seed % 2**64)  # only this thread samples, so the seed decides alone
            # top_k=0 switches off transformers' default top-k; OpenAI's API has no top-k
            options = {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p, "top_k": 0}
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=request.max_tokens,
            eos_token_id=self.end_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([watcher]),
            use_cache=True,
            **options,
        )  # [1, start + new]
        reply = out[0, start:].tolist()
        watcher.finish()
        ended = watcher.stopped or (bool(reply) and reply[-1] in self.end_ids)
        if request.cancelled.is_set() and not ended and len(reply) < request.max_tokens:
            # cut short by close() (a client that left reads nothing): say so rather than "length"
            request.events.put(("error", _shutting_down("the server stopped while generating this reply; "
                                                        "send the request again.")))
            return
        request.events.put(("end", "stop" if ended else "length", len(request.prompt_ids), len(reply)))


# --- reading requests -------------------------------------------------------------------------------


def _integer(body: dict, key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"`{key}` must be an integer, not {json.dumps(value)}.", param=key)
    if value < low:
        raise RequestError(400, f"`{key}` is {value}; give a value of at least {low}.", param=key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(400, f"`{key}` must be a number from {low:g} to {high:g}, not {json.dumps(value)}.",
                           param=key)
    return float(value)


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(400, f"`stop` must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} "
                           "non-empty strings.", param="stop")
    return stop


def _check_common(body: dict, model_id: str) -> None:
    model = body.get("model")
    if model is not None and model != model_id:
        raise RequestError(404, f"The model `{model}` does not exist here; this server serves `{model_id}` "
                           "(see GET /v1/models).", param="model", code="model_not_found")
    for key, unused in UNSUPPORTED_FIELDS.items():
        if body.get(key) not in unused:
            raise RequestError(400, f"`{key}` is not supported by tunesmith serve; leave it out.", param=key,
                               code="unsupported_parameter")
    if body.get("n") not in (None, 1):
        raise RequestError(400, "`n` must be 1: tunesmith serve generates one choice per request.", param="n")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(400, "`stream` must be true or false.", param="stream")
    options = body.get("stream_options")
    usage_flag = options.get("include_usage", False) if isinstance(options, dict) else None
    if options is not None and not isinstance(usage_flag, bool):
        raise RequestError(400, '`stream_options` must be an object like {"include_usage": true}.',
                           param="stream_options")
    if options is not None and not body.get("stream"):
        raise RequestError(400, "`stream_options` is only allowed with `stream: true`.", param="stream_options")


def _message_text(content, index: int) -> str:
    """A message's content as text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(400, f"`messages[{index}].content` must be a string or a list of text parts "
                       "(images, audio and tool calls are not supported).", param=f"messages[{index}].content")


def parse_messages(body: dict) -> list[dict]:
    """The request's `messages` as [{"role", "content"}] (roles system/user/assistant; developer → system)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "`messages` is required: a non-empty list of {\"role\", \"content\"} objects.",
                           param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise RequestError(400, f"`messages[{i}].role` must be one of {', '.join(CHAT_ROLES)}.",
                               param=f"messages[{i}].role")
        out.append({"role": CHAT_ROLES[message["role"]], "content": _message_text(message.get("content"), i)})
    return out


def _max_tokens(body: dict, prompt_tokens: int, limit: int, context: int | None) -> int:
    """The request's max_tokens (max_completion_tokens is OpenAI's newer name), checked against the server's
    limit and the model's context; left out, it is the limit, shortened to fit the context."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = _integer(body, key, 1)
    if asked is not None and asked > limit:
        raise RequestError(400, f"`{key}` is {asked}, above this server's limit of {limit} "
                           "(its --max-tokens-limit); ask for fewer tokens.", param=key)
    if context is None:
        return asked or limit
    room = context - prompt_tokens
    if room < 1 or (asked is not None and asked > room):
        what = "shorten the prompt" if room < 1 else f"ask for at most {room} new tokens or shorten the prompt"
        raise RequestError(400, f"The prompt has {prompt_tokens} tokens and the model reads at most {context}; "
                           f"{what}.", param="messages" if "messages" in body else "prompt",
                           code="context_length_exceeded")
    return asked or min(limit, room)


def build_request(body: dict, prompt_ids: list[int], limit: int, context: int | None) -> GenerationRequest:
    """The generation options every endpoint shares, read and checked."""
    if not prompt_ids:
        raise RequestError(400, "The prompt is empty once tokenised; send some text.",
                           param="messages" if "messages" in body else "prompt")
    return GenerationRequest(
        prompt_ids=prompt_ids,
        max_tokens=_max_tokens(body, len(prompt_ids), limit, context),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),  # OpenAI's default and range
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        stop=_stop_strings(body),
        seed=_integer(body, "seed", -(2**63)),
    )


# --- the HTTP side --------------------------------------------------------------------------------


ROUTES = {"/v1/chat/completions": "POST", "/v1/completions": "POST", "/v1/models": "GET", "/health": "GET"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    server_version = "tunesmith-serve"
    timeout = 120  # seconds a connection may sit idle or stall mid-request before it is closed
    # Headers and body go out in separate writes; with Nagle's algorithm on, the body would wait for
    # the client's delayed ACK of the headers (tens of ms per reply), and stream events would bunch up.
    disable_nagle_algorithm = True
    server: ModelServer

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def do_PATCH(self):
        self._dispatch()

    def log_message(self, format, *args):
        if self.server.log_requests:
            sys.stderr.write(f"tunesmith serve: {self.address_string()} {format % args}\n")

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (bad request line, unknown method) in OpenAI's shape."""
        self.close_connection = True
        self._send_json(code, RequestError(code, message or HTTPStatus(code).phrase).body())

    def _dispatch(self) -> None:
        self._unread_body = True
        route = None
        try:
            path = urlsplit(self.path).path.rstrip("/") or "/"
            route = "/v1/models" if path.startswith("/v1/models/") else path
            if route not in ROUTES:
                raise RequestError(404, f"Unknown URL {self.command} {path}; this server answers "
                                   f"{', '.join(ROUTES)}.", code="unknown_url")
            if self.command != ROUTES[route]:
                raise RequestError(405, f"{path} takes {ROUTES[route]}, not {self.command}.", code="method_not_allowed")
            if route != "/health":
                self._check_key()
            if path == "/health":
                self._send_json(200, {"status": "ok"})
            elif route == "/v1/models":
                self._models(path[len("/v1/models/"):] if path != "/v1/models" else None)
            elif path == "/v1/chat/completions":
                self._completion(self._read_json(), chat=True)
            else:
                self._completion(self._read_json(), chat=False)
        except RequestError as exc:
            self._send_json(exc.status, exc.body(), allow=ROUTES.get(route) if exc.status == 405 else None)
        except (ConnectionError, TimeoutError):  # the client went away or stalled
            self.close_connection = True
        except Exception as exc:  # our bug: say so in the response and keep serving
            traceback.print_exc()
            self._send_json(500, RequestError(500, f"internal error: {exc}", type="server_error").body())

    def _check_key(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise RequestError(401, "This server needs an API key: send the header `Authorization: Bearer KEY`.",
                               code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise RequestError(401, "Incorrect API key provided; use the key the server was started with.",
                               code="invalid_api_key")

    def _read_json(self) -> dict:
        if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length") is None:
            raise RequestError(411, "Send the JSON body with a Content-Length header (chunked bodies are not read).",
                               code="length_required")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            raise RequestError(400, "The Content-Length header is not a number.") from None
        limit = self.server.max_body_bytes
        if length > limit:
            if length <= DRAIN_FACTOR * limit:
                # Read and drop the body, so the client is reading when the 413 arrives: closing a socket
                # with unread bytes resets the connection, and the client may never see the answer.
                left = length
                while left > 0:
                    got = len(self.rfile.read(min(1 << 16, left)))
                    if not got:
                        break  # the client stopped sending
                    left -= got
                self._unread_body = False
            raise RequestError(413, f"The request body is {length} bytes; the limit is {limit} bytes.",
                               code="request_too_large")
        raw = self.rfile.read(length) if length > 0 else b""
        self._unread_body = False
        try:
            body = json.loads(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise RequestError(400, f"The request body is not valid JSON ({exc}).", code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError(400, "The request body must be a JSON object.", code="invalid_json")
        return body

    def _send_json(self, status: int, obj: dict, allow: str | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if allow:
            self.send_header("Allow", allow)
        if self.close_connection or self._body_left_unread():
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body_left_unread(self) -> bool:
        """Whether the request came with a body this handler did not read: the connection must close, or
        those bytes would be taken for the next request."""
        headers = getattr(self, "headers", None)
        if headers is None or not getattr(self, "_unread_body", False):
            return False
        return bool(headers.get("Transfer-Encoding")) or headers.get("Content-Length") not in (None, "0")

    def _models(self, wanted: str | None) -> None:
        server = self.server
        card = {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "tunesmith"}
        if wanted is None:
            self._send_json(200, {"object": "list", "data": [card]})
        elif wanted == server.model_id:
            self._send_json(200, card)
        else:
            raise RequestError(404, f"The model `{wanted}` does not exist here; this server serves "
                               f"`{server.model_id}`.", param="model", code="model_not_found")

    def _prompt_ids(self, body: dict, chat: bool) -> list[int]:
        generator = self.server.generator
        if chat:
            messages = parse_messages(body)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise RequestError(400, "`prompt` is required: one string (token-id prompts and several prompts "
                                   "at once are not supported).", param="prompt")
        with generator.tokenizer_lock:
            if not chat or generator.encoder_decoder:
                text = plain_prompt(messages) if chat else prompt
                return list(generator.tokenizer(text)["input_ids"])

            try:
                return chat_ids(generator.tokenizer, messages, add_generation_prompt=True)
            except UserError as exc:
                raise RequestError(400, str(exc), param="messages") from None

    def _completion(self, body: dict, chat: bool) -> None:
        server = self.server
        _check_common(body, server.model_id)
        request = build_request(body, self._prompt_ids(body, chat), server.max_tokens_limit,
                                server.generator.context_length)
        server.generator.submit(request)
        reply = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": server.model_id,
        }
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            self._stream(request, reply, chat, include_usage)
            return
        pieces = []
        while True:
            event = request.events.get()
            if event[0] == "error":
                raise event[1]
            if event[0] == "end":
                break
            pieces.append(event[1])
        _, finish, prompt_tokens, completion_tokens = event
        text = "".join(pieces)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": finish} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        self._send_json(200, {**reply, "choices": [choice], "usage": _usage(prompt_tokens, completion_tokens)})

    def _stream(self, request: GenerationRequest, reply: dict, chat: bool, include_usage: bool) -> None:
        """Server-sent events: one `data: {chunk}` per new piece of text, the finish reason, `data: [DONE]`."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        reply = {**reply, "object": "chat.completion.chunk" if chat else "text_completion"}
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict | str, finish: str | None) -> dict:
            choice = ({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish} if chat else
                      {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish})
            return {**reply, "choices": [choice], **extra}

        try:
            if chat:
                self._event(chunk({"role": "assistant", "content": ""}, None))
            while True:
                event = request.events.get()
                if event[0] == "text":
                    self._event(chunk({"content": event[1]} if chat else event[1], None))
                elif event[0] == "error":
                    self._event(event[1].body())
                    break
                else:
                    _, finish, prompt_tokens, completion_tokens = event
                    self._event(chunk({} if chat else "", finish))
                    if include_usage:
                        self._event({**reply, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
                    break
            self._write_chunk(b"data: [DONE]\n\n")
            self._write_chunk(b"")  # the zero-length chunk ends the body
        except (ConnectionError, TimeoutError):
            request.cancelled.set()  # the client left: stop generating for it
            self.close_connection = True

    def _event(self, obj: dict) -> None:
        self._write_chunk(f"data: {json.dumps(obj)}\n\n".encode())

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ModelServer(ThreadingHTTPServer):
    """The HTTP server and its generation worker; `serve_forever()` answers, `shutdown()` (from another
    thread) stops both.  `url` is where it listens, e.g. http://127.0.0.1:8000 (port 0 picks a free one)."""

    # Handler threads are joined when the server closes (their connections shut down first, see close()),
    # so none is left running while Python finalises: a daemon thread woken at that point is ended with
    # pthread_exit, which can abort the process ("terminate called without an active exception").
    daemon_threads = False
    block_on_close = True

    def __init__(self, host: str, port: int, model_id: str, api_key: str | None = None,
                 max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, max_body_bytes: int = MAX_BODY_BYTES,
                 log_requests: bool = True):
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.model_id, self.api_key, self.log_requests = model_id, api_key, log_requests
        self.max_tokens_limit, self.max_body_bytes = max_tokens_limit, max_body_bytes
        self.created = int(time.time())
        self.generator: Generator | None = None  # set by make_server once the model is loaded
        self._connections: set = set()  # sockets of the connections being answered
        self._connections_lock = threading.Lock()
        super().__init__((host, port), _Handler)

    def process_request_thread(self, request, client_address):  # runs on the connection's own thread
        with self._connections_lock:
            self._connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def shutdown(self) -> None:
        super().shutdown()
        self.close()

    def close(self) -> None:
        """Stop the generation worker (waiting requests get 503, a stream in flight its "stopped" event),
        shut the reading side of every open connection (a handler waiting for a keep-alive client's next
        request sees the end at once, while one still writing its last event can finish), join their
        threads and release the socket."""
        if self.generator is not None:
            self.generator.close()
        with self._connections_lock:
            open_now = list(self._connections)
        for connection in open_now:
            try:
                connection.shutdown(socket.SHUT_RD)
            except OSError:  # already closed by the client or its handler
                pass
        self.server_close()  # ThreadingMixIn joins the handler threads (block_on_close)


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.x, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume others can reach it


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                model_id: str | None = None, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
                max_queue: int = DEFAULT_MAX_QUEUE, merged: bool = True, device: str | None = None,
                log_requests: bool = True) -> ModelServer:
    """Bind `host:port` and load the model of `run_dir` (a run folder or a Hugging Face model folder).

    An adapter run is served `merged` by default: the adapter is folded into the base weights once,
    so each token costs the base model's matmuls alone (a qlora run's base is dequantised for that,
    so it needs the unquantised memory); merged=False serves base + adapter as trained.
    `model_id` (default: the folder's name) is what /v1/models lists and requests must name.
    """

    if max_tokens_limit < 1:
        raise UserError(f"--max-tokens-limit {max_tokens_limit}: give at least 1.")
    if max_queue < 1:
        raise UserError(f"--max-queue {max_queue}: give at least 1.")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: give a port from 1 to 65535 (or 0 for any free one).")
    handle = open_run(run_dir)
    model_id = model_id or handle.path.resolve().name
    try:
        server = ModelServer(host, port, model_id, api_key, max_tokens_limit, log_requests=log_requests)
    except socket.gaierror:
        raise UserError(f"--host {host}: this machine has no such address; use 127.0.0.1 (this machine only) "
                        "or 0.0.0.0 (every network interface).") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: {host}:{port} is already in use; pick another port.") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise UserError(f"--port {port}: this user may not listen on it (ports below 1024 need privileges); "
                            "pick a port above 1024.") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host}: no network interface here has that address; use 127.0.0.1 "
                            "or 0.0.0.0.") from None
        raise
    try:
        device = device or detect_device()
        if device == "cpu":
            torch.set_num_threads(handle.cfg.training.num_threads or cpu_threads())
        model, tokenizer, task = load_for_inference(handle, device=device, merged=merged)
        if task == MASKED_LM:
            raise UserError(f"{run_dir} holds a masked language model (BERT-style), which fills in blanks but does "
                            "not generate text; serve a causal or seq2seq model.")
        ensure_chat_template(tokenizer)
        release_free_memory()  # what loading and merging freed goes back to the OS
        server.generator = Generator(model, tokenizer, device, max_queue=max_queue)
    except BaseException:
        server.server_close()
        raise
    return server


# --- the command ------------------------------------------------------------------------------------


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_serve(args) -> int:
    import signal

    import tqdm

    # Loading draws progress bars, and tqdm starts a daemon monitor thread for them that outlives the bars;
    # a server process has no use for it, and no daemon thread should be alive when it exits (see ModelServer).
    tqdm.tqdm.monitor_interval = 0

    if not is_loopback(args.host) and not args.api_key:
        print(f"tunesmith serve: warning: --host {args.host} lets other machines reach this server and no "
              "--api-key is set, so anyone who can reach it can use it.", file=sys.stderr)
    server = make_server(args.run_dir, args.host, args.port, api_key=args.api_key, model_id=args.model_name,
                         max_tokens_limit=args.max_tokens_limit, max_queue=args.max_queue, merged=not args.no_merge,
                         log_requests=not args.quiet)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `docker stop` and systemd end it the way Ctrl-C does
        # A shell starts a background job (`tunesmith serve ... &`) with SIGINT ignored, and Python keeps an
        # ignored SIGINT ignored; `kill -INT` should still stop the server.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"tunesmith serve: {server.model_id} on {server.url}/v1 (OpenAI-compatible; "
          f"{'API key required' if args.api_key else 'no API key'}); Ctrl-C stops it.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("tunesmith serve: stopping.", file=sys.stderr)
    finally:
        server.close()
    return 0


def register(subparsers) -> None:
    """Add `tunesmith serve` to the CLI's subcommands."""
    serve = subparsers.add_parser(
        "serve",
        help="serve a run over an OpenAI-compatible HTTP API",
        description="Serve RUN_DIR (a run folder, or a model folder such as `tunesmith merge` writes) over an "
        "OpenAI-compatible HTTP API: POST /v1/chat/completions (with streaming), POST /v1/completions, "
        "GET /v1/models, GET /health. Requests are answered one at a time by one generation worker, in the "
        "order they arrive. Listens on 127.0.0.1 (this machine only) unless --host says otherwise.",
    )
    serve.add_argument("run_dir", metavar="RUN_DIR",
                       help="a folder that `tunesmith train` (or `tunesmith merge`) wrote")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface, then set --api-key)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    serve.add_argument("--api-key", metavar="KEY", default=os.environ.get("TUNESMITH_API_KEY") or None,
                       help="require `Authorization: Bearer KEY` on every /v1 request (default: the "
                       "TUNESMITH_API_KEY environment variable, which other users cannot read in `ps`; none if unset)")
    serve.add_argument("--model-name", metavar="NAME",
                       help="the model id /v1/models lists and requests must name (default: RUN_DIR's folder name)")
    serve.add_argument("--max-tokens-limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT, metavar="N",
                       help=f"refuse requests for more than N new tokens; also the default when a request gives "
                       f"no max_tokens (default {DEFAULT_MAX_TOKENS_LIMIT})")
    serve.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                       help=f"answer 503 when N requests are already waiting for the model "
                       f"(default {DEFAULT_MAX_QUEUE})")
    serve.add_argument("--no-merge", action="store_true",
                       help="serve an adapter run as base + adapter, as trained (default: the adapter is merged into "
                       "the base once at start, which generates faster; a qlora base is dequantised for it)")
    serve.add_argument("--quiet", action="store_true", help="do not log each request to stderr")
    serve.set_defaults(func=cmd_serve)
