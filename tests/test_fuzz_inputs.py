"""Fuzzing the readers of untrusted files (issue 18): seeded mutations of PNG, JPEG, safetensors and
torch / TorchScript zip files. Every case must end in a result or one of textseg's own errors
(:class:`TextsegError` subclasses): never another exception, never a memory blow-up (the loop runs in
a subprocess under ``RLIMIT_AS``), in bounded time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

FUZZ = r'''
import io, json, random, resource, sys, time, zipfile
from pathlib import Path
import numpy as np, torch
from PIL import Image
from safetensors.torch import save as st_save
from textseg.errors import TextsegError
from textseg.io import load_image
from textseg.train.checkpoint import load_checkpoint as load_train_checkpoint
from textseg.weights.load import load_checkpoint, save_model
from textseg.weights.read import read_checkpoint
from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig

tmp, seed, deadline = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rng = random.Random(seed)
nrng = np.random.default_rng(seed)

def image_bytes(fmt, mode):
    arr = (nrng.random((rng.randint(1, 40), rng.randint(1, 40), 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    return buf.getvalue()

cfg = CLIPConfig(embed_dim=8, vision=VisionConfig(image_size=16, layers=1, width=16, patch_size=8, heads=2),
                 text=TextConfig(context_length=8, width=16, heads=2, layers=1, vocab_size=600))
save_model(CLIP(cfg), tmp / "native.safetensors")
torch.save({"visual.w": torch.randn(3, 4), "b": torch.arange(5)}, tmp / "plain.pt")
torch.save({"format": "textseg-train", "step": 1, "model": {"w": torch.randn(2, 2)}}, tmp / "train.pt")
with zipfile.ZipFile(tmp / "plain.pt") as z, zipfile.ZipFile(tmp / "script.pt", "w") as out:
    for info in z.infolist():  # a zip the TorchScript reader takes (it has a code/ entry)
        out.writestr(info, z.read(info.filename))
    out.writestr(z.namelist()[0].split("/")[0] + "/code/__torch__.py", "")
seeds = {
    "png": [image_bytes("PNG", m) for m in ("RGB", "L", "P", "RGBA", "1")],
    "jpeg": [image_bytes("JPEG", m) for m in ("RGB", "L")],
    "gif": [image_bytes("GIF", "P")],
    "safetensors": [(tmp / "native.safetensors").read_bytes(), st_save({"a": torch.randn(4, 3)})],
    "torch": [(tmp / "plain.pt").read_bytes(), (tmp / "script.pt").read_bytes()],
    "train": [(tmp / "train.pt").read_bytes()],
}
BIG = [b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x01\x00\x00", b"\xff\xff"]

def mutate(data):
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, pos = rng.randrange(6), rng.randrange(max(1, len(b)))
        if op == 0 and pos < len(b):
            b[pos] = rng.randrange(256)
        elif op == 1:
            del b[pos:]
        elif op == 2:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 3:
            big = rng.choice(BIG)
            b[pos:pos + len(big)] = big
        elif op == 4:
            n = rng.randint(1, 64)
            b[pos:pos] = b[pos:pos + n] * rng.randint(1, 4)
        else:
            del b[pos:pos + rng.randint(1, 64)]
    return bytes(b)

def run(kind, data, i):
    if kind in ("png", "jpeg", "gif"):
        return load_image(data, max_pixels=4_000_000)
    path = tmp / f"case{i % 7}.{'safetensors' if kind == 'safetensors' else 'pt'}"
    path.write_bytes(data)
    if kind == "train":
        return load_train_checkpoint(path)
    raw = read_checkpoint(path)
    return load_checkpoint(path) if kind == "safetensors" else raw

kinds = [k for k, v in seeds.items() for _ in range(3 if k in ("png", "safetensors", "torch") else 1)]
counts, bad, t0, i = {}, [], time.perf_counter(), 0
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
lim = vm + 1536 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
while time.perf_counter() - t0 < deadline and i < 4000:
    kind = kinds[i % len(kinds)]
    data = mutate(rng.choice(seeds[kind]))
    try:
        run(kind, data, i)
        outcome = "ok"
    except TextsegError as e:
        outcome = type(e).__name__
    except BaseException as e:
        outcome = "BAD"
        bad.append(f"{kind} case {i}: {type(e).__name__}: {str(e)[:200]}")
    counts[f"{kind}:{outcome}"] = counts.get(f"{kind}:{outcome}", 0) + 1
    i += 1
print(json.dumps({"cases": i, "seconds": time.perf_counter() - t0, "counts": counts, "bad": bad[:20]}))
'''


def test_mutated_images_and_checkpoints_raise_only_textseg_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1",
               MALLOC_ARENA_MAX="2")
    r = subprocess.run([sys.executable, "-c", FUZZ, str(tmp_path), "18", "25"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["bad"] == [], report["bad"]
    assert report["cases"] >= 1500, report  # a few thousand when the machine is not loaded
    counts = report["counts"]
    for kind in ("png", "jpeg", "gif", "safetensors", "torch", "train"):  # every reader was exercised ...
        assert sum(n for k, n in counts.items() if k.startswith(kind + ":")) > 50, counts
    assert counts.get("png:ImageError", 0) > 0 and counts.get("safetensors:CheckpointError", 0) > 0  # ... and refused
