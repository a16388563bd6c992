"""`tunesmith studio`: bind, check that binding is safe, and serve the studio's app with uvicorn."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import uvicorn

from tunesmith.api import is_loopback
from tunesmith.errors import UserError
from tunesmith.models.builtin import tunesmith_home
from tunesmith.studio.app import StudioSettings, create_app

log = logging.getLogger(__name__)


def default_home() -> Path:
    return tunesmith_home() / "studio"


def bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: give a port from 1 to 65535 (or 0 for any free one).")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UserError(f"--host {host}: no such address on this machine; give an address such as 127.0.0.1.") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); another program may "
                        "hold the port: choose another with --port.") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def check_exposure(host: str, token: str | None) -> None:
    """A studio others can reach must ask for a token: refuse to bind a network address without one."""
    if not is_loopback(host) and not token:
        raise UserError(f"--host {host} lets other machines reach the studio, which can train, read and write files "
                        "on this one; give --token TOKEN (or set TUNESMITH_STUDIO_TOKEN) so that only you can use it, "
                        "or leave --host out to serve this machine only (127.0.0.1).")


def run_studio(settings: StudioSettings) -> None:
    """Serve the studio until Ctrl-C or SIGTERM; runs it started keep training after it stops."""
    check_exposure(settings.host, settings.token)
    sock = bind(settings.host, settings.port)
    settings.port = sock.getsockname()[1]
    try:
        app = create_app(settings)
    except BaseException:
        sock.close()
        raise
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{shown}:{settings.port}/"
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3, access_log=False)
    server = uvicorn.Server(config)
    print(f"tunesmith studio: {url}{'?token=' + settings.token if settings.token else ''}", flush=True)
    log.info(f"tunesmith studio: state in {app.state.engine.url.render_as_string(hide_password=True)}, "
             f"files in {settings.home}; Ctrl-C stops the studio (runs keep training).")
    server.run(sockets=[sock])
