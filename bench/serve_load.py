"""Load on `tunesmith serve`: N concurrent clients for a bounded time, every request accounted for.

The baseline, measured in the same run on the same server: one client asking each prompt in turn,
once before the load and once after (their mean is what the load is compared with, so a machine
that got busier or quieter meanwhile shows as the gap between the two).  A first, untimed pass of
the same kind warms the server up, and its greedy replies are the expected answer for each prompt.
Under load every reply is checked against its own prompt's expected answer, so a reply that went
to the wrong client, or that mixes two requests, counts as `mismatched`.  Every request sent is
either ok or one of the counted errors (sent = ok + errors).  Every other request streams
(server-sent events), so both paths are loaded.  Without --url the server runs in this process on
a free port, and the expected answers are first checked against
tunesmith.models.generate.generate_answers on the served model.

    .venv/bin/python bench/serve_load.py                                # built-in model, 8 clients, 30 s
    .venv/bin/python bench/serve_load.py --run runs/my-run --clients 4 --seconds 60
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000 --api-key KEY   # a server already running

Results go to bench/results/serve_load.json (written then renamed); --json prints them.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "serve_load.json"

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Give me one tip for sleeping better.",
    "What is 12 times 12?",
    "Write a haiku about autumn.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue? Answer in one sentence.",
    "Suggest a name for a grey cat.",
    "What does a thermometer measure?",
    "List two uses of a paperclip.",
    "Who wrote Romeo and Juliet?",
    "How many legs does a spider have?",
    "Describe the smell of rain in a few words.",
    "What is the opposite of 'ancient'?",
    "Give a synonym for 'happy'.",
    "What do bees make?",
]


class Client:
    """One keep-alive HTTP connection to the server, as one user of it would hold."""

    def __init__(self, url: str, api_key: str | None):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)

    def get(self, path: str) -> dict:
        self.conn.request("GET", path, headers=self.headers)
        response = self.conn.getresponse()
        return json.loads(response.read())

    def chat(self, model: str, prompt: str, max_tokens: int, stream: bool) -> tuple[int, str, int]:
        """(HTTP status, reply text, completion tokens) for one greedy chat completion."""
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": max_tokens, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        self.conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=self.headers)
        response = self.conn.getresponse()
        if response.status != 200:
            response.read()
            return response.status, "", 0
        if not stream:
            reply = json.loads(response.read())
            return 200, reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]
        pieces, tokens = [], 0
        for line in response:  # http.client undoes the chunked encoding; SSE events are `data: ...` lines
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                return 500, "", 0
            if event["choices"]:
                pieces.append(event["choices"][0]["delta"].get("content") or "")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        return 200, "".join(pieces), tokens


def quantile(values: list[float], q: int) -> float | None:
    """The q-th percentile (statistics.quantiles, inclusive method); None without two values."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def sequential(url: str, api_key: str | None, model: str, max_tokens: int) -> dict:
    """One client asks each prompt once, in turn: the timings, and the replies it got (`answers`)."""
    client = Client(url, api_key)
    answers, latencies, tokens = [], [], 0
    started = time.perf_counter()
    for prompt in PROMPTS:
        t = time.perf_counter()
        status, text, n = client.chat(model, prompt, max_tokens, stream=False)
        if status != 200:
            raise SystemExit(f"the server answered {status} to a plain request; is it serving {model}?")
        latencies.append(time.perf_counter() - t)
        answers.append(text)
        tokens += n
    seconds = time.perf_counter() - started
    return {"answers": answers, "requests": len(PROMPTS), "seconds": seconds,
            "requests_per_s": len(PROMPTS) / seconds, "completion_tokens_per_s": tokens / seconds,
            "latency_p50_s": quantile(latencies, 50), "latency_p95_s": quantile(latencies, 95)}


