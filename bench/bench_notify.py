"""Notification latency: a job event -> the notification delivered to a loopback endpoint.

Figures (one JSON object each, the last stdout lines; DESIGN.md's performance table):
- notify_latency: a real daemon whose notify_urls is one apprise json:// endpoint on
  127.0.0.1 (an HTTP server in this process); each of --runs jobs fails at its preflight
  (an unknown flag: no trainer, so the figure is the notification path alone). From the
  `failed` event's time in the job's record to the endpoint having the whole request.
  One job at a time, each after the previous notification arrived.
- notify_daemon_rss_mb: the daemon's RSS after those sends (apprise stays in the sender
  subprocess; the idle target applies).
"""
from __future__ import annotations

import argparse
import http.server
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.bench_daemon import Bench, figure, until


class Endpoint:
    """An HTTP server on 127.0.0.1 that notes when each request had arrived whole."""

    def __init__(self):
        self.got: list[tuple[float, dict]] = []
        box = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                box.got.append((time.time(), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"json://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def failing_job(name: str) -> dict:
    return {"name": name, "phases": [{"phase": "base", "args": {"num_iterations": 2, "no_such_flag": 1}}]}


def bench_latency(b: Bench, endpoint: Endpoint, runs: int) -> list[float]:
    out = []
    for i in range(runs):
        name = f"n{i:03d}"
        b.drop(failing_job(name))
        until(lambda: b.record(name).get("state") == "failed", 60, 0.01)
        at = next(e["at"] for e in b.record(name)["events"] if e["kind"] == "preflight_failed")
        got = until(lambda: next((t for t, m in endpoint.got if m["title"].startswith(f"{name}:")), None), 60, 0.005)
        out.append(got - at)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    figures = []
    endpoint = Endpoint()
    with tempfile.TemporaryDirectory(prefix="nanod-bench-notify-") as tmp:
        b = Bench(Path(tmp))
        b.home.mkdir(parents=True)
        (b.home / "config.toml").write_text(f"notify_urls = [{json.dumps(endpoint.url)}]\n")
        b.start()
        try:
            lat = bench_latency(b, endpoint, args.runs)
            figures.append(figure("notify_latency", lat, "s", 1.0, p90=round(sorted(lat)[int(0.9 * len(lat))], 3),
                                  max=round(max(lat), 3)))
            import psutil
            rss = psutil.Process(b.daemon.pid).memory_info().rss / 2**20
            figures.append(figure("notify_daemon_rss_mb", rss, "MB", 60))
        finally:
            b.stop()
            endpoint.close()
    for f in figures:
        print(json.dumps(f), flush=True)
    print(f"latency per event: {', '.join(f'{x:.2f}' for x in lat)} (median {statistics.median(lat):.3f} s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
