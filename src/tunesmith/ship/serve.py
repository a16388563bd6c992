"""`tunesmith serve`: a run (or any model folder) behind an OpenAI-compatible HTTP API, on FastAPI + uvicorn.

    POST /v1/chat/completions   chat messages -> a reply (chat.completion, or chat.completion.chunk events)
    POST /v1/completions        plain prompt text -> its continuation (text_completion)
    GET  /v1/models             the one model served, as a list; GET /v1/models/ID retrieves it
    GET  /health                {"status": "ok"} (no API key needed, for load balancers and scripts)
    GET  /openapi.json          the OpenAPI document of all of the above (no API key needed)

Requests and replies are pydantic models (tunesmith.ship.openai_api), so the OpenAPI document is the
contract (tests run schemathesis against it).  A body is read as JSON when it says so (`Content-Type:
application/json`, as every OpenAI client sends): a web page cannot make a browser send that to
localhost without asking first.  Streaming is server-sent events: one `data: {chunk}` per new piece
of text, then `data: [DONE]`.

uvicorn answers each request in its event loop, but only one thread touches the model: every request
is put on one bounded queue, and a single generation worker takes them in turn, one at a time, and
sends the text back to the request's handler.  So replies never mix, a request's greedy answer is the
same whatever else is being served, and a slow client costs a waiting coroutine, not model time.  A
client that leaves (streaming or not) cancels its reply: the worker stops after the token in progress,
or skips the request if it is still waiting.
Requests are not batched together: batching pads prompts to one width, which changes float rounding,
and then a greedy answer could differ with the company it keeps.

Generation is tunesmith.models.generate.generate_reply, the one path chat, generate and eval share
(the model's `generate`, greedy at temperature 0, else sampling with temperature and top-p), so a
served greedy reply is what generate_answers gives for the same prompt ids alone (batch size 1: no
padding) on the same weights.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the HTTP status that
fits: 400 bad JSON or fields (FastAPI's 422 becomes this), 401 API key, 404 route or model, 405
method, 408 a request too slow to arrive, 413 body, 503 queue full or shutting down.  Input a client
controls never reaches a traceback: a body JSON cannot read (nested too deep, a number too long, not
UTF-8) and text that is not Unicode (a lone surrogate) are answered 400, and error bodies are written
as ASCII JSON, so no echoed value can fail to encode.

Slow clients hold a connection, never the model, and not for long: the request line and headers must
arrive within `header_timeout_s` of the request's first byte (or of the connection's opening), checked
by a small subclass of uvicorn's h11 protocol, since uvicorn itself only times out idle keep-alive
connections; the body must arrive within `body_timeout_s` after that (408 otherwise); headers still
unfinished past MAX_HEADER_BYTES get uvicorn's 400.  A client that leaves early costs at most a short log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hmac
import ipaddress
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import h11
import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from tunesmith import __version__
from tunesmith.data.tokens import chat_ids, ensure_chat_template, plain_prompt
from tunesmith.errors import UserError
from tunesmith.hardware import cpu_threads, detect_device, release_free_memory
from tunesmith.models.generate import generate_reply
from tunesmith.models.run_folder import RunHandle, load_for_inference, open_run
from tunesmith.models.tasks import MASKED_LM
from tunesmith.ship.openai_api import (
    CHAT_ROLES,
    SSE_EVENT,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorResponse,
    GenerationFields,
    Health,
    ModelCard,
    ModelList,
    RequestError,
    Usage,
    quoted,
    refusal,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a request body larger than 1 MiB is refused with 413
DRAIN_FACTOR = 16  # a body up to 16x that is read and dropped before the 413; a larger one closes the connection
DEFAULT_MAX_TOKENS_LIMIT = 1024  # the most tokens one request may ask for (--max-tokens-limit)
DEFAULT_MAX_QUEUE = 64  # requests waiting for the model beyond this get 503
ROUTES = {"/v1/chat/completions": "POST", "/v1/completions": "POST", "/v1/models": "GET", "/health": "GET",
          "/openapi.json": "GET"}
IDLE_TIMEOUT_S = 120  # seconds a keep-alive connection may sit idle before it is closed
# How long a request may take to arrive.  nginx waits 60 s for each (its client_header_timeout and
# client_body_timeout defaults); an API's clients send a whole request at once, so these are shorter.
DEFAULT_HEADER_TIMEOUT_S = 10.0  # from a request's first byte (or the connection's opening) to its last header
DEFAULT_BODY_TIMEOUT_S = 30.0  # from the end of the headers to the body's last byte
# A request line + headers still unfinished at this size gets uvicorn's 400 (h11's own default limit,
# h11.DEFAULT_MAX_INCOMPLETE_EVENT_SIZE; h11 bounds only what it cannot parse yet, so a finished header
# block can be larger by what one read of the socket brings, at most 256 KiB in asyncio).
MAX_HEADER_BYTES = 16 * 1024


def _shutting_down(message: str) -> RequestError:
    return RequestError(503, message, type="server_error", code="shutting_down")


# --- the generation worker -----------------------------------------------------------------------------


class LoopEvents:
    """A request's events, put by the generation worker (a thread) and read by its handler in the event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, event: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def get(self) -> tuple:
        return await self._queue.get()


