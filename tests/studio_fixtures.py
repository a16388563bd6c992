"""Helpers and pytest fixtures for the studio's tests: a started `tunesmith studio`, Debian's chromium driven by
Playwright, and a throwaway PostgreSQL cluster.

Test modules import the helpers they use; the fixtures (chromium_browser, page, blocked_requests, postgres_cluster,
postgres_url, studio_server) are registered once for the whole run in conftest.py:

    from studio_fixtures import StudioProcess, screenshot

The browser and the cluster come from apt (scripts/setup.sh installs `chromium` and `postgresql` as root).
Without them the tests that need them are skipped, except under CI (the CI environment variable set), where a
missing browser or cluster is a failure: a CI run that skipped them would prove nothing.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import itertools
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
# Flags for a headless chromium that talks to nothing but the page's server: no background fetches (component
# updates, sync, field trials), no QUIC, no proxy, and every host name but localhost resolving to nothing (a
# request the route guard below cannot see, from the browser itself, fails too).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic", "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1, EXCLUDE [::1]",
]
PAGE_TIMEOUT_MS = 30_000
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
STUDIO_READY_S = 60.0
STUDIO_STOP_S = 10.0


def in_ci() -> bool:
    """True when the CI environment variable says this is a CI run (set, and not 0/false/no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip the test with `reason`, or fail it under CI, where a skipped browser/database test hides a broken setup."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: run `bash scripts/setup.sh` as root, which installs it with apt-get)",
                    pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, chars: int = 6000, start: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return "(no log)"
    return text[-chars:]


# ---------------------------------------------------------------------------------------------------------------
# tunesmith studio in a subprocess


class StudioProcess:
    """`python -m tunesmith.cli studio` on 127.0.0.1:`port`, with its home and database under `tmp_dir`.

    `with StudioProcess(tmp_path) as studio:` starts it and waits until GET /healthz answers {"ok": true}; leaving
    the block stops it. `kill9()` then `start()` restarts it on the same home, database, port and token (what a
    crash and a restart do). stdout and stderr go to `log_path` (appended across restarts; `log_text()` reads it).
    The environment is the test's (TUNESMITH_HOME still finds the cached built-in model) without
    TUNESMITH_STUDIO_DB/TUNESMITH_STUDIO_TOKEN, plus PYTHONUNBUFFERED=1 and `env`.

    `token` is the one given, else the one the studio keeps in HOME/token (made at its first start); requests that
    change state carry it in the X-Tunesmith-Token header (`headers()`). With a token given, reading needs it too:
    a browser opens `printed_url` (…/?token=…), which sets the studio's cookie.
    """

    def __init__(self, tmp_dir: str | Path, *, db: str | None = None, home: str | Path | None = None,
                 port: int | None = None, token: str | None = None, env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] | list[str] = (), ready_timeout: float = STUDIO_READY_S,
                 stop_timeout: float = STUDIO_STOP_S):
        self.tmp_dir = Path(tmp_dir)
        self.home = Path(home) if home is not None else self.tmp_dir / "studio-home"
        self.db = db if db is not None else f"sqlite:///{(self.tmp_dir / 'studio.db').resolve()}"
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.given_token = token
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.printed_url: str | None = None  # the address the latest start printed
        self.log_path = self.tmp_dir / "studio.log"
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self._log_start = 0  # where this start's output begins in the log

    @property
    def url(self) -> str:
        """The studio's base URL, with a trailing slash: http://127.0.0.1:PORT/."""
        return f"http://{self.host}:{self.port}/"

    @property
    def token(self) -> str | None:
        """The studio's token: the one given, else the one it keeps in HOME/token (None before its first start)."""
        if self.given_token is not None:
            return self.given_token
        try:
            return (self.home / "token").read_text().strip() or None
        except FileNotFoundError:
            return None

    def headers(self) -> dict[str, str]:
        """The header a request that changes state carries."""
        return {"X-Tunesmith-Token": self.token} if self.token else {}

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the studio is not started")
        return self.process.pid

    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "tunesmith.cli", "studio", "--host", self.host, "--port", str(self.port),
                "--db", self.db, "--home", str(self.home)]
        if self.given_token is not None:
            argv += ["--token", self.given_token]
        return argv + self.extra_args

    def start(self) -> StudioProcess:
        """Start the studio and wait (up to `ready_timeout` s) until it serves; raise with the log's tail if not."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"the studio is already running (pid {self.process.pid})")
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        env = {key: value for key, value in os.environ.items()
               if key not in ("TUNESMITH_STUDIO_DB", "TUNESMITH_STUDIO_TOKEN")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()
            self.starts += 1
            header = f"--- start {self.starts}: {shlex.join(self.command())}\n"
            log.write(header.encode())
            log.flush()
            self._log_start += len(header.encode())
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.tmp_dir, env=env)
        try:
            self._wait_ready()
        except BaseException:
            self._terminate()
            raise
        return self

    def _healthy(self) -> bool:
        # no proxy: an http_proxy in the environment must not see (or break) a request to 127.0.0.1
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.url + "healthz", timeout=5) as response:
                return response.status == 200 and json.loads(response.read()).get("ok") is True
        except (OSError, http.client.HTTPException, ValueError, AttributeError):
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"tunesmith studio exited with code {code} before it served "
                                   f"{self.url}healthz; its log ends:\n{self.log_tail()}")
            if self._healthy():
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"tunesmith studio did not answer {self.url}healthz within "
                                   f"{self.ready_timeout:.0f} s; its log ends:\n{self.log_tail()}")
            time.sleep(0.2)
        # the contract: it prints `tunesmith studio: http://HOST:PORT/` (with ?token=… when given one) on stdout
        deadline = time.monotonic() + 5
        pattern = re.compile(rf"^tunesmith studio: ({re.escape(self.url)}\S*)$", re.MULTILINE)
        while not (printed := pattern.search(self.log_tail(chars=10**6))):
            if time.monotonic() > deadline:
                raise RuntimeError(f"tunesmith studio serves {self.url} but did not print "
                                   f"'tunesmith studio: {self.url}'; its log ends:\n{self.log_tail()}")
            time.sleep(0.1)
        self.printed_url = printed.group(1)

    def log_text(self) -> str:
        """Everything the studio wrote, over all its starts (each begins with a `--- start N:` line)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        """The end of what the latest start wrote."""
        return _tail(self.log_path, chars, start=self._log_start)

    def kill9(self) -> None:
        """SIGKILL the studio (only its own process: a run it launched detached keeps going) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `stop_timeout` (10 s)."""
        self._terminate()

    def _terminate(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.kill9()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> StudioProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def studio_server(tmp_path):
    """A started studio with a fresh home and sqlite database under the test's tmp_path."""
    with StudioProcess(tmp_path / "studio") as studio:
        yield studio


# ---------------------------------------------------------------------------------------------------------------
# chromium through Playwright


def is_local_url(url: str) -> bool:
    """True for a URL the browser may load: 127.0.0.1/localhost, or no network at all (data:, blob:, about:)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss", "ftp"):
        return True
    return (parts.hostname or "") in LOCAL_HOSTS


class BlockedRequests(list):
    """The URLs a test's browser context asked for and was refused (anything not on 127.0.0.1/localhost).

    The `page` fixture fails the test at teardown when this is not empty, unless the test set `expected = True`
    (a test of the blocking itself)."""

    expected = False


def new_local_context(browser, blocked: list, **context_options):
    """A new browser context whose requests and WebSockets to anything but 127.0.0.1/localhost are aborted, each
    such URL appended to `blocked`. Service workers are off (their fetches would bypass the guard).

    The route aborts what a page asks for; a redirect's target is not routed (Playwright routes only the first
    URL), so URLs are recorded from the context's request events, and chromium's --host-resolver-rules stops a
    redirect to a host name."""
    context_options.setdefault("service_workers", "block")
    context = browser.new_context(**context_options)

    def guard(route):
        if is_local_url(route.request.url):
            route.continue_()
        else:
            route.abort("blockedbyclient")

    def record(request):
        if not is_local_url(request.url):
            blocked.append(request.url)

    def guard_socket(ws):
        if is_local_url(ws.url):
            ws.connect_to_server()
        else:
            blocked.append(ws.url)
            ws.close(code=1008, reason="blocked by the test")

    context.on("request", record)
    context.route("**/*", guard)
    context.route_web_socket(re.compile(".*"), guard_socket)
    return context


@pytest.fixture(scope="session")
def chromium_browser():
    """Debian's chromium (/usr/bin/chromium), headless, launched through Playwright's sync API (never a browser
    that Playwright downloads). Skipped when it is missing, failed under CI."""
    if not CHROMIUM.exists():
        skip_or_fail(f"the browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("the browser tests need the `playwright` Python package (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        # launch() gives the browser a fresh temporary profile of its own and removes it on close
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def blocked_requests():
    """The non-local URLs the test's page tried to load (see BlockedRequests)."""
    return BlockedRequests()


