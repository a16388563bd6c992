"""The studio tests' own machinery (tests/studio_fixtures.py) works: a studio process that is waited for, killed and
started again; Debian's chromium through Playwright, on local pages only; a throwaway PostgreSQL cluster."""

from __future__ import annotations

import functools
import http.server
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from pathlib import Path

import pytest
from studio_fixtures import PostgresCluster, StudioProcess, find_postgres_bin, free_port, screenshot

TESTS = Path(__file__).resolve().parent
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex(("127.0.0.1", port)) != 0


# ---------------------------------------------------------------------------------------------------------------
# StudioProcess, driven with a stand-in for `tunesmith studio` that starts in milliseconds

FAKE_STUDIO = textwrap.dedent("""
    import http.server, json, signal, sys
    port, mode = int(sys.argv[1]), sys.argv[2]
    if mode == "crash":
        print("fake studio: no such database", flush=True)
        sys.exit(3)
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"ok": self.path == "/healthz"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Health)
    print(f"tunesmith studio: http://127.0.0.1:{port}/" + ("?token=" + sys.argv[3] if len(sys.argv) > 3 else ""),
          flush=True)
    server.serve_forever()
""")


class FakeStudio(StudioProcess):
    mode = "serve"

    def command(self) -> list[str]:
        return [sys.executable, "-c", FAKE_STUDIO, str(self.port), self.mode] + (
            [self.given_token] if self.given_token else [])


def test_studio_process_waits_for_health_and_restarts_on_the_same_port(tmp_path):
    with FakeStudio(tmp_path, token="s3cret") as studio:
        assert studio.printed_url == f"{studio.url}?token=s3cret"
        assert studio.headers() == {"X-Tunesmith-Token": "s3cret"}
        with NO_PROXY.open(studio.url + "healthz", timeout=5) as response:
            assert response.read() == b'{"ok": true}'
        first = studio.pid
        studio.kill9()
        assert studio.process.returncode == -signal.SIGKILL
        assert _refused(studio.port)

        studio.start()  # same home, database, port and token
        assert studio.pid != first and studio.running
        with NO_PROXY.open(studio.url + "healthz", timeout=5) as response:
            assert response.status == 200
        assert studio.log_text().count("--- start ") == 2
    assert studio.process.returncode == -signal.SIGTERM
    assert _refused(studio.port)


def test_stop_kills_a_studio_that_ignores_sigterm(tmp_path):
    studio = FakeStudio(tmp_path, stop_timeout=0.5)
    studio.mode = "ignore-term"
    with studio:
        pass
    assert studio.process.returncode == -signal.SIGKILL


def test_a_studio_that_exits_at_start_is_an_error_with_its_log(tmp_path):
    studio = FakeStudio(tmp_path)
    studio.mode = "crash"
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3 .*fake studio: no such database"):
        studio.start()


def test_the_studio_command_line_follows_the_contract(tmp_path, monkeypatch):
    """The argv and environment StudioProcess gives `tunesmith studio` (starting the real one takes seconds: the
    studio's own tests do that)."""
    monkeypatch.setenv("TUNESMITH_STUDIO_TOKEN", "from-the-shell")
    studio = StudioProcess(tmp_path, port=7999, token="t0k")
    assert studio.command() == [
        sys.executable, "-m", "tunesmith.cli", "studio", "--host", "127.0.0.1", "--port", "7999",
        "--db", f"sqlite:///{tmp_path.resolve()}/studio.db", "--home", str(tmp_path / "studio-home"), "--token", "t0k"]
    assert studio.url == "http://127.0.0.1:7999/"
    assert "--token" not in StudioProcess(tmp_path).command()
    assert StudioProcess(tmp_path, db="postgresql://postgres@127.0.0.1:5/x").command()[9] == (
        "postgresql://postgres@127.0.0.1:5/x")

    class ShowEnvironment(StudioProcess):
        def command(self) -> list[str]:
            return [sys.executable, "-c", "import os; print(sorted(k for k in os.environ if k.startswith(('TUNESMITH_"
                    "STUDIO', 'PYTHONUNBUFFERED'))))"]

    studio = ShowEnvironment(tmp_path, env={"EXTRA": "1"})
    with pytest.raises(RuntimeError, match="exited with code 0"):
        studio.start()
    assert "['PYTHONUNBUFFERED']" in studio.log_text()