@dataclass
class GenerationRequest:
    """One reply to generate, and where its events go.

    Events put on `events` (a queue.Queue, or LoopEvents for a handler in the event loop): ("text", str)
    for each new piece of the reply, then ("end", finish_reason, prompt_tokens, completion_tokens), or
    ("error", RequestError) instead.
    """

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    events: queue.Queue | LoopEvents = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Generator:
    """The model, its tokenizer and the one worker thread that generates for every request in turn."""

    def __init__(self, model, tokenizer, device: str, max_queue: int = DEFAULT_MAX_QUEUE):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        # Fast tokenizers refuse to be used from two threads at once ("Already borrowed"): handlers encode
        # prompts on the thread pool and the worker decodes replies, so every use takes this lock.
        self.tokenizer_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._current: GenerationRequest | None = None
        self._closing = False
        self._state = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="tunesmith-generate", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet taken by the worker."""
        return self._queue.qsize()

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
                log.exception("tunesmith serve: generation failed")
                request.events.put(("error", RequestError(500, f"generation failed: {exc}", type="server_error")))
            finally:
                with self._state:
                    self._current = None

    def _generate(self, request: GenerationRequest) -> None:
        reply = generate_reply(self.model, self.tokenizer, request.prompt_ids, request.max_tokens,
                               temperature=request.temperature, top_p=request.top_p, seed=request.seed,
                               stop=request.stop, on_text=lambda text: request.events.put(("text", text)),
                               cancelled=request.cancelled, lock=self.tokenizer_lock)
        if reply.finish_reason == "cancelled":
            # cut short by close() (a client that left reads nothing): say so rather than "length"
            request.events.put(("error", _shutting_down("the server stopped while generating this reply; "
                                                        "send the request again.")))
            return
        request.events.put(("end", reply.finish_reason, len(request.prompt_ids), reply.completion_tokens))


# --- reading requests -----------------------------------------------------------------------------------


def _max_tokens(body: GenerationFields, prompt_tokens: int, limit: int, context: int | None, param: str) -> int:
    """The request's max_tokens (max_completion_tokens is OpenAI's newer name), checked against the server's
    limit and the model's context; left out, it is the limit, shortened to fit the context."""
    key = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    asked = getattr(body, key)
    if asked is not None and asked > limit:
        raise RequestError(400, f"`{key}` is {asked}, above this server's limit of {limit} "
                           "(its --max-tokens-limit); ask for fewer tokens.", param=key)
    if context is None:
        return asked or limit
    room = context - prompt_tokens
    if room < 1 or (asked is not None and asked > room):
        what = "shorten the prompt" if room < 1 else f"ask for at most {room} new tokens or shorten the prompt"
        raise RequestError(400, f"The prompt has {prompt_tokens} tokens and the model reads at most {context}; "
                           f"{what}.", param=param, code="context_length_exceeded")
    return asked or min(limit, room)


