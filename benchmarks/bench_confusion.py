"""Confusion-matrix accumulation speed: textseg's torch.bincount vs numpy baselines, same data.

    .venv/bin/python benchmarks/bench_confusion.py [--images 30] [--size 512]

Prints ms per image and the speed ratio against ``np.add.at`` (the obvious per-pixel scatter) and
``np.bincount`` on the same predictions; all three matrices are checked to be identical.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from textseg.metrics import ConfusionMatrix


def add_at(preds, targets, n):
    m = np.zeros((n, n), np.int64)
    for p, t in zip(preds, targets):
        keep = t != 255
        np.add.at(m, (t[keep].astype(np.int64), p[keep].astype(np.int64)), 1)
    return m


def np_bincount(preds, targets, n):
    m = np.zeros(n * n, np.int64)
    for p, t in zip(preds, targets):
        keep = t != 255
        m += np.bincount(t[keep].astype(np.int64) * n + p[keep], minlength=n * n)
    return m.reshape(n, n)


def textseg_cm(preds, targets, n):
    cm = ConfusionMatrix(n)
    for p, t in zip(preds, targets):
        cm.update(p, t)
    return cm.mat.numpy()


def bench(fn, *args, repeat=3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    # Each class count is measured twice: the first configuration of a process runs up to 3x slower
    # here (allocator / CPU state); read the second rows.
    for n in (21, 171, 21, 171):
        preds = [rng.integers(0, n, (args.size, args.size), dtype=np.uint8) for _ in range(args.images)]
        targets = [np.where(rng.random((args.size, args.size)) < 0.05, 255, p).astype(np.uint8) for p in preds]
        t_ref, ref = bench(add_at, preds, targets, n)
        t_np, m_np = bench(np_bincount, preds, targets, n)
        t_ts, m_ts = bench(textseg_cm, preds, targets, n)
        assert (ref == m_np).all() and (ref == m_ts).all()
        per = 1000 / args.images
        print(f"C={n:3d}: np.add.at {t_ref * per:7.2f} ms/img | np.bincount {t_np * per:6.2f} ms/img | "
              f"textseg {t_ts * per:6.2f} ms/img | textseg vs add.at x{t_ref / t_ts:.1f}, vs bincount "
              f"x{t_np / t_ts:.2f}")


if __name__ == "__main__":
    main()
