"""``textseg segment`` end to end on a tiny CLIP checkpoint: outputs, JSON lines, any image mode,
bad images and bad labels."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from textseg.cli import main
from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from textseg.viz import overlay, palette
from textseg.weights.load import save_model


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    cfg = CLIPConfig(embed_dim=24, vision=VisionConfig(image_size=32, layers=2, width=32, patch_size=8, heads=2),
                     text=TextConfig(context_length=16, width=32, heads=2, layers=1))
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_model(CLIP(cfg), path)
    return str(path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8)).save(d / "a_rgb.png")
    Image.fromarray((rng.random((33, 20)) * 255).astype(np.uint8), mode="L").save(d / "b_gray.png")
    Image.fromarray((rng.random((24, 24, 4)) * 255).astype(np.uint8), mode="RGBA").save(d / "c_rgba.png")
    Image.fromarray((rng.random((30, 30)) * 65535).astype(np.uint16)).save(d / "d_16bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 50 wide x 20 high, shown 20 wide x 50 high
    Image.fromarray((rng.random((20, 50, 3)) * 255).astype(np.uint8)).save(d / "e_exif.jpg", exif=exif)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(d / "f_tiny.png")
    (d / "g_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" + bytes(100))
    return d


def run_cli(capsys, *argv):
    code = main(["segment", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_directory_with_every_mode_and_a_corrupt_file(capsys, tmp_path, weights, image_dir):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, image_dir, "--labels", "cat, dog; puppy, grass", "--weights", weights,
                             "--out", out_dir, "--json", "--short-side", "64", "--templates", "none",
                             "--threshold", "0.6")
    assert code == 1  # one image failed, the others were written
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert len(lines) == 7
    bad = [rec for rec in lines if "error" in rec]
    assert len(bad) == 1 and bad[0]["image"].endswith("g_corrupt.jpg") and "cannot read image" in bad[0]["error"]
    assert "g_corrupt.jpg" in err and "Traceback" not in err
    expected_sizes = {"a_rgb": (60, 40), "b_gray": (20, 33), "c_rgba": (24, 24), "d_16bit": (30, 30),
                      "e_exif": (20, 50), "f_tiny": (1, 1)}
    for rec in lines:
        if "error" in rec:
            continue
        assert set(rec) == {"image", "labels", "fractions", "mask", "overlay", "seconds"}
        assert rec["labels"] == ["cat", "dog", "grass", "background"]
        assert sum(rec["fractions"].values()) == pytest.approx(1.0)
        stem = rec["image"].rsplit("/", 1)[-1].split(".")[0]
        mask, ov = Image.open(rec["mask"]), Image.open(rec["overlay"])
        assert mask.size == expected_sizes[stem] and ov.size == expected_sizes[stem], stem
        assert mask.mode == "P" and np.asarray(mask).max() < 4
        detail = json.loads((out_dir / f"{stem}.json").read_text())
        assert detail["mode"] == "naclip" and [detail["width"], detail["height"]] == list(expected_sizes[stem])
        assert {"encode_image", "embed_text", "upsample"} <= set(detail["timings"])


def test_human_output_labels_file_and_options(capsys, tmp_path, weights, image_dir):
    labels = tmp_path / "labels.txt"
    labels.write_text("# my classes\ncat; kitty\nsofa\n", encoding="utf-8")
    code, out, err = run_cli(capsys, image_dir / "a_rgb.png", "--labels-file", labels, "--weights", weights,
                             "--out", tmp_path, "--short-side", "32", "--slide", "32", "16", "--mode", "sclip",
                             "--pamr", "--flip", "--threshold", "none", "--bg-words", "wall,floor",
                             "--min-area", "0.01", "--templates", "simple")
    assert code == 0, err
    assert "a_rgb.png:" in out and "a_rgb_overlay.png" in out
    detail = json.loads((tmp_path / "a_rgb.json").read_text())
    assert detail["labels"] == ["cat", "sofa", "background"] and detail["mode"] == "sclip"


@pytest.mark.parametrize(
    "labels, message",
    [("", "no labels"), (" , ;", "no labels"), ("cat,cat", "given twice"), ("x" * 1200, "characters long")],
)
def test_bad_labels_are_one_line_errors(capsys, tmp_path, weights, image_dir, labels, message):
    code, out, err = run_cli(capsys, image_dir / "a_rgb.png", "--labels", labels, "--weights", weights,
                             "--out", tmp_path)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_many_long_and_non_latin_labels(capsys, tmp_path, weights, image_dir):
    many = ",".join(f"thing {i}" for i in range(2000))
    code, out, err = run_cli(capsys, image_dir / "a_rgb.png", "--labels", many, "--weights", weights,
                             "--out", tmp_path / "many", "--json", "--short-side", "32", "--templates", "none",
                             "--threshold", "none")
    assert code == 0, err
    rec = json.loads(out)
    assert len(rec["labels"]) == 2000
    mask = Image.open(rec["mask"])
    assert mask.mode.startswith("I") and np.asarray(mask).max() < 2000  # 16-bit label map
    long_label = "a very long description of a thing " * 9  # ~300 characters
    code, out, err = run_cli(capsys, image_dir / "a_rgb.png", "--labels", f"{long_label[:300]},猫,собака,🐱",
                             "--weights", weights, "--out", tmp_path / "odd", "--json", "--templates", "imagenet")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["labels"][1:4] == ["猫", "собака", "🐱"]
    assert Image.open(rec["overlay"]).size == (60, 40)


def test_huge_image_refused_with_limit_before_decoding(capsys, tmp_path, weights, image_dir):
    huge = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(huge, compress_level=1)  # 400 MP, 50 MB in memory
    code, out, err = run_cli(capsys, huge, image_dir / "f_tiny.png", "--labels", "cat,dog", "--weights", weights,
                             "--out", tmp_path, "--json")
    assert code == 1
    recs = [json.loads(line) for line in out.strip().splitlines()]
    # 400 MP is above Pillow's own limit too, which refuses it from the header (size only, not WxH)
    assert "400 MP, above the 100 MP limit" in recs[0]["error"] and "error" not in recs[1]


def test_no_images(capsys, tmp_path, weights):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_cli(capsys, empty, "--labels", "cat", "--weights", weights)
    assert code == 2 and "no images to segment" in err


def test_overlay_is_input_size_with_legend_and_background_untinted():
    img = Image.new("RGB", (120, 80), (100, 100, 100))
    lm = np.zeros((80, 120), np.uint8)
    lm[:, 60:] = 1
    lm[70:, :10] = 255
    ov = overlay(img, lm, ["cat", "background"], background_index=1)
    assert ov.size == (120, 80)
    arr = np.asarray(ov).astype(int)
    assert (arr[40, 100] == 100).all()  # background: untinted
    assert (arr[75, 5] == 100).all()  # unlabelled: untinted
    cat = palette(["cat", "background"])[0].astype(int)
    assert np.abs(arr[40, 40] - (0.45 * 100 + 0.55 * cat)).max() <= 1
    plain = overlay(img, lm, ["cat", "background"], background_index=1, legend=False)
    assert not np.array_equal(np.asarray(plain)[:20, :60], arr[:20, :60].astype(np.uint8))  # legend drawn
    assert overlay(Image.new("RGB", (1, 1)), np.zeros((1, 1), np.uint8), ["cat"]).size == (1, 1)
    png = io.BytesIO()
    ov.save(png, format="PNG")
    assert Image.open(png).size == (120, 80)