def build_request(body: GenerationFields, prompt_ids: list[int], limit: int,
                  context: int | None) -> GenerationRequest:
    """The generation options every endpoint shares, checked where a schema cannot say it."""
    param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    if not prompt_ids:
        raise RequestError(400, "The prompt is empty once tokenised; send some text.", param=param)
    return GenerationRequest(
        prompt_ids=prompt_ids,
        max_tokens=_max_tokens(body, len(prompt_ids), limit, context, param),
        temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=[body.stop] if isinstance(body.stop, str) else body.stop or [],
        seed=body.seed,
        events=LoopEvents(),
    )


def _messages(body: ChatCompletionRequest) -> list[dict]:
    """The request's messages as [{"role", "content"}] (roles system/user/assistant; developer -> system)."""
    return [{"role": CHAT_ROLES[m.role],
             "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
            for m in body.messages]


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


# --- the app --------------------------------------------------------------------------------------------


class _BodyLimit:
    """Reads each request body before the app does, up to `limit` bytes and within `timeout_s` seconds;
    a larger one gets 413, a slower one 408 (and the connection is closed).

    A body up to DRAIN_FACTOR times the limit is read and dropped first, so the client is reading when
    the 413 arrives (closing a socket with unread bytes resets the connection, and the client may never
    see the answer) and the connection can go on to the next request; a larger one closes it."""

    def __init__(self, app, limit: int, timeout_s: float = DEFAULT_BODY_TIMEOUT_S):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s

        async def next_message() -> dict | None:
            """The client's next message, or None once the body's time is up."""
            try:
                return await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return None

        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        chunks, size, more = [], 0, True
        while more and size <= self.limit:
            message = await next_message()
            if message is None:
                error = RequestError(408, f"The request body did not arrive within {self.timeout_s:g} s ({size} of "
                                     f"{declared or 'an unknown number of'} bytes came); send the whole body at "
                                     "once.", code="request_timeout", headers={"Connection": "close"})
                return await _error_response(error)(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        if size > self.limit:
            while more and size <= DRAIN_FACTOR * self.limit:
                message = await next_message()
                if message is None:
                    break  # too slow to drain: answer at once, and close the connection
                if message["type"] == "http.disconnect":
                    return
                size += len(message.get("body", b""))
                more = message.get("more_body", False)
            error = RequestError(413, f"The request body is {declared or f'more than {size}'} bytes; the limit is "
                                 f"{self.limit} bytes.", code="request_too_large",
                                 headers={"Connection": "close"} if more else None)
            return await _error_response(error)(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect, when the client leaves

        await self.app(scope, replay, send)


class _ClientLeft(Exception):
    """The client closed its connection before its reply was ready (its generation is cancelled)."""


def _client_left(exc: BaseException, response_started: bool) -> bool:
    """Whether `exc` says only that the client went away: a reset or broken connection, Starlette's
    ClientDisconnect, or (servers of ASGI spec 2.4, where `send` raises OSError on a closed
    connection) an OSError once the response has begun."""
    return (isinstance(exc, (_ClientLeft, ClientDisconnect, ConnectionError))
            or (response_started and isinstance(exc, OSError)))


class _Outermost:
    """Logs each request (`log_requests`), and answers an exception the app did not handle with 500 in
    OpenAI's shape (a bug of ours: its traceback is logged).  A client that left is no bug: one short
    line at most, no traceback."""

    def __init__(self, app, log_requests: bool):
        self.app, self.log_requests = app, log_requests

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, outcome = None, None

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if _client_left(exc, status is not None):
                outcome = "client left before the reply"
            elif status is not None:  # the response has begun: nothing to answer with but a cut connection
                raise
            else:
                log.exception("tunesmith serve: internal error")
                await _error_response(RequestError(500, f"internal error: {exc}", type="server_error"))(
                    scope, receive, sending)
        finally:
            if self.log_requests:
                client = (scope.get("client") or ["-"])[0]
                log.info(f'tunesmith serve: {client} "{scope["method"]} {scope["path"]} '
                         f'HTTP/{scope["http_version"]}" {outcome or status or "client left before the reply"}')


class _AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error that quotes what a client sent (a lone
    surrogate, which UTF-8 cannot encode, included) always renders."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _error_response(error: RequestError) -> JSONResponse:
    return _AsciiJSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _errors(*statuses: int) -> dict:
    """OpenAPI `responses` entries for the given error statuses (all of them OpenAI's error shape)."""
    meaning = {400: "the request is malformed or asks for something not supported", 401: "no or wrong API key",
               404: "no such model", 413: "the request body is too large",
               503: "the queue is full or the server is shutting down"}
    return {s: {"model": ErrorResponse, "description": meaning[s]} for s in statuses}


BEARER = HTTPBearer(auto_error=False, description="the server's --api-key")  # read by build_app's require_key


def build_app(generator: Generator, model_id: str, api_key: str | None = None,
              max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, max_body_bytes: int = MAX_BODY_BYTES,
              log_requests: bool = True, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> FastAPI:
    """The HTTP API for `generator`'s model, named `model_id`; with `api_key`, every /v1 route wants
    `Authorization: Bearer KEY`.  A request body must arrive within `body_timeout_s` seconds (408).
    Run it with uvicorn (make_server does) or any ASGI server."""
    created = int(time.time())
    app = FastAPI(title="tunesmith serve", version=__version__, docs_url=None, redoc_url=None,
                  description="An OpenAI-compatible API for one model, answered one request at a time.")

    def require_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        unauthorised = {"code": "invalid_api_key", "headers": {"WWW-Authenticate": "Bearer"}}
        if credentials is None or not credentials.credentials.strip():
            raise RequestError(401, "This server needs an API key: send the header `Authorization: Bearer KEY`.",
                               **unauthorised)
        if not hmac.compare_digest(credentials.credentials.strip().encode(), api_key.encode()):
            raise RequestError(401, "Incorrect API key provided; use the key the server was started with.",
                               **unauthorised)

    keyed = [401] if api_key else []
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)] if api_key else [])

    def card() -> ModelCard:
        return ModelCard(id=model_id, object="model", created=created, owned_by="tunesmith")

    # operation ids: those of OpenAI's own OpenAPI document (openai-openapi, openapi.yaml)
    @app.get("/health", response_model=Health, summary="Whether the server is up (no API key needed)",
             operation_id="health")
    async def health() -> Health:
        return Health(status="ok")

    @v1.get("/models", response_model=ModelList, responses=_errors(*keyed), summary="The model served",
            operation_id="listModels")
    async def list_models() -> ModelList:
        return ModelList(object="list", data=[card()])

    @v1.get("/models/{model:path}", response_model=ModelCard, responses=_errors(*keyed, 404),
            summary="One model by its id", operation_id="retrieveModel")
    async def retrieve_model(model: str) -> ModelCard:
        if model != model_id:
            raise RequestError(404, f"The model {quoted(model)} does not exist here; this server serves "
                               f"`{model_id}`.", param="model", code="model_not_found")
        return card()

    completion_errors = _errors(400, *keyed, 404, 413, 503)

    def replies(model) -> dict:
        return {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                      "description": f"a {model.__name__}, or with `stream: true` server-sent events"},
                **completion_errors}

    @v1.post("/chat/completions", response_model=ChatCompletion, responses=replies(ChatCompletion),
             summary="Reply to a conversation", operation_id="createChatCompletion")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        return await complete(body, http, chat=True)

    @v1.post("/completions", response_model=Completion, responses=replies(Completion),
             summary="Continue a plain text prompt", operation_id="createCompletion")
    async def completions(body: CompletionRequest, http: Request):
        return await complete(body, http, chat=False)

    def prompt_ids(body: GenerationFields, chat: bool) -> list[int]:
        """The prompt as token ids (on the thread pool: tokenising is work, and the lock may wait)."""
        if chat:
            messages = _messages(body)
        else:
            prompt = body.prompt[0] if isinstance(body.prompt, list) else body.prompt
        with generator.tokenizer_lock:
            if not chat or generator.encoder_decoder:
                text = plain_prompt(messages) if chat else prompt
                return list(generator.tokenizer(text)["input_ids"])
            try:
                return chat_ids(generator.tokenizer, messages, add_generation_prompt=True)
            except UserError as exc:
                raise RequestError(400, str(exc), param="messages") from None

    async def complete(body: GenerationFields, http: Request, chat: bool):
        if body.model is not None and body.model != model_id:
            raise RequestError(404, f"The model {quoted(body.model)} does not exist here; this server serves "
                               f"`{model_id}` (see GET /v1/models).", param="model", code="model_not_found")
        if body.stream_options is not None and not body.stream:
            raise RequestError(400, "`stream_options` is only allowed with `stream: true`.", param="stream_options")
        ids = await run_in_threadpool(prompt_ids, body, chat)
        request = build_request(body, ids, max_tokens_limit, generator.context_length)
        generator.submit(request)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_id}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EventStream(request, _events(request, head, chat, include_usage))
        try:
            event, pieces = await _reply_unless_the_client_leaves(request, http.receive)
        finally:
            request.cancelled.set()  # done with it, the client left, or the handler was cancelled: stop generating
        if event[0] == "error":
            raise event[1]
        _, finish, prompt_tokens, completion_tokens = event
        text, usage = "".join(pieces), _usage(prompt_tokens, completion_tokens)
        if chat:
            choice = ChatChoice(index=0, message=AssistantMessage(role="assistant", content=text), finish_reason=finish)
            return ChatCompletion(**head, choices=[choice], usage=usage)
        return Completion(**head, choices=[CompletionChoice(index=0, text=text, finish_reason=finish)], usage=usage)

    app.include_router(v1)
    _answer_errors_the_openai_way(app)
    app.openapi = functools.partial(_openapi_document, app, max_tokens_limit)
    app.add_middleware(_BodyLimit, limit=max_body_bytes, timeout_s=body_timeout_s)
    app.add_middleware(_Outermost, log_requests=log_requests)  # added last: it runs first
    return app