@pytest.fixture
def page(chromium_browser, blocked_requests):
    """A new page in a context of its own (fresh cookies and storage), local requests only, 30 s default timeout."""
    context = new_local_context(chromium_browser, blocked_requests)
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    context.set_default_navigation_timeout(PAGE_TIMEOUT_MS)
    new_page = context.new_page()
    try:
        yield new_page
    finally:
        context.close()
    if blocked_requests and not blocked_requests.expected:
        pytest.fail("the page asked for URLs outside 127.0.0.1 (a CDN?); the studio must serve everything "
                    "itself:\n" + "\n".join(blocked_requests), pytrace=False)


def screenshot(page, name: str) -> Path:
    """Save a full-page PNG of `page` as <repo>/test-artifacts/screenshots/<name>.png and return its path."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "screenshot"
    path = SCREENSHOTS / f"{safe}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# a throwaway PostgreSQL cluster


def _version_key(bin_dir: str) -> tuple:
    version = Path(bin_dir).parent.name
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def find_postgres_bin() -> Path | None:
    """The bin folder of the newest Debian PostgreSQL server (/usr/lib/postgresql/<version>/bin), or None.

    Debian keeps initdb and pg_ctl there, off PATH (PATH has only pg_wrapper's client commands); a
    /usr/local/bin/initdb, where one exists, is a link to one of these."""
    dirs = [d for d in glob.glob("/usr/lib/postgresql/*/bin")
            if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK)]
    if dirs:
        return Path(max(dirs, key=_version_key))
    initdb = shutil.which("initdb")
    if initdb and os.access(Path(initdb).resolve().with_name("pg_ctl"), os.X_OK):
        return Path(initdb).resolve().parent
    return None


class PostgresCluster:
    """A PostgreSQL cluster of its own in a temporary folder, on 127.0.0.1:`port`, trusting local connections.

    PostgreSQL refuses to run as root, so as root the server commands run as the `postgres` system user (runuser)
    in a folder it owns. `url` is postgresql://postgres@127.0.0.1:PORT/DBNAME for the database made at start;
    `create_database()` makes more. Leaving the block stops the server (immediate mode) and removes the folder.
    """

    def __init__(self, dbname: str = "tunesmith_test", bin_dir: Path | None = None):
        self.dbname = dbname
        self.bin_dir = bin_dir or find_postgres_bin()
        if self.bin_dir is None:
            raise FileNotFoundError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        self.base: Path | None = None
        self.port: int | None = None
        self.user = "postgres"

    def _as_owner(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        runuser = shutil.which("runuser")
        if runuser is None:
            raise RuntimeError("running as root, and `runuser` (util-linux) is missing to start PostgreSQL as the "
                               "postgres user")
        return [runuser, "-u", "postgres", "--"]

    def _run(self, argv: list[str], as_owner: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = (self._as_owner() if as_owner else []) + argv
        result = subprocess.run(argv, cwd=self.base, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL, env={**os.environ, "LC_ALL": "C", "PGTZ": "UTC"})
        if result.returncode != 0:
            log = _tail(self.base / "postgres.log", 3000) if self.base else ""
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout[-3000:]}"
                               f"{result.stderr[-3000:]}\npostgres.log:\n{log}")
        return result

    def start(self) -> PostgresCluster:
        # as root, under /tmp: the postgres user must be able to reach the folder (a root TMPDIR may be 0700)
        self.base = Path(tempfile.mkdtemp(prefix="tunesmith-pg-", dir="/tmp" if os.geteuid() == 0 else None))
        try:
            if os.geteuid() == 0:
                try:
                    owner = pwd.getpwnam("postgres")
                except KeyError:
                    raise RuntimeError("running as root, and there is no `postgres` system user to run PostgreSQL "
                                       "(the postgresql package makes one)") from None
                os.chown(self.base, owner.pw_uid, owner.pw_gid)
            data, sockets = self.base / "data", self.base / "sockets"
            self._run([str(self.bin_dir / "initdb"), "-D", str(data), "-U", self.user, "-A", "trust", "-E", "UTF8",
                       "--locale=C", "--no-sync"])
            self._run(["mkdir", "-m", "700", str(sockets)])
            for attempt in range(3):  # a port picked free can be taken before the server binds it
                self.port = free_port()
                # pg_ctl hands -o to a shell; durability is off, the data is thrown away
                options = (f"-h 127.0.0.1 -p {self.port} -k {shlex.quote(str(sockets))} -c fsync=off "
                           "-c synchronous_commit=off -c full_page_writes=off")
                try:
                    self._run([str(self.bin_dir / "pg_ctl"), "-D", str(data), "-l", str(self.base / "postgres.log"),
                               "-o", options, "-w", "-t", "60", "start"], timeout=90)
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
            self.create_database(self.dbname)
        except BaseException:
            self.stop()
            raise
        return self

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    @property
    def url(self) -> str:
        return self.url_for(self.dbname)

    def create_database(self, dbname: str) -> str:
        """CREATE DATABASE `dbname` (letters, digits, _) and return its URL."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", dbname):
            raise ValueError(f"not a plain database name: {dbname!r}")
        self._run([str(self.bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p",
                   str(self.port), "-U", self.user, "-d", "postgres", "-c", f'CREATE DATABASE "{dbname}"'],
                  as_owner=False)
        return self.url_for(dbname)

    def stop(self) -> None:
        """Stop the server at once (no checkpoint: the data is thrown away) and remove its folder."""
        if self.base is None:
            return
        data = self.base / "data"
        if (data / "postmaster.pid").exists():
            try:
                self._run([str(self.bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "30",
                           "stop"])
            except (RuntimeError, subprocess.TimeoutExpired):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)
        self.base = None

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def postgres_cluster():
    """One PostgreSQL cluster for the session (see PostgresCluster); skipped without Debian's postgresql, failed
    under CI."""
    if find_postgres_bin() is None:
        skip_or_fail("the PostgreSQL tests need Debian's postgresql (initdb under /usr/lib/postgresql/*/bin; "
                     "apt-get install postgresql)")
    with PostgresCluster() as cluster:
        yield cluster


_DATABASE_NUMBERS = itertools.count(1)


@pytest.fixture
def postgres_url(postgres_cluster, request):
    """The URL of a fresh, empty database in the session's cluster, one per test."""
    name = f"t{next(_DATABASE_NUMBERS)}_" + re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower())[:40]
    return postgres_cluster.create_database(name)
