"""Issue 18 (hardening): each reproduction of a hostile or careless input, as a test. Memory cases run
in a subprocess under ``RLIMIT_AS`` (the address space it had after importing, plus a budget) and must
end within it with one clear line or a correct result."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textseg.cli import main
from textseg.errors import CheckpointError, ImageError, TextsegError
from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from textseg.weights.load import load_checkpoint, save_model
from textseg.weights.read import read_checkpoint

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
sys.path.insert(0, str(TESTS))
from eval_worker import make_folder  # noqa: E402

TINY = CLIPConfig(embed_dim=24, vision=VisionConfig(image_size=32, layers=2, width=32, patch_size=8, heads=2),
                  text=TextConfig(context_length=16, width=32, heads=2, layers=1))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_model(CLIP(TINY), path)
    return path


@pytest.fixture(scope="module")
def small_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "small.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)).save(path)
    return path


def png_bytes(width: int, height: int, idat: bool = True) -> bytes:
    """A 1-bit greyscale PNG of zeros, compressed by streaming (a 40,000,000 x 1 one is ~5 KB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = b""
    if idat:
        comp, row = zlib.compressobj(9), b"\x00" + bytes((width + 7) // 8)
        body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def run_limited(code: str, budget_mb: int, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose address space may grow ``budget_mb`` beyond what
    importing torch and textseg took."""
    prelude = (
        "import resource, sys\n"
        "import torch, PIL.Image, textseg.cli, textseg.weights.load, textseg.segment, textseg.zeroshot\n"
        "vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024\n"
        f"lim = vm + {budget_mb} * 2**20\n"
        "resource.setrlimit(resource.RLIMIT_AS, (lim, lim))\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1",
               MALLOC_ARENA_MAX="2")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env,
                          timeout=timeout)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ 1: images that cost gigabytes
def test_upsampling_a_one_pixel_high_strip_stays_within_memory():
    """1 x 1,000,000 from 112 cells: the old interpolation matrix alone was 1M x 112 float64 (0.9 GB)."""
    r = run_limited(
        "import torch.nn.functional as F\n"
        "from textseg.segment.slide import argmax_bands, upsample\n"
        "z = torch.randn(4, 1, 112, generator=torch.Generator().manual_seed(0))\n"
        "ref = F.interpolate(z[None], size=(1, 1_000_000), mode='bilinear', align_corners=False)[0]\n"
        "assert (torch.from_numpy(argmax_bands(z, (1, 1_000_000))).long() == ref.argmax(0)).float().mean() > 0.9999\n"
        "assert torch.allclose(upsample(z, (1, 1_000_000)), ref, atol=1e-4)\n"  # F.interpolate: float32 indices
        "print('OK')\n", budget_mb=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_a_5kb_40_megapixel_strip_is_refused_in_one_line_within_memory(tmp_path, weights):
    strip = tmp_path / "strip.png"
    strip.write_bytes(png_bytes(40_000_000, 1))
    assert strip.stat().st_size < 20_000
    r = run_limited(f"sys.exit(textseg.cli.main(['segment', {str(strip)!r}, '--labels', 'cat,dog', '--weights', "
                    f"{str(weights)!r}, '--out', {str(tmp_path / 'out')!r}, '--no-progress']))\n", budget_mb=600)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "sides above 65535 pixels are refused" in r.stderr


def test_pixel_limit_applies_to_every_reader_and_pillow_is_left_alone(tmp_path, capsys):
    header_only = png_bytes(12_000, 12_000, idat=False)  # 144 MP: above 100 MP, below Pillow's 179 MP
    with pytest.raises(ImageError, match=r"12000x12000 \(144.0 MP\), above the 100 MP limit"):
        from textseg.io import load_image

        load_image(header_only)
    big = tmp_path / "big.png"
    big.write_bytes(header_only)
    code, _, err = cli(capsys, "classify", big, "--labels", "cat,dog")
    assert code == 2 and "above the 100 MP limit" in err and "Traceback" not in err
    r = subprocess.run([sys.executable, "-c", "import PIL.Image as I; d = I.MAX_IMAGE_PIXELS; import textseg.io, "
                        "textseg.cli, textseg.segment; print(I.MAX_IMAGE_PIXELS == d)"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(SRC)))
    assert r.stdout.strip() == "True", r.stderr


# ------------------------------------------------------------------ 3: every numeric option checked
@pytest.mark.parametrize("extra, message", [
    (["--slide", "224", "448"], "CROP >= STRIDE > 0"),
    (["--slide", "0", "0"], "CROP >= STRIDE > 0"),
    (["--slide", "-32", "-64"], "CROP >= STRIDE > 0"),
    (["--short-side", "-1"], "--short-side must be >= 0"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--min-area", "1.5"], "--min-area is a fraction"),
    (["--max-megapixels", "nan"], "--max-megapixels must be a finite number"),
    (["--max-megapixels", "0"], "--max-megapixels must be positive"),
])
def test_segment_numeric_options_are_validated(capsys, small_png, weights, tmp_path, extra, message):
    code, out, err = cli(capsys, "segment", small_png, "--labels", "cat,dog", "--weights", weights,
                         "--out", tmp_path, *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*_mask.png"))  # nothing was segmented


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "99999"], "--port must be in 1-65535"),
    (["serve", "--workers", "0"], "--workers must be >= 1"),
    (["eval", "--dataset", "folder", "--root", ".", "--short-side", "0"], "--short-side must be > 0"),
    (["eval", "--dataset", "folder", "--root", ".", "--max-failed", "2"], "--max-failed is a fraction"),
    (["classify", "x.png", "--labels", "a", "--device", "bogus"], "is not a device"),
])
def test_other_commands_numeric_and_device_options(capsys, argv, message):
    code, _, err = cli(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_threshold_nan_is_refused_by_the_parser(capsys, small_png):
    for command in (["segment", str(small_png), "--labels", "a"], ["eval", "--dataset", "folder", "--root", "."]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--threshold", "nan"])
        assert e.value.code == 2 and "threshold must be in [0, 1]" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys, small_png):
    code, _, err = cli(capsys, "classify", small_png, "--labels", "a,b", "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err


# ------------------------------------------------------------------ 4: cards and zip bombs
def _native_with_card(path: Path, weights: Path, mutate) -> Path:
    from safetensors.torch import load_file, save_file

    from textseg.weights.read import CARD_KEY

    raw = read_checkpoint(weights)
    card = json.loads(raw.metadata[CARD_KEY])
    mutate(card["config"])
    save_file(load_file(str(weights)), str(path), metadata={CARD_KEY: json.dumps(card)})
    return path


def test_a_card_with_huge_dimensions_is_refused_before_allocating(tmp_path, weights):
    def huge(cfg):
        cfg["vision"]["width"] = 200_000
        cfg["text"]["width"] = 200_000  # ~300 GB of parameters if built

    bad = _native_with_card(tmp_path / "huge.safetensors", weights, huge)
    r = run_limited(f"from textseg.weights.load import load_checkpoint\n"
                    f"from textseg.errors import CheckpointError\n"
                    f"try:\n    load_checkpoint({str(bad)!r})\n"
                    f"except CheckpointError as e:\n    print('REFUSED', e)\n", budget_mb=400)
    assert r.returncode == 0 and "REFUSED" in r.stdout and "shape mismatch" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("mutate", [
    lambda c: c["vision"].update(heads=0),
    lambda c: c["vision"].update(width="wide"),
    lambda c: c["text"].update(layers=-1),
    lambda c: c.update(vision=None),
    lambda c: c["vision"].update(patch_size=0),
    lambda c: c.pop("embed_dim"),
    lambda c: c["vision"].update(bogus_field=1),
])
def test_malformed_card_fields_are_one_checkpoint_error(tmp_path, weights, mutate):
    bad = _native_with_card(tmp_path / "bad.safetensors", weights, mutate)
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)


def _zip_bomb(path: Path, torchscript: bool) -> Path:
    torch.save({"w": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as z:
        root = z.namelist()[0].split("/")[0]
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open(f"{root}/data/9", "w", force_zip64=True) as fh:
            block = bytes(16 << 20)
            for _ in range(20):  # 320 MB of zeros, ~0.3 MB compressed
                fh.write(block)
        if torchscript:
            z.writestr(f"{root}/code/__torch__.py", "")
    return path


@pytest.mark.parametrize("torchscript", [False, True])
def test_zip_bomb_checkpoints_are_refused_within_memory(tmp_path, torchscript):
    bomb = _zip_bomb(tmp_path / "bomb.pt", torchscript)
    assert bomb.stat().st_size < 2 << 20
    r = run_limited(f"from textseg.weights.read import read_checkpoint\n"
                    f"from textseg.errors import CheckpointError\n"
                    f"try:\n    read_checkpoint({str(bomb)!r})\n"
                    f"except CheckpointError as e:\n    print('REFUSED', e)\n", budget_mb=200)
    assert r.returncode == 0 and "REFUSED" in r.stdout and "zip bomb" in r.stdout, r.stderr[-2000:]


def test_tensor_larger_than_its_storage_is_refused(tmp_path):
    path = tmp_path / "strided.pt"
    torch.save({"w": torch.zeros(1).expand(50_000, 50_000)}, path)  # 10 GB once copied, 4 bytes stored
    with pytest.raises(CheckpointError, match="larger than its storage"):
        read_checkpoint(path)


# ------------------------------------------------------------------ 6: synonyms and the text cache
def test_total_prompts_are_limited():
    from textseg.text import parse_labels

    many = "thing: " + ";".join(f"s{i}" for i in range(2000))
    assert len(parse_labels([many])[0].synonyms) == 2000
    with pytest.raises(TextsegError, match="2000 label texts .* the limit is 400"):
        parse_labels([many], max_prompts=400)
    with pytest.raises(TextsegError, match="the limit is 65000"):
        parse_labels(";".join(f"s{i}" for i in range(65_001)))


def test_server_refuses_synonym_floods():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from seg_tiny import TinyColourModel

    from textseg.serve.app import ServeSettings, create_app

    settings = ServeSettings(max_labels=5, max_label_chars=40, max_prompts=20)
    with TestClient(create_app(TinyColourModel(cell=8), settings=settings), base_url="http://127.0.0.1") as client:
        buf = __import__("io").BytesIO()
        Image.new("RGB", (32, 32), (255, 0, 0)).save(buf, format="PNG")
        r = client.post("/v1/segment", data={"labels": "red; " + "; ".join(f"s{i}" for i in range(40))},
                        files={"image": ("x.png", buf.getvalue(), "image/png")})
    assert r.status_code == 422 and "41 label texts" in r.text


def test_text_cache_is_an_lru_bounded_in_bytes_in_memory_and_on_disk(tmp_path):
    from textseg.text import TextEmbeddingCache

    model = CLIP(TINY).eval()
    entry = 24 * 4  # one float32 embedding of embed_dim 24
    cache = TextEmbeddingCache(model, disk_dir=tmp_path, max_bytes=10 * entry)
    texts = [f"word {i}" for i in range(60)]
    got = torch.cat([cache.embed(texts[i : i + 7], "single") for i in range(0, 60, 7)])
    assert torch.allclose(got, model.embed_texts(texts, ("a photo of a {}.",)).float(), atol=1e-5)
    assert cache.nbytes <= 10 * entry and len(cache._mem) == 10
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and files[0].stat().st_size < 10 * entry + 4096
    forwards = cache.text_forwards
    cache.embed(["word 59"], "single")  # the most recent: still cached
    assert cache.text_forwards == forwards
    cache.embed(["word 0"], "single")  # the oldest: evicted, computed again
    assert cache.text_forwards == forwards + 1


# ------------------------------------------------------------------ 7: one line, never a traceback
def test_stray_template_braces_out_on_a_file_and_unwritable_convert(capsys, small_png, weights, tmp_path):
    code, _, err = cli(capsys, "segment", small_png, "--labels", "a,b", "--weights", weights,
                       "--templates", "a {} of {kind}", "--out", tmp_path / "o")
    assert code == 2 and "stray braces" in err
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, _, err = cli(capsys, "segment", small_png, "--labels", "a,b", "--weights", weights, "--out", a_file)
    assert code == 2 and "is a file, not a folder" in err and "Traceback" not in err
    code, _, err = cli(capsys, "convert", weights, a_file / "out.safetensors")
    assert code == 2 and "not a folder" in err and "Traceback" not in err


def test_serve_without_the_serve_extra_names_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    code, _, err = cli(capsys, "serve")
    assert code == 2 and "pip install 'textseg[serve]'" in err and "uvicorn" in err


# ------------------------------------------------------------------ 8: nothing half-written
def test_segment_killed_while_saving_leaves_no_truncated_overlay(capsys, monkeypatch, small_png, weights, tmp_path):
    original = Image.Image.save

    def dies_halfway(self, fp, format=None, **params):
        buf = __import__("io").BytesIO()
        original(self, buf, format=format or "PNG", **params)
        if self.mode == "RGB":  # the overlay: half its bytes, then the process is killed
            if isinstance(fp, (str, Path)):
                fp = open(fp, "wb")
            fp.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            fp.flush()
            raise KeyboardInterrupt
        (open(fp, "wb") if isinstance(fp, (str, Path)) else fp).write(buf.getvalue())

    monkeypatch.setattr(Image.Image, "save", dies_halfway)
    code, _, _ = cli(capsys, "segment", small_png, "--labels", "a,b", "--weights", weights, "--out", tmp_path)
    assert code == 130
    assert not (tmp_path / "small_overlay.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_training_resume_falls_back_cleans_temporaries_and_logs_each_step_once(tmp_path, capsys):
    from test_train_engine import _cfg, _trainer

    from textseg.train import checkpoint as ckpt_lib

    class Crash(Exception):
        pass

    def crash_at_5(trainer):
        if trainer.step == 5:
            raise Crash

    cfg = _cfg(tmp_path, steps=8, ckpt_every=2, keep_last=5, log_every=1, eval_every=100)
    with pytest.raises(Crash):
        _trainer(cfg, init_seed=0, callbacks=[crash_at_5]).fit()
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in ckpt_lib.list_checkpoints(ckpts)] == ["step_00000002.pt", "step_00000004.pt"]
    stale = ckpts / ".step_00000006.pt.x1y2.tmp"
    stale.write_bytes(bytes(1000))  # what a kill during a save leaves
    newest = ckpts / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:300])  # and a corrupt newest checkpoint
    resumed = _trainer(cfg, init_seed=5)
    assert resumed.step == 2 and not stale.exists()  # fell back to the previous good one
    assert "skipping an unreadable checkpoint" in capsys.readouterr().out
    resumed.fit()
    steps = [r["step"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == list(range(1, 9))  # no step twice


# ------------------------------------------------------------------ 9: exit codes as documented
def test_missing_file_and_symlink_loops_exit_2_loops_in_folders_reported(capsys, small_png, weights, tmp_path):
    for command in ("segment", "classify"):
        code, _, err = cli(capsys, command, tmp_path / "missing.png", "--labels", "a,b", "--weights", weights)
        assert code == 2 and "no such file" in err, (command, err)
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "good.png").write_bytes(small_png.read_bytes())
    os.symlink("loop.png", folder / "loop.png")
    code, _, err = cli(capsys, "segment", folder / "loop.png", "--labels", "a,b", "--weights", weights)
    assert code == 2 and "symlink loop" in err
    code, out, err = cli(capsys, "segment", folder, "--labels", "a,b", "--weights", weights, "--out",
                         tmp_path / "o", "--json", "--no-progress")
    assert code == 1 and "loop.png: symlink loop" in err
    assert [json.loads(line).get("error") is None for line in out.splitlines()] == [True, False]


def test_eval_exits_1_past_the_failure_fraction(tmp_path, capsys):
    root = make_folder(tmp_path / "set", n=7)
    for i in range(1, 7):
        (root / "masks" / f"im{i:02d}.png").unlink()
    code, _, err = cli(capsys, "eval", "--dataset", "folder", "--root", root, "--model", "oracle", "--no-progress")
    assert code == 1 and "6 of 7 images failed" in err
    code, _, _ = cli(capsys, "eval", "--dataset", "folder", "--root", root, "--model", "oracle", "--no-progress",
                     "--max-failed", "0.9")
    assert code == 0


def test_classify_and_segment_refuse_the_same_long_label(capsys, small_png, weights):
    long = "a" * 10_000
    errs = []
    for command in ("segment", "classify"):
        code, _, err = cli(capsys, command, small_png, "--labels", f"{long},b", "--weights", weights)
        assert code == 2
        errs.append(err.split("error: ", 1)[1])
    assert errs[0] == errs[1] and "the limit is 1000" in errs[0]