def load(url: str, api_key: str | None, model: str, max_tokens: int, clients: int, seconds: float,
         expected: list[str]) -> dict:
    """`clients` threads send requests until `seconds` have passed (the ones in flight then finish)."""
    lock = threading.Lock()
    sent, ok, tokens = 0, 0, 0
    errors: Counter = Counter()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    start_together = threading.Barrier(clients)

    def run(index: int) -> None:
        nonlocal sent, ok, tokens
        client = Client(url, api_key)
        start_together.wait()
        k = 0
        while time.perf_counter() < deadline:
            i = (index + k * clients) % len(PROMPTS)  # each client walks the prompts from its own place
            stream = (index + k) % 2 == 1
            k += 1
            with lock:
                sent += 1
            t = time.perf_counter()
            try:
                status, text, n = client.chat(model, PROMPTS[i], max_tokens, stream)
            except Exception as exc:  # counted, not raised: the point is to account for every request
                with lock:
                    errors[type(exc).__name__] += 1
                client = Client(url, api_key)
                continue
            elapsed = time.perf_counter() - t
            with lock:
                if status != 200:
                    errors[f"http_{status}"] += 1
                elif text != expected[i]:
                    errors["mismatched"] += 1
                else:
                    ok += 1
                    tokens += n
                    latencies.append(elapsed)

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    assert sent == ok + sum(errors.values()), (sent, ok, errors)
    return {"clients": clients, "seconds": wall, "sent": sent, "ok": ok, "errors": dict(errors),
            "mismatched": errors.get("mismatched", 0), "requests_per_s": ok / wall,
            "completion_tokens_per_s": tokens / wall, "latency_p50_s": quantile(latencies, 50),
            "latency_p95_s": quantile(latencies, 95)}


def check_against_generate_answers(server, max_tokens: int, answers: list[str]) -> int:
    """How many of the expected answers equal generate_answers' greedy answer on the served model."""
    from tunesmith.data.tokens import chat_ids
    from tunesmith.models.generate import generate_answers

    generator = server.generator
    prompts = [chat_ids(generator.tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)
               for p in PROMPTS]
    direct = generate_answers(generator.model, generator.tokenizer, prompts, max_tokens, 1, generator.device,
                              desc="generate_answers")
    return sum(a.strip() == d for a, d in zip(answers, direct))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="run or model folder to serve (default: the built-in smollm2-135m-instruct)")
    parser.add_argument("--url", help="load a server that is already running, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", help="the server's API key (with --url)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the clients send requests (default 30)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    from tunesmith.fileio import atomic_write_json

    server = thread = None
    if args.url:
        url, served = args.url.rstrip("/"), args.url
    else:
        from tunesmith.models import builtin_path
        from tunesmith.ship.serve import make_server

        served = args.run or str(builtin_path("smollm2-135m-instruct"))
        server = make_server(served, "127.0.0.1", 0, api_key=args.api_key, log_requests=False,
                             max_queue=max(64, args.clients))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        url = server.url
    try:
        model = Client(url, args.api_key).get("/v1/models")["data"][0]["id"]
        # A first, untimed pass gives the expected answers and warms up (weights paged in, buffers sized).
        expected = sequential(url, args.api_key, model, args.max_tokens)["answers"]
        matches = check_against_generate_answers(server, args.max_tokens, expected) if server else None
        before = sequential(url, args.api_key, model, args.max_tokens)
        loaded = load(url, args.api_key, model, args.max_tokens, args.clients, args.seconds, expected)
        after = sequential(url, args.api_key, model, args.max_tokens)
        for baseline in (before, after):
            baseline["mismatched"] = sum(a != e for a, e in zip(baseline.pop("answers"), expected))
    finally:
        if server is not None:
            server.shutdown()
            thread.join()

    import torch

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "served": served,
        "model": model,
        "max_tokens": args.max_tokens,
        "prompts": len(PROMPTS),
        "threads": torch.get_num_threads() if server else None,
        "expected_answers_equal_generate_answers": matches,
        "one_client_before": before,
        "concurrent": loaded,
        "one_client_after": after,
        # requests/s under load over one client's, the mean of before and after
        "throughput_ratio": loaded["requests_per_s"] / ((before["requests_per_s"] + after["requests_per_s"]) / 2),
    }
    atomic_write_json(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    if matches is not None:
        print(f"expected answers equal to generate_answers' greedy answers: {matches} of {len(PROMPTS)}")
    for name, r in (("one client, before", before), (f"{args.clients} clients at once", loaded),
                    ("one client, after", after)):
        p50, p95 = (f"{r[k]:.2f}" if r[k] is not None else "-" for k in ("latency_p50_s", "latency_p95_s"))
        print(f"{name:22s} {r['requests_per_s']:6.2f} req/s  {r['completion_tokens_per_s']:7.1f} tokens/s  "
              f"latency p50 {p50} s  p95 {p95} s")
    print(f"sent {loaded['sent']} = ok {loaded['ok']} + errors {sum(loaded['errors'].values())} "
          f"{loaded['errors'] or ''}(mismatched replies: {loaded['mismatched']})")
    print(f"one-client replies that differ from the expected ones: before {before['mismatched']}, "
          f"after {after['mismatched']}")
    print(f"throughput under load / one client (mean of before and after): {result['throughput_ratio']:.2f}x")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
