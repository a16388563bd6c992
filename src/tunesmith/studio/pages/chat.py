"""The chat playground: the run's base model and its tuned model answer the same conversation side by side,
streamed as they are written, with the system prompt and sampling settings editable.  Conversations are rows
(ChatSession, ChatMessage), so a page opened again shows them.

Each model is loaded once (api.load_base_chat for the run config's model.name, api.load_chat for the finished
run) and kept in a small cache in app.state; a model answers one message at a time (its lock), so two pages
asking the same model take turns, while base and tuned answer at once.  Answers come from api.reply, the
generation path chat, generate, serve and eval share."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from tunesmith import api
from tunesmith.errors import UserError
from tunesmith.studio.db import ChatMessage, ChatSession, Run
from tunesmith.studio.pages.evaluate import finished_run, run_config
from tunesmith.studio.web import DB, get_or_404, render

log = logging.getLogger(__name__)
SIDES = ("base", "tuned")
CACHED_MODELS = 4  # models kept loaded at once (the oldest unused one goes first)
BUSY_WAIT_S = 600  # how long an answer waits for its model to finish another one
MAX_MESSAGE = 100_000  # characters in one message


class ChatSettings(BaseModel):
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 answers greedily (the same answer every time)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="sample only from the most likely tokens of this mass")
    max_new_tokens: int = Field(256, ge=1, le=4096, description="the longest answer, in tokens")


class SessionIn(BaseModel):
    system_prompt: str | None = Field(None, max_length=MAX_MESSAGE)
    settings: ChatSettings = Field(default_factory=ChatSettings)


class MessageIn(BaseModel):
    content: str = Field(min_length=1, max_length=MAX_MESSAGE)


class ReplyIn(BaseModel):
    side: str = Field(pattern="^(base|tuned)$", description="which model answers: base or tuned")


class MessageOut(BaseModel):
    id: int
    side: str
    content: str


class SessionOut(BaseModel):
    id: int
    run_id: int
    system_prompt: str | None
    settings: ChatSettings
    messages: list[MessageOut]


# --- the models

@dataclass
class Loaded:
    model: object
    tokenizer: object
    task: str
    system: str | None
    busy: threading.Lock = field(default_factory=threading.Lock)  # held while the model answers


class ModelCache:
    """Models loaded on first use and kept (at most `size`); a key loads once even when asked for twice at
    once (a lock per key), and a model that is answering is never the one dropped."""

    def __init__(self, size: int = CACHED_MODELS):
        self.size = size
        self.lock = threading.Lock()
        self.models: OrderedDict[tuple, Loaded] = OrderedDict()
        self.loading: dict[tuple, threading.Lock] = {}

    def get(self, key: tuple, load: Callable[[], tuple]) -> Loaded:
        with self.lock:
            if key in self.models:
                self.models.move_to_end(key)
                return self.models[key]
            key_lock = self.loading.setdefault(key, threading.Lock())
        with key_lock:
            with self.lock:
                if key in self.models:
                    return self.models[key]
            model, tokenizer, task, system = load()
            loaded = Loaded(model, tokenizer, task, system)
            with self.lock:
                self.models[key] = loaded
                self.loading.pop(key, None)
                for old in [k for k, v in self.models.items() if k != key and not v.busy.locked()]:
                    if len(self.models) <= self.size:
                        break
                    del self.models[old]
            return loaded


def model_for(request: Request, run: Run, side: str) -> Loaded:
    cache: ModelCache = request.app.state.chat_models
    if side == "base":
        name = run_config(run).model.name
        return cache.get(("base", name), lambda: api.load_base_chat(name))
    run_dir = finished_run(run, "the tuned side of the chat")
    summary = run_dir / "summary.json"
    version = summary.stat().st_mtime_ns if summary.is_file() else 0  # a run resumed and finished again is new
    return cache.get(("tuned", str(run_dir), version), lambda: api.load_chat(run_dir))


# --- conversations

def session_out(s, chat: ChatSession) -> SessionOut:
    rows = s.scalars(select(ChatMessage).where(ChatMessage.session_id == chat.id).order_by(ChatMessage.id))
    return SessionOut(id=chat.id, run_id=chat.run_id, system_prompt=chat.system_prompt,
                      settings=ChatSettings(**(chat.settings or {})),
                      messages=[MessageOut(id=m.id, side=m.side, content=m.content) for m in rows])


def turns_of(messages: list[MessageOut]) -> list[dict]:
    """The conversation as turns: [{"user": text, "base": answer or None, "tuned": answer or None}]."""
    turns: list[dict] = []
    for m in messages:
        if m.side == "user":
            turns.append({"user": m.content, "base": None, "tuned": None})
        elif turns and m.side in SIDES:
            turns[-1][m.side] = m.content
    return turns


def conversation_for(session: SessionOut, side: str) -> list[dict]:
    """What `side` answers: the system prompt, the earlier turns with its own answers (a turn it did not answer
    is left out, so the roles still alternate), and the newest user message."""
    turns = turns_of(session.messages)
    if not turns:
        raise UserError("the conversation has no message to answer yet; send one first.")
    if turns[-1][side] is not None:
        raise UserError(f"the {side} model has answered the newest message already; send a new one.")
    messages = [{"role": "system", "content": session.system_prompt}] if session.system_prompt else []
    for turn in turns[:-1]:
        if turn[side] is not None:
            messages += [{"role": "user", "content": turn["user"]}, {"role": "assistant", "content": turn[side]}]
    return messages + [{"role": "user", "content": turns[-1]["user"]}]


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(request: Request, loaded: Loaded, messages: list[dict], settings: ChatSettings, session_id: int,
                  side: str):
    """Server-sent events: `piece` ({"text"}) as the answer is written, then `done` ({"id", "content"}: the
    saved message) or `error` ({"error": the sentence}).  A client that leaves stops the generation, and
    an answer cut short is not kept."""

    def pieces():
        if not loaded.busy.acquire(timeout=BUSY_WAIT_S):
            raise UserError(f"the {side} model is still answering another message; try again when it is done.")
        try:
            yield from api.reply(loaded.model, loaded.tokenizer, messages, loaded.task,
                                 max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                 top_p=settings.top_p)
        finally:
            loaded.busy.release()

    stream = pieces()
    text: list[str] = []
    failed = None
    try:
        while (piece := await anyio.to_thread.run_sync(next, stream, None)) is not None:
            text.append(piece)
            yield _event("piece", {"text": piece})
    except UserError as exc:
        failed = str(exc)
    except Exception as exc:  # shown in the page's column, not lost in a console
        log.exception("tunesmith studio: the %s model failed to answer", side)
        failed = f"the {side} model could not answer ({type(exc).__name__}: {str(exc)[:300]})."
    finally:
        with anyio.CancelScope(shield=True):  # stops the generation and frees the model, even for a client gone
            await anyio.to_thread.run_sync(stream.close)
    if failed is not None:
        yield _event("error", {"error": failed})
        return
    content = "".join(text).strip()
    with request.app.state.sessions.begin() as s:
        if s.get(ChatSession, session_id) is None:
            yield _event("error", {"error": "the conversation was deleted while the model answered."})
            return
        message = ChatMessage(session_id=session_id, side=side, content=content)
        s.add(message)
        s.flush()
        saved = message.id
    yield _event("done", {"id": saved, "content": content})


def default_system(run: Run) -> str | None:
    try:
        return run_config(run).data.system_prompt
    except UserError:
        return None


def register(app: FastAPI) -> None:
    app.state.chat_models = ModelCache()
    app.state.templates.env.globals["chat_panel"] = lambda run: chat_panel(app, run)

    @app.get("/runs/{run_id}/chat", include_in_schema=False)
    def chat_page(s: DB, run_id: int, request: Request, session: str = ""):
        run = get_or_404(s, Run, run_id, "run")
        chats = s.scalars(select(ChatSession).where(ChatSession.run_id == run_id)
                          .order_by(ChatSession.id.desc()).limit(50)).all()
        current = None
        if session.isdigit():
            chosen = get_or_404(s, ChatSession, int(session), "conversation")
            if chosen.run_id != run_id:
                raise UserError(f"conversation {chosen.id} belongs to another run.")
            current = session_out(s, chosen)
        elif chats and session != "new":  # the newest conversation, unless a new one was asked for
            current = session_out(s, chats[0])
        return render(request, "chat.html", run=run, chats=chats, current=current,
                      turns=turns_of(current.messages) if current else [],
                      settings=current.settings if current else ChatSettings(),
                      system_prompt=current.system_prompt if current else default_system(run),
                      tuned_ready=run.state == "finished")

    @app.get("/api/runs/{run_id}/chat/sessions", response_model=list[SessionOut])
    def list_sessions(s: DB, run_id: int):
        get_or_404(s, Run, run_id, "run")
        chats = s.scalars(select(ChatSession).where(ChatSession.run_id == run_id).order_by(ChatSession.id))
        return [session_out(s, c) for c in chats]

    @app.post("/api/runs/{run_id}/chat/sessions", response_model=SessionOut, status_code=201)
    def new_session(s: DB, run_id: int, body: SessionIn):
        get_or_404(s, Run, run_id, "run")
        chat = ChatSession(run_id=run_id, system_prompt=body.system_prompt or None,
                           settings=body.settings.model_dump())
        s.add(chat)
        s.flush()
        return session_out(s, chat)

    @app.get("/api/chat/sessions/{session_id}", response_model=SessionOut)
    def get_session(s: DB, session_id: int):
        return session_out(s, get_or_404(s, ChatSession, session_id, "conversation"))

    @app.put("/api/chat/sessions/{session_id}", response_model=SessionOut)
    def update_session(s: DB, session_id: int, body: SessionIn):
        """Change the conversation's system prompt and sampling settings (used from the next answer on)."""
        chat = get_or_404(s, ChatSession, session_id, "conversation")
        chat.system_prompt, chat.settings = body.system_prompt or None, body.settings.model_dump()
        return session_out(s, chat)

    @app.delete("/api/chat/sessions/{session_id}", status_code=204)
    def delete_session(s: DB, session_id: int):
        s.delete(get_or_404(s, ChatSession, session_id, "conversation"))

    @app.post("/api/chat/sessions/{session_id}/messages", response_model=MessageOut, status_code=201)
    def add_message(s: DB, session_id: int, body: MessageIn):
        """The user's next message; then ask each side for its answer (POST .../reply)."""
        get_or_404(s, ChatSession, session_id, "conversation")
        if not body.content.strip():
            raise UserError("the message is empty; write something to ask.")
        message = ChatMessage(session_id=session_id, side="user", content=body.content.strip())
        s.add(message)
        s.flush()
        return MessageOut(id=message.id, side=message.side, content=message.content)

    @app.post("/api/chat/sessions/{session_id}/reply")
    def reply(session_id: int, body: ReplyIn, request: Request):
        """The `side` model's answer to the newest message, streamed as server-sent events (see _stream); the
        model loads on first use, so the first answer takes longer."""
        with request.app.state.sessions() as s:
            chat = get_or_404(s, ChatSession, session_id, "conversation")
            session = session_out(s, chat)
            run = get_or_404(s, Run, chat.run_id, "run")
            s.expunge(run)
        messages = conversation_for(session, body.side)
        loaded = model_for(request, run, body.side)
        return StreamingResponse(_stream(request, loaded, messages, session.settings, session_id, body.side),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def chat_panel(app: FastAPI, run: Run) -> dict:
    """What templates/run_chat.html shows (called from the template)."""
    with app.state.sessions() as s:
        count = len(s.scalars(select(ChatSession.id).where(ChatSession.run_id == run.id)).all())
    return {"sessions": count, "tuned_ready": run.state == "finished",
            "base": _base_name(run)}


def _base_name(run: Run) -> str:
    try:
        return run_config(run).model.name
    except UserError:
        return "?"

