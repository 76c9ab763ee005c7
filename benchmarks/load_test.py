"""Bounded load test of `textseg serve` on loopback only (issue 18).

Starts `textseg serve` with its default limits (offline default model unless --model/--weights) on
127.0.0.1 in a subprocess, warms it up with one request, then for each concurrency level sends
``--requests`` segmentation requests from that many concurrent clients, each a *distinct* photo
(COCO-MINI; past its 159 photos, mirrored copies) asking for the overlay. A client that gets 503
waits the server's ``Retry-After`` (capped) and tries that photo again, up to ``--retries`` times.
A monitor polls ``/healthz`` throughout.

It checks, and exits 1 when any fails:
- every response is 200, or 503 with a ``Retry-After`` header: zero 404 / 422 / 500 / errors;
- the server's RSS after the phase minus before the load (after the warm-up) is under --rss-limit-mb;
- ``/healthz`` answered every poll with 200.
It prints p50 / p95 latency of the successful requests, throughput, status counts and RSS.

    python benchmarks/load_test.py --requests 200 --concurrency 24 64
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
VOC = ("aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,dining table,dog,horse,motorbike,person,"
       "potted plant,sheep,sofa,train,tv monitor")


def shared_data() -> Path:
    env = os.environ.get("TEXTSEG_SHARED_DATA")
    for p in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data", Path("/work/shared/data")]:
        if (p / "coco-mini" / "images").is_dir():
            return p
    return ROOT.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photos(n: int, data_dir: Path) -> list[bytes]:
    """``n`` distinct photos: COCO-MINI's, then their mirror images (re-encoded), then noise."""
    paths = sorted((data_dir / "coco-mini" / "images").glob("*.jpg"))
    out = [p.read_bytes() for p in paths[:n]]
    for p in paths:
        if len(out) >= n:
            break
        buf = io.BytesIO()
        ImageOps.mirror(Image.open(p).convert("RGB")).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    rng = np.random.default_rng(0)
    while len(out) < n:  # no COCO-MINI here
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    assert len(set(out)) == n
    return out


def rss_mb(pid: int, key: str = "VmRSS:") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


class HealthMonitor(threading.Thread):
    def __init__(self, base: str, every: float = 0.25):
        super().__init__(daemon=True)
        self.base, self.every = base, every
        self.polls, self.failures, self.worst = 0, [], 0.0
        self.stop = threading.Event()

    def run(self):
        with httpx.Client(timeout=5) as c:
            while not self.stop.is_set():
                t = time.perf_counter()
                try:
                    r = c.get(f"{self.base}/healthz")
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.text[:100]}")
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                self.polls += 1
                self.worst = max(self.worst, time.perf_counter() - t)
                self.stop.wait(self.every)


