"""Training through the studio is as fast as through the CLI (issue 23: trained tokens/s within 5%).

The same run (examples/quickstart.yaml on the built-in model, `training.max_steps` steps, no before/after
evaluation) is trained by `tunesmith train` and by `tunesmith studio` (a real studio process: the run is
launched through its HTTP API, and a client follows it over server-sent events the whole time, as an open
browser tab would).  The studio trains by starting the same `tunesmith train` in a child process, so what this
measures is the studio's own cost while a run trains: its run manager's checks and the event stream reading
metrics.jsonl.  Runs alternate (CLI, studio, CLI, studio, ...) so a drift in the shared machine's speed falls
on both; the ratio is the median of the pairs' ratios of trained tokens/s (summary.json's
`train.trained_tokens_per_s`, measured by the training loop over its optimiser steps).

    .venv/bin/python bench/studio_throughput.py                 # 2 pairs of 20-step runs
    .venv/bin/python bench/studio_throughput.py --pairs 3 --steps 30

Results go to bench/results/studio_throughput.json (written then renamed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qlora_memory import machine  # noqa: E402  (the sibling benchmark's helpers)

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "studio_throughput.json"
TUNESMITH = [sys.executable, "-m", "tunesmith.cli"]


def overrides(steps: int) -> list[str]:
    return [f"training.max_steps={steps}", "eval.enabled=false", "training.eval_each_epoch=false"]


def cli_run(work: Path, steps: int, n: int) -> dict:
    out = work / f"cli-{n}"
    argv = TUNESMITH + ["train", str(REPO / "examples" / "quickstart.yaml"), "--output", str(out)]
    argv += [x for item in overrides(steps) for x in ("--set", item)]
    subprocess.run(argv, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def follow(client: httpx.Client, run_id: int, seen: list) -> None:
    """Read the run's event stream to its end, as the run page does."""
    with client.stream("GET", f"/api/runs/{run_id}/events", timeout=None) as response:
        for line in response.iter_lines():
            if line.startswith("event: metric"):
                seen.append(time.time())


def studio_run(work: Path, steps: int, n: int) -> dict:
    port = free_port()
    home = work / f"studio-{n}"
    log = (work / f"studio-{n}.log").open("wb")
    server = subprocess.Popen(TUNESMITH + ["studio", "--port", str(port), "--home", str(home)], cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        token = (home / "token").read_text().strip()
        client = httpx.Client(base_url=base, headers={"X-Tunesmith-Token": token}, timeout=30)
        config = (REPO / "examples" / "quickstart.yaml").read_text()
        for rel in ("examples/data/dates-train.jsonl", "examples/data/dates-test.jsonl"):
            config = config.replace(rel, str(REPO / rel))
        project = client.post("/api/projects", json={"name": "bench"}).json()
        text = _with_overrides(config, steps)
        run = client.post(f"/api/projects/{project['id']}/runs", json={"name": "bench", "config_yaml": text})
        run.raise_for_status()
        run_id = run.json()["id"]
        seen: list = []
        watcher = threading.Thread(target=follow, args=(client, run_id, seen), daemon=True)
        watcher.start()
        while client.get(f"/api/runs/{run_id}").json()["state"] not in ("finished", "failed", "interrupted"):
            time.sleep(1)
        state = client.get(f"/api/runs/{run_id}").json()
        if state["state"] != "finished":
            raise SystemExit(f"the studio's run ended {state['state']}: {state['message']}")
        watcher.join(timeout=10)
        return {**state["summary"], "events_seen": len(seen)}
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def _with_overrides(config: str, steps: int) -> str:
    """The quickstart's YAML with the benchmark's keys applied (the same values `--set` gives the CLI run)."""
    data = yaml.safe_load(config)
    data["training"]["max_steps"] = steps
    data["training"]["eval_each_epoch"] = False
    data.setdefault("eval", {})["enabled"] = False
    return yaml.safe_dump(data, sort_keys=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    pairs = []
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-studio-") as tmp:
        work = Path(tmp)
        for n in range(args.pairs):
            cli = cli_run(work, args.steps, n)["train"]["trained_tokens_per_s"]
            studio = studio_run(work, args.steps, n)
            speed = studio["train"]["trained_tokens_per_s"]
            pairs.append({"cli_tokens_per_s": cli, "studio_tokens_per_s": speed, "ratio": speed / cli,
                          "studio_events_seen": studio["events_seen"]})
            print(f"pair {n + 1}: CLI {cli:.1f} tok/s, studio {speed:.1f} tok/s, ratio {speed / cli:.3f}", flush=True)
    result = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "steps": args.steps,
        "pairs": pairs,
        "median_ratio": statistics.median(p["ratio"] for p in pairs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"studio / CLI trained tokens/s: median ratio {result['median_ratio']:.3f} over {args.pairs} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
