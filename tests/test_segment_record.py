"""One per-image record (SegmentResult.to_record) for `textseg segment` and the web app, and the
Segmenter's input built by textseg.preprocess with unchanged numerics."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from seg_tiny import TinyColourModel

from textseg.cli import main
from textseg.segment import SegmentCfg, Segmenter
from textseg.viz import palette


def _image(h=48, w=64) -> np.ndarray:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    return arr


def test_to_record_fields():
    res = Segmenter(TinyColourModel(cell=8), SegmentCfg(threshold=0.0)).segment(_image(), "red, blue")
    rec = res.to_record()
    colours = palette(res.labels, res.background_index)
    assert rec["labels"] == res.labels == ["red", "blue"]
    assert rec["legend"] == [{"name": n, "index": i, "color": [int(c) for c in colours[i]], "fraction": res.fractions[n]}
                             for i, n in enumerate(res.labels)]
    assert rec["fractions"] == res.fractions and rec["fractions"]["red"] == pytest.approx(0.5, abs=0.05)
    assert (rec["width"], rec["height"]) == (64, 48) and rec["background_index"] is None and rec["dropped"] == []
    assert set(rec["timings"]) == set(res.timings)
    json.dumps(rec)  # JSON-ready


def test_web_app_returns_the_record():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from textseg.serve.app import create_app

    model = TinyColourModel(cell=8)
    buf = io.BytesIO()
    Image.fromarray(_image()).save(buf, format="PNG")
    with TestClient(create_app(model), base_url="http://127.0.0.1") as client:
        body = client.post("/v1/segment", data={"labels": "red, blue", "threshold": "0"},
                           files={"image": ("x.png", buf.getvalue(), "image/png")}).json()
    rec = Segmenter(model, SegmentCfg(threshold=0.0)).segment(buf.getvalue(), "red, blue").to_record()
    for key in rec:
        if key != "timings":
            assert body[key] == rec[key], key
    assert set(body["timings"]) == set(rec["timings"])


def test_cli_writes_the_record(tmp_path, capsys):
    from textseg.examples import example_path
    from textseg.weights.load import load_model

    img = str(example_path("coffee"))
    assert main(["segment", img, "--labels", "coffee cup; mug, table", "--short-side", "64", "--threshold", "none",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    detail = json.loads((tmp_path / "coffee.json").read_text())
    rec = Segmenter(load_model(), SegmentCfg(short_side=64, threshold=0.0)).segment(img, "coffee cup; mug, table")
    rec = rec.to_record()
    for key in rec:
        if key != "timings":
            assert detail[key] == rec[key], key
    assert {"image", "mask", "overlay", "seconds", "model", "mode"} <= set(detail)


@pytest.mark.parametrize("resolution, width", [("canvas", 64), ("pixel", 67)])
def test_segmenter_input_is_resized_and_normalised_as_before(resolution, width):
    """Independent transcription: PIL bicubic (reducing_gap 3) to the resized size (30 x 50, short
    side 40: on the canvas the sides are rounded to the 8-pixel cell, 40 x round(66.7 / 8) * 8 = 64;
    at pixel resolution mmcv's int(66.7 + 0.5) = 67), /255, (x - mean) / std."""
    rng = np.random.default_rng(1)
    arr = (rng.random((30, 50, 3)) * 255).astype(np.uint8)
    model = TinyColourModel(cell=8)
    seg = Segmenter(model, SegmentCfg(short_side=40, resolution=resolution))
    seg.set_image(arr)
    h, w = 40, width
    small = Image.fromarray(arr).resize((w, h), Image.BICUBIC, reducing_gap=3.0)
    x = torch.from_numpy(np.asarray(small, np.float32) / 255.0).permute(2, 0, 1)[None]
    pcfg = model.preprocess_cfg
    expect = (x - torch.tensor(pcfg.mean).view(1, 3, 1, 1)) / torch.tensor(pcfg.std).view(1, 3, 1, 1)
    assert tuple(seg._image_input.shape) == (1, 3, h, w)
    torch.testing.assert_close(seg._image_input, expect, rtol=0, atol=0)