def phase(base: str, pid: int, concurrency: int, data: list[bytes], args, rss_before: float) -> dict:
    attempts: list[tuple[int, float, bool]] = []  # (status, seconds, has Retry-After)
    lock = threading.Lock()
    deadline = time.monotonic() + args.max_seconds

    def one(i: int) -> int:
        status = 0
        for _ in range(args.retries + 1):
            if time.monotonic() > deadline:
                break
            t = time.perf_counter()
            retry_after = None
            try:
                r = httpx.post(f"{base}/v1/segment", data={"labels": VOC, "return_overlay": "true"},
                               files={"image": (f"{i}.jpg", data[i], "image/jpeg")}, timeout=args.timeout)
                status, retry_after = r.status_code, r.headers.get("retry-after")
                if status not in (200, 503):
                    print(f"request {i}: {status} {r.text[:200]}", file=sys.stderr)
            except httpx.HTTPError as e:
                status = 0
                print(f"request {i}: {e!r}", file=sys.stderr)
            with lock:
                attempts.append((status, time.perf_counter() - t, retry_after is not None))
            if status != 503 or retry_after is None:
                break
            time.sleep(min(float(retry_after), args.max_retry_wait))
        return status

    monitor = HealthMonitor(base)
    monitor.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        final = list(pool.map(one, range(len(data))))
    wall = time.perf_counter() - start
    monitor.stop.set()
    monitor.join(timeout=10)
    rss_after = rss_mb(pid)

    statuses = Counter(s for s, _, _ in attempts)
    bad = [s for s, _, ra in attempts if not (s == 200 or (s == 503 and ra))]
    ok_lat = [t for s, t, _ in attempts if s == 200]
    busy_lat = [t for s, t, _ in attempts if s == 503]
    report = {
        "concurrency": concurrency,
        "photos": len(data),
        "attempts": len(attempts),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "succeeded": final.count(200),
        "gave_up_503": final.count(503),
        "bad_responses": len(bad),
        "p50_s": statistics.median(ok_lat) if ok_lat else float("nan"),
        "p95_s": pct(ok_lat, 0.95),
        "max_s": max(ok_lat, default=float("nan")),
        "p50_503_s": statistics.median(busy_lat) if busy_lat else None,
        "throughput_ok_per_s": final.count(200) / wall,
        "wall_s": wall,
        "healthz_polls": monitor.polls,
        "healthz_failures": len(monitor.failures),
        "healthz_worst_s": monitor.worst,
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_after,
        "rss_delta_mb": rss_after - rss_before,
        "rss_peak_mb": rss_mb(pid, "VmHWM:"),
    }
    report["pass"] = (not bad and monitor.polls > 0 and not monitor.failures
                      and report["rss_delta_mb"] < args.rss_limit_mb and len(final) == len(data))
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="distinct photos per concurrency level")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[24, 64])
    ap.add_argument("--retries", type=int, default=3, help="tries again after a 503, waiting Retry-After")
    ap.add_argument("--max-retry-wait", type=float, default=5.0, help="cap on one Retry-After wait (s)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--serve-args", default="", help="extra `textseg serve` flags, e.g. '--max-queue 64'")
    ap.add_argument("--timeout", type=float, default=300.0, help="client timeout per request")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="no new attempt after this, per level")
    ap.add_argument("--rss-limit-mb", type=float, default=200.0)
    ap.add_argument("--data", type=Path, default=None, help="the shared data folder (COCO-MINI)")
    args = ap.parse_args()
    if args.requests > 10_000 or max(args.concurrency) > 64 or min(args.concurrency) < 1:
        sys.exit("refusing: this load test is bounded (<= 10,000 requests, 1..64 clients)")

    port = free_port()
    cmd = [sys.executable, "-m", "textseg.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           *args.serve_args.split()]
    if args.model:
        cmd += ["--model", args.model]
    if args.weights:
        cmd += ["--weights", args.weights]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() - t0 > 180:
                sys.exit("server did not start: " + server.stderr.read().decode()[-2000:])
            time.sleep(0.2)
        rss_cold = rss_mb(server.pid)
        warm = io.BytesIO()
        Image.fromarray(np.full((480, 640, 3), 128, np.uint8)).save(warm, format="JPEG")
        r = httpx.post(f"{base}/v1/segment", data={"labels": VOC, "return_overlay": "true"},
                       files={"image": ("warm.jpg", warm.getvalue(), "image/jpeg")}, timeout=args.timeout)
        if r.status_code != 200:
            sys.exit(f"warm-up request failed: {r.status_code} {r.text[:300]}")
        rss_before = rss_mb(server.pid)
        data = photos(args.requests, args.data or shared_data())
        reports = []
        for c in args.concurrency:
            reports.append(phase(base, server.pid, c, data, args, rss_before))
            print(json.dumps(reports[-1], indent=2), flush=True)
        summary = {"rss_cold_mb": rss_cold, "rss_after_warmup_mb": rss_before,
                   "all_pass": all(r["pass"] for r in reports)}
        print(json.dumps(summary, indent=2))
        return 0 if summary["all_pass"] else 1
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