def _unreadable_body(cause: BaseException | None) -> RequestError:
    """The sentence for a JSON body FastAPI could not parse (it raises its 400 `from` the reason)."""
    if isinstance(cause, RecursionError):
        why = "it is nested too deeply (arrays or objects inside each other hundreds of levels deep)"
    elif isinstance(cause, UnicodeError):
        why = "it is not UTF-8 text"
    elif isinstance(cause, ValueError) and "digits" in str(cause):
        # Python reads integers of at most sys.get_int_max_str_digits() digits (4300 by default)
        why = "it holds an integer with too many digits"
    else:
        why = f"{type(cause).__name__ if cause else 'unknown error'}: {quoted(str(cause))}"
    return RequestError(400, f"The request body could not be read as JSON: {why}.", code="invalid_json")


def _answer_errors_the_openai_way(app: FastAPI) -> None:
    """Every refusal in OpenAI's error shape: ours (RequestError), FastAPI's validation errors (422 there,
    400 here, with the sentence `refusal` gives), FastAPI's 400 for a body it could not parse (with the
    reason), Starlette's 404 and 405."""

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(refusal(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        method, path = request.method, request.url.path
        if exc.status_code == 404:
            error = RequestError(404, f"Unknown URL {method} {quoted(path)}; this server answers {', '.join(ROUTES)}.",
                                 code="unknown_url")
        elif exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse the body
            error = _unreadable_body(exc.__cause__)
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            error = RequestError(405, f"{quoted(path)} takes {allowed}, not {method}.", code="method_not_allowed",
                                 headers=exc.headers)
        else:
            error = RequestError(exc.status_code, str(exc.detail), headers=exc.headers)
        return _error_response(error)


def _model_links(pointer: str) -> dict:
    """Links (the OpenAPI 3.1 specification's Link Object) from a response that names the model, at
    `pointer` (a JSON pointer into its body), to the operations that take a model id.  The request body
    holding a runtime expression is how schemathesis's stateful tests fill in one field of a body."""
    uses = {"createChatCompletion": "a conversation for", "createCompletion": "a prompt for"}
    return {operation: {"operationId": operation, "requestBody": {"model": f"$response.body#{pointer}"},
                        "description": f"send {what} this model"} for operation, what in uses.items()}


def _openapi_document(app: FastAPI, max_tokens_limit: int) -> dict:
    """FastAPI's document, less the 422 it lists for every route (validation errors are answered 400),
    with this server's --max-tokens-limit, which the request models cannot know, and with links from
    the model routes to the routes that take a model id."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for operations in document["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        schemas = document["components"]["schemas"]
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            for key in ("max_tokens", "max_completion_tokens"):
                for option in schemas[name]["properties"][key]["anyOf"]:
                    if option.get("type") == "integer":
                        option["maximum"] = max_tokens_limit
        paths = document["paths"]
        paths["/v1/models"]["get"]["responses"]["200"]["links"] = {
            "retrieveModel": {"operationId": "retrieveModel", "parameters": {"model": "$response.body#/data/0/id"},
                              "description": "the model listed"},
            **_model_links("/data/0/id")}
        paths["/v1/models/{model}"]["get"]["responses"]["200"]["links"] = _model_links("/id")
        app.openapi_schema = document
    return app.openapi_schema


async def _collect(request: GenerationRequest) -> tuple[tuple, list[str]]:
    """The reply's last event ("end" or "error") and its pieces of text before it."""
    pieces = []
    while (event := await request.events.get())[0] == "text":
        pieces.append(event[1])
    return event, pieces


async def _until_disconnected(receive: Callable) -> None:
    """Returns once the client has gone.  Called after the body has been read, when the next message
    an ASGI server has for the app is http.disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _reply_unless_the_client_leaves(request: GenerationRequest, receive: Callable) -> tuple[tuple, list[str]]:
    """_collect's (last event, pieces), or _ClientLeft if the client disconnects first.  Nothing is being
    sent while a whole reply is awaited, so only listening for the disconnect notices a client gone."""
    reply = asyncio.ensure_future(_collect(request))
    gone = asyncio.ensure_future(_until_disconnected(receive))
    try:
        await asyncio.wait({reply, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        reply.cancel()
        gone.cancel()
    if reply.done() and not reply.cancelled():
        return reply.result()
    raise _ClientLeft()


class _EventStream(StreamingResponse):
    """A reply's server-sent events; however the response ends (the last event sent, the client gone,
    the handler cancelled), the request's generation is cancelled.  Here rather than in the events'
    generator: a client that leaves before the first event cancels the response before the generator
    has begun, and a generator that never began runs no `finally`."""

    def __init__(self, request: GenerationRequest, events: AsyncIterator[bytes]):
        super().__init__(events, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        self.request = request

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.request.cancelled.set()


async def _events(request: GenerationRequest, head: dict, chat: bool, include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events: one `data: {chunk}` per new piece of text, the finish reason, `data: [DONE]`."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict | str, finish: str | None) -> bytes:
        choice = ({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish} if chat else
                  {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish})
        return _event({**head, "choices": [choice], **extra})

    if chat:
        yield chunk({"role": "assistant", "content": ""}, None)
    while True:
        event = await request.events.get()
        if event[0] == "text":
            yield chunk({"content": event[1]} if chat else event[1], None)
        elif event[0] == "error":
            yield _event(event[1].body())
            break
        else:
            _, finish, prompt_tokens, completion_tokens = event
            yield chunk({} if chat else "", finish)
            if include_usage:
                yield _event({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens).model_dump()})
            break
    yield b"data: [DONE]\n\n"


def _event(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


# --- the server -----------------------------------------------------------------------------------------


class _H11WithHeaderTimeout(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request line and headers are not all there
    `header_timeout_s` seconds after the request's first byte (for a new connection: after it opened).

    uvicorn's only timer on reading is timeout_keep_alive, for the idle time after a response, and the
    first byte of the next request stops it: a client that then sends its headers a byte at a time (or
    opens a connection and sends nothing) would hold the connection for as long as it liked.  A request
    whose first bytes came gets 408 before the close; a connection that sent nothing is just closed."""

    def __init__(self, *args, header_timeout_s: float, log_requests: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self.log_requests = header_timeout_s, log_requests
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._start_header_clock()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # (part of) a request line or headers: the clock runs
            self._start_header_clock()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are all here (or the request was refused)
            self._stop_header_clock()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # the next request's first bytes may have come with the last one (pipelining): its clock runs
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0] and not self.transport.is_closing():
            self._start_header_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)

    def _start_header_clock(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # a request had begun: say why it ends (h11 cannot send a response
            # before it has read a request, so the bytes are written here)
            error = RequestError(408, f"The request line and headers did not arrive within {self.header_timeout_s:g} "
                                 "s; send them at once.", code="request_timeout")
            body = json.dumps(error.body()).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            if self.log_requests:
                log.info(f"tunesmith serve: {(self.client or ['-'])[0]} sent no complete request headers within "
                         f"{self.header_timeout_s:g} s: 408")
        self.transport.close()


def _quiet_broken_connections(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The event loop's exception handler: a connection a client reset or broke is the client's
    business (one debug line); anything else goes to asyncio's default handler, traceback and all."""
    if isinstance(context.get("exception"), ConnectionError):
        log.debug(f"tunesmith serve: a client's connection broke ({type(context['exception']).__name__})")
        return
    loop.default_exception_handler(context)


class _Uvicorn(uvicorn.Server):
    """uvicorn, stopping the generation worker before it waits for open responses to finish: the reply
    being generated ends with its "stopped" event and waiting requests get 503, instead of a long stream
    holding up the shutdown until its last token."""

    def __init__(self, config: uvicorn.Config, generator: Generator):
        super().__init__(config)
        self.generator = generator

    def handle_exit(self, sig, frame) -> None:  # Ctrl-C or SIGTERM, when uvicorn runs in the main thread
        if not self.should_exit:
            log.info("tunesmith serve: stopping.")
        super().handle_exit(sig, frame)

    async def startup(self, sockets=None) -> None:
        asyncio.get_running_loop().set_exception_handler(_quiet_broken_connections)
        await super().startup(sockets=sockets)

    async def shutdown(self, sockets=None) -> None:
        await asyncio.to_thread(self.generator.close)
        await super().shutdown(sockets=sockets)


class ModelServer:
    """The HTTP server and its generation worker: `serve_forever()` answers until `shutdown()` (from another
    thread) stops both.  `url` is where it listens, e.g. http://127.0.0.1:8000 (port 0 picks a free one)."""

    def __init__(self, listener: socket.socket, generator: Generator, model_id: str, app: FastAPI,
                 header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S, log_requests: bool = True):
        self.socket, self.generator, self.model_id, self.app = listener, generator, model_id, app
        self.server_address = listener.getsockname()  # (host, port), the port chosen when port 0 was asked for
        host, port = self.server_address[:2]
        protocol = functools.partial(_H11WithHeaderTimeout, header_timeout_s=header_timeout_s,
                                     log_requests=log_requests)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None, lifespan="off",
                                http=protocol, timeout_keep_alive=IDLE_TIMEOUT_S, timeout_graceful_shutdown=60,
                                h11_max_incomplete_event_size=MAX_HEADER_BYTES)
        self._uvicorn = _Uvicorn(config, generator)
        self._serving = threading.Event()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def serve_forever(self) -> None:
        """Answer requests until shutdown() (or, in the main thread, Ctrl-C or SIGTERM)."""
        self._serving.set()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serving (the reply in flight ends with "stopped", waiting requests get 503) and wait until
        serve_forever has returned; then release the model worker and the socket."""
        self._uvicorn.should_exit = True
        if self._serving.is_set():
            self._stopped.wait()
        self.close()

    def close(self) -> None:
        self.generator.close()
        self.socket.close()


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.x, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume others can reach it


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, or a sentence saying why it cannot."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except socket.gaierror:
        listener.close()
        raise UserError(f"--host {host}: this machine has no such address; use 127.0.0.1 (this machine only) "
                        "or 0.0.0.0 (every network interface).") from None
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: {host}:{port} is already in use; pick another port.") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise UserError(f"--port {port}: this user may not listen on it (ports below 1024 need privileges); "
                            "pick a port above 1024.") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host}: no network interface here has that address; use 127.0.0.1 "
                            "or 0.0.0.0.") from None
        raise
    return listener


def load_generator(handle: RunHandle, merged: bool = True, device: str | None = None,
                   max_queue: int = DEFAULT_MAX_QUEUE) -> Generator:
    """The model of an opened run (`open_run` of a run folder or a Hugging Face model folder), loaded for
    serving, and its generation worker.

    An adapter run is served `merged` by default: the adapter is folded into the base weights once,
    so each token costs the base model's matmuls alone (a qlora run's base is dequantised for that,
    so it needs the unquantised memory); merged=False serves base + adapter as trained."""
    device = device or detect_device()
    if device == "cpu":
        torch.set_num_threads(handle.cfg.training.num_threads or cpu_threads())
    model, tokenizer, task = load_for_inference(handle, device=device, merged=merged)
    if task == MASKED_LM:
        raise UserError(f"{handle.path} holds a masked language model (BERT-style), which fills in blanks but does "
                        "not generate text; serve a causal or seq2seq model.")
    ensure_chat_template(tokenizer)
    release_free_memory()  # what loading and merging freed goes back to the OS
    return Generator(model, tokenizer, device, max_queue=max_queue)


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                model_id: str | None = None, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
                max_queue: int = DEFAULT_MAX_QUEUE, merged: bool = True, device: str | None = None,
                log_requests: bool = True, header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> ModelServer:
    """Bind `host:port` and load the model of `run_dir` (see load_generator) behind build_app's API.
    `model_id` (default: the folder's name) is what /v1/models lists and requests must name.  A request's
    line and headers must arrive within `header_timeout_s` seconds of its first byte, its body within
    `body_timeout_s` after that (408 otherwise, and the connection is closed)."""
    if max_tokens_limit < 1:
        raise UserError(f"--max-tokens-limit {max_tokens_limit}: give at least 1.")
    if max_queue < 1:
        raise UserError(f"--max-queue {max_queue}: give at least 1.")
    for flag, seconds in (("--header-timeout", header_timeout_s), ("--body-timeout", body_timeout_s)):
        if not seconds > 0:
            raise UserError(f"{flag} {seconds}: give a number of seconds above 0.")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: give a port from 1 to 65535 (or 0 for any free one).")
    handle = open_run(run_dir)
    model_id = model_id or handle.path.resolve().name
    listener = _listen(host, port)
    try:
        generator = load_generator(handle, merged=merged, device=device, max_queue=max_queue)
    except BaseException:
        listener.close()
        raise
    app = build_app(generator, model_id, api_key, max_tokens_limit, log_requests=log_requests,
                    body_timeout_s=body_timeout_s)
    return ModelServer(listener, generator, model_id, app, header_timeout_s=header_timeout_s,
                       log_requests=log_requests)
