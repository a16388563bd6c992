"""The studio's web app: FastAPI, pages rendered by the server (Jinja2) with a little plain JavaScript, state in
the database (tunesmith.studio.db), work done by tunesmith.api.

    app = create_app(StudioSettings(home=Path("~/.cache/tunesmith/studio"), db=None, token=None))

Safety (issue 23, item 13): the studio binds 127.0.0.1 unless told otherwise, and binding elsewhere needs a
token.  Every request that changes state needs the token in the X-Tunesmith-Token header (the pages carry it)
and, from a browser, a same-origin request; with a token given on the command line, reading needs it too (the
address printed at start sets a cookie).  A request for another Host than the one the studio serves is refused,
so a web page cannot reach a loopback studio by rebinding its own name (DNS rebinding).
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from tunesmith.api import is_loopback
from tunesmith.errors import UserError
from tunesmith.fileio import atomic_write_text
from tunesmith.studio import db
from tunesmith.studio.jobs import JobRunner
from tunesmith.studio.pages import chat, datasets, documents, evaluate, export, projects, runs, sweeps
from tunesmith.studio.runner import RunManager
from tunesmith.studio.store import TooLarge
from tunesmith.studio.web import NotFound

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
TOKEN_HEADER = "X-Tunesmith-Token"
TOKEN_COOKIE = "tunesmith_token"
MAX_BODY = 200 * 2**20  # the largest request body (an upload); limits per kind of upload are in store.py
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")
OPEN_PATHS = ("/healthz", "/static/")


@dataclass
class StudioSettings:
    home: Path
    db: str | None = None  # a database URL; None is SQLite at HOME/studio.db
    token: str | None = None  # given by the user: reading needs it as well as writing
    host: str = "127.0.0.1"
    port: int = 7860
    poll_s: float = 1.0  # how often the run manager looks at its runs
    extra: dict = field(default_factory=dict)


def studio_token(home: Path, given: str | None) -> str:
    """The token state changes need: the one given, else one kept in HOME/token (made once, readable only by
    this user), so pages opened before a restart keep working after it."""
    if given:
        return given
    path = home / "token"
    if path.is_file():
        saved = path.read_text().strip()
        if saved:
            return saved
    token = secrets.token_urlsafe(24)
    atomic_write_text(path, token + "\n")
    path.chmod(0o600)
    return token


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _allowed_hosts(settings: StudioSettings) -> set[str] | None:
    """The Host headers a loopback studio answers (None: any, when it serves a network with a token)."""
    if not is_loopback(settings.host):
        return None
    port = settings.port
    return {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")} | {"127.0.0.1", "localhost", "[::1]"}


def _refuse(status: int, sentence: str) -> JSONResponse:
    return JSONResponse({"error": sentence}, status_code=status)


def _origin_ok(request: Request) -> bool:
    """A browser's unsafe request must come from the studio's own pages (Origin, else Referer, else
    Sec-Fetch-Site); a client that sends none of them (curl, a script) is judged by its token alone."""
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is not None:
        return origin == own
    referer = request.headers.get("referer")
    if referer:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}" == own
    return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")


def create_app(settings: StudioSettings) -> FastAPI:
    home = settings.home
    home.mkdir(parents=True, exist_ok=True)
    (home / "files").mkdir(exist_ok=True)
    engine = db.make_engine(db.database_url(settings.db, home))
    sessions = db.session_factory(engine)
    token = studio_token(home, settings.token)
    token_required = bool(settings.token) or not is_loopback(settings.host)
    hosts = _allowed_hosts(settings)
    manager = RunManager(sessions, home, poll_s=settings.poll_s)
    jobs = JobRunner(sessions, home)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.start()
        jobs.start()
        try:
            yield
        finally:
            jobs.close()
            manager.close()  # runs keep training: they are processes of their own
            engine.dispose()

    app = FastAPI(title="tunesmith studio", version="1", lifespan=lifespan,
                  description="The studio's JSON API (the pages call it; so can a script with the token).")
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = sessions
    app.state.token = token
    app.state.runs = manager
    app.state.jobs = jobs
    app.state.templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.state.templates.env.globals["token"] = token
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # a refusal's sentence: JSON for /api, else a page for a browser, which must not carry the token it refuses
        refuse = functools.partial(error_response, request, show_token=False)
        host = request.headers.get("host", "")
        if hosts is not None and host not in hosts:
            return refuse(403, f"this studio answers requests for 127.0.0.1:{settings.port} only, not for "
                               f"{host[:100]!r}; open http://127.0.0.1:{settings.port}/.")
        path = request.url.path
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            return refuse(413, f"the request is {int(length) / 2**20:.0f} MiB; the studio takes at most "
                               f"{MAX_BODY // 2**20} MiB in one upload.")
        if path.startswith(OPEN_PATHS):
            return await call_next(request)
        given = (request.headers.get(TOKEN_HEADER) or request.query_params.get("token")
                 or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
        cookie = request.cookies.get(TOKEN_COOKIE, "")
        if token_required and not (_same(given, token) or _same(cookie, token)):
            return refuse(401, "this studio needs its token: open the address it printed at start "
                               "(…/?token=…), or send the X-Tunesmith-Token header.")
        if request.method in UNSAFE:
            if not _same(request.headers.get(TOKEN_HEADER, ""), token):
                return refuse(403, "changes need the studio's token in the X-Tunesmith-Token header (the studio's "
                                   "own pages send it; reload the page if the studio was restarted with a new one).")
            if not _origin_ok(request):
                return refuse(403, "changes are accepted only from the studio's own pages (this request came "
                                   "from another site).")
        if request.method == "GET" and request.query_params.get("token") and _same(
                request.query_params["token"], token) and not path.startswith("/api/"):
            response: Response = RedirectResponse(path, status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        return await call_next(request)

    def wants_html(request: Request) -> bool:
        return not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", "")

    def error_response(request: Request, status: int, sentence: str, show_token: bool = True) -> Response:
        if wants_html(request):
            context = {"message": sentence} if show_token else {"message": sentence, "token": ""}
            return app.state.templates.TemplateResponse(request, "error.html", context, status_code=status)
        return _refuse(status, sentence)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        status = 404 if isinstance(exc, NotFound) else 413 if isinstance(exc, TooLarge) else 400
        return error_response(request, status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        return error_response(request, 422, validation_sentence(exc))

    @app.exception_handler(DataError)
    async def unstorable(request: Request, exc: DataError):  # PostgreSQL refuses what SQLite stores (a NUL character)
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0][:200]
        return error_response(request, 400, f"the database cannot store what this request holds ({reason}); "
                                            "leave that out and try again.")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "the request was refused"
        if exc.status_code == 404 and detail == "Not Found":  # Starlette's words for a path no route serves
            detail = f"there is nothing at {request.url.path[:200]}; the studio's pages start at /."
        elif exc.status_code == 405 and detail == "Method Not Allowed":
            detail = f"{request.method} is not allowed on {request.url.path[:200]}."
        response = error_response(request, exc.status_code, detail)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # Allow: every method the path takes (Starlette names only its first route's)
            taken = {method for route in app.routes if isinstance(route, Route) and route.path_regex.match(
                request.url.path) for method in (route.methods or ())}
            response.headers["Allow"] = ", ".join(sorted(taken))
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("tunesmith studio: unexpected error on %s %s", request.method, request.url.path)
        return error_response(request, 500, f"the studio could not do this ({type(exc).__name__}: "
                                            f"{str(exc)[:300]}); the studio's log has the details.")

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"ok": True}

    for part in (projects, datasets, documents, runs, evaluate, chat, export, sweeps):  # one module per part of the work
        part.register(app)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return HTMLResponse(status_code=204)

    return app


def validation_sentence(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{where or 'the request'}: {err.get('msg', 'not valid')}")
    return "the request is not valid: " + "; ".join(parts) + "."