# ---------------------------------------------------------------------------------------------------------------
# chromium


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>infra</title></head>
<body style="background: #ffd">
  <p id="status">waiting</p>
  <button id="go" onclick="document.getElementById('status').textContent = 'clicked'">Go</button>
</body></html>
"""

# Five ways a page could reach off the machine: an image, a script, fetch(), a WebSocket, and a local URL that
# redirects off the machine.
OFFSITE = """<!doctype html>
<html><head><meta charset="utf-8"><script src="https://cdn.example.net/lib.js"></script></head>
<body>
  <p id="done">0</p>
  <img src="https://example.com/x.png" onerror="done()">
  <img src="/away" onerror="done()">
  <script>
    let n = 0;
    function done() { document.getElementById('done').textContent = String(++n); }
    fetch('http://93.184.215.14/data.json').catch(done);
    const ws = new WebSocket('wss://socket.example.org/live');
    ws.onclose = done;
  </script>
</body></html>
"""


@pytest.fixture(scope="module")
def local_site(tmp_path_factory):
    """http://127.0.0.1:PORT/ serving PAGE as index.html and OFFSITE as offsite.html, and /away redirecting to
    another host, from a thread."""
    root = tmp_path_factory.mktemp("site")
    (root / "index.html").write_text(PAGE)
    (root / "offsite.html").write_text(OFFSITE)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/away":
                return super().do_GET()
            self.send_response(302)
            self.send_header("Location", "http://cdn.example.com/redirected.png")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_chromium_clicks_a_local_page_and_saves_a_screenshot(page, local_site, blocked_requests):
    from playwright.sync_api import expect

    page.goto(local_site)
    expect(page.locator("#status")).to_have_text("waiting")
    page.click("#go")
    expect(page.locator("#status")).to_have_text("clicked")
    path = screenshot(page, "infra/click test")
    assert path.name == "infra_click_test.png" and path.parent.name == "screenshots"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 500
    assert blocked_requests == []


def test_requests_off_this_machine_are_blocked_and_recorded(page, local_site, blocked_requests):
    blocked_requests.expected = True
    page.goto(local_site + "offsite.html")
    page.wait_for_function("document.getElementById('done').textContent === '4'")
    assert sorted(blocked_requests) == sorted([
        "https://cdn.example.net/lib.js", "https://example.com/x.png", "http://93.184.215.14/data.json",
        "wss://socket.example.org/live", "http://cdn.example.com/redirected.png"])


def test_the_page_fixture_fails_a_test_whose_page_left_the_machine(tmp_path):
    """Every browser test checks, at teardown, that its page asked for nothing off 127.0.0.1."""
    (tmp_path / "test_offsite.py").write_text(textwrap.dedent("""
        from studio_fixtures import blocked_requests, chromium_browser, page

        def test_offsite(page):
            page.set_content('<img src="https://cdn.example.com/logo.png">')
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # a quick start: none of the installed pytest plugins
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_offsite.py"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 passed, 1 error" in result.stdout, result.stdout[-3000:]
    assert "https://cdn.example.com/logo.png" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# PostgreSQL


def test_postgres_takes_a_connection_and_keeps_rows(postgres_url, postgres_cluster):
    import psycopg

    assert postgres_url.startswith(f"postgresql://postgres@127.0.0.1:{postgres_cluster.port}/")
    with psycopg.connect(postgres_url) as connection:
        connection.execute("CREATE TABLE runs (id serial PRIMARY KEY, name text NOT NULL)")
        connection.execute("INSERT INTO runs (name) VALUES (%s), (%s)", ("first", "second"))
        connection.commit()
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT name FROM runs ORDER BY id").fetchall() == [("first",), ("second",)]
        # a database of its own per test: another one does not see this table
        other = postgres_cluster.create_database("infra_other")
        with psycopg.connect(other) as elsewhere:
            assert elsewhere.execute("SELECT to_regclass('runs')").fetchone() == (None,)


def test_a_postgres_cluster_stops_and_leaves_nothing(postgres_cluster):
    # postgres_cluster: skips (or fails under CI) when PostgreSQL is missing, before this starts a second cluster
    with PostgresCluster(dbname="scratch", bin_dir=find_postgres_bin()) as cluster:
        base, port = cluster.base, cluster.port
        assert not _refused(port)
        if os.geteuid() == 0:  # PostgreSQL will not run as root: the data belongs to the postgres user
            assert (base / "data").stat().st_uid != 0
    assert not base.exists()
    assert _refused(port)


def test_free_port_is_free():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
