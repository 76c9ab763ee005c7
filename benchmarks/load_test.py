"""Bounded load test of `textseg serve` on loopback only.

Starts `textseg serve` (offline default model unless --model/--weights) on 127.0.0.1 in a subprocess,
sends N segmentation requests from C concurrent clients (each uploading a photo and asking for the
overlay), and reports failures, latency p50/p95/max, throughput and the server's peak RSS.

    .venv/bin/python benchmarks/load_test.py --requests 200 --concurrency 16
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco-mini" / "images"
VOC = ("aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,dining table,dog,horse,motorbike,person,"
       "potted plant,sheep,sofa,train,tv monitor")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photos(n: int) -> list[bytes]:
    paths = sorted(COCO.glob("*.jpg"))[:n] if COCO.is_dir() else []
    if paths:
        return [p.read_bytes() for p in paths]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--images", type=int, default=8, help="distinct photos cycled through")
    ap.add_argument("--model", default=None)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--timeout", type=float, default=300.0, help="client timeout per request")
    args = ap.parse_args()
    if args.requests > 10_000 or args.concurrency > 64:
        sys.exit("refusing: this load test is bounded (<= 10,000 requests, <= 64 clients)")

    port = free_port()
    cmd = [str(ROOT / ".venv" / "bin" / "textseg"), "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-queue", str(max(32, args.concurrency * 2))]
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
            if server.poll() is not None or time.time() - t0 > 120:
                sys.exit("server did not start: " + server.stderr.read().decode()[-2000:])
            time.sleep(0.2)
        data = photos(args.images)
        rss_idle = peak_rss_mb(server.pid)

        def one(i: int) -> tuple[float, int, str]:
            t = time.perf_counter()
            try:
                r = httpx.post(f"{base}/v1/segment", data={"labels": VOC, "return_overlay": "true"},
                               files={"image": (f"{i}.jpg", data[i % len(data)], "image/jpeg")}, timeout=args.timeout)
                return time.perf_counter() - t, r.status_code, "" if r.status_code == 200 else r.text[:200]
            except httpx.HTTPError as e:
                return time.perf_counter() - t, 0, repr(e)

        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - start
        lat = sorted(r[0] for r in results)
        failures = [r for r in results if r[1] != 200]
        report = {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "failures": len(failures),
            "p50_s": statistics.median(lat),
            "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "max_s": lat[-1],
            "throughput_rps": args.requests / wall,
            "wall_s": wall,
            "server_rss_idle_mb": rss_idle,
            "server_peak_rss_mb": peak_rss_mb(server.pid),
            "first_errors": [f"{r[1]} {r[2]}" for r in failures[:3]],
        }
        print(json.dumps(report, indent=2))
        return 0 if not failures else 1
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
