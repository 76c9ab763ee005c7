"""Evaluation loop, predictors, protocol presets, the `textseg eval` CLI and torchrun sharding."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textseg.cli import main as cli
from textseg.data.folder import FolderDataset
from textseg.errors import TextsegError
from textseg.evaluate import (
    PROTOCOLS,
    OraclePredictor,
    SegmenterPredictor,
    evaluate,
    format_table,
    get_protocol,
)

sys.path.insert(0, str(Path(__file__).parent))
from eval_worker import ColourModel, make_folder  # noqa: E402
from eval_worker import main as worker_main  # noqa: E402
from torchrun_util import run_torchrun  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_oracle_is_100_and_bad_images_are_reported(tmp_path):
    root = make_folder(tmp_path / "set", n=5)
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(root / "masks" / "im01.png")  # wrong size
    h, w = np.asarray(Image.open(root / "masks" / "im02.png")).shape
    Image.fromarray(np.full((h, w), 9, np.uint8)).save(root / "masks" / "im02.png")  # id 9 of 3
    (root / "masks" / "im03.png").unlink()
    ds = FolderDataset(root)
    res = evaluate(ds, OraclePredictor(), progress=False)
    rep = res.report()
    assert rep["miou"] == 100.0 and rep["pixel_accuracy"] == 100.0 and rep["images"] == 2
    assert [e["id"] for e in rep["errors"]] == ["im01", "im02", "im03"]
    assert "mask is 3x3 but image is" in rep["errors"][0]["error"]
    assert "class id 9 beyond the 3 classes" in rep["errors"][1]["error"]
    assert "is missing" in rep["errors"][2]["error"]
    with pytest.raises(TextsegError, match="im01: .*--strict"):
        evaluate(ds, OraclePredictor(), progress=False, strict=True)
    assert evaluate(ds, OraclePredictor(), progress=False, limit=1).images == 1


def test_segmenter_predictor_scores_the_colour_model(tmp_path):
    ds = FolderDataset(make_folder(tmp_path / "set", n=4))
    pred = SegmenterPredictor(ColourModel(), ds, short_side=None, templates="none")
    res = evaluate(ds, pred, progress=False, keep_worst=2)
    m = res.metrics()
    # the model sees colour through 8x8 cells: right in block interiors, wrong on some borders
    assert 0.6 < m.miou < 1.0 and 0.8 < m.pixel_accuracy < 1.0
    assert res.images == 4 and len(res.worst) == 2 and res.worst[0][0] <= res.worst[1][0]
    table = format_table(res)
    assert "mIoU" in table and table.index("red") > 0
    with pytest.raises(TextsegError, match="needs a 'background' class"):
        SegmenterPredictor(ColourModel(), ds, threshold=0.5)


def test_protocol_presets_are_complete_and_cited():
    benchmarks = {"voc", "voc20", "context", "context59", "coco-object", "coco-stuff", "ade", "cityscapes"}
    for method, table in PROTOCOLS.items():
        assert set(table) == benchmarks, method
        for name, p in table.items():
            # ClearCLIP's repository publishes numbers only for the five sets without background
            assert (p.reference is not None or method == "clearclip") and p.source and p.benchmark == name
            assert (p.threshold is not None) == (name in ("voc", "context", "coco-object"))
    p = get_protocol("naclip", "cityscapes")
    assert (p.short_side, p.crop, p.stride, p.pamr, p.reference) == (560, 224, 112, True, 38.27)
    with pytest.raises(TextsegError, match="unknown protocol"):
        get_protocol("maskclip2", "voc")
    with pytest.raises(TextsegError, match="borrow one with --protocol sclip:BENCHMARK"):
        get_protocol("sclip", "folder")
    assert get_protocol("sclip:voc", "folder").reference == 59.63


def test_protocol_sets_segmenter_config(tmp_path):
    root = make_folder(tmp_path / "set", n=1)
    ds = FolderDataset(root)
    ds.name = "ade"  # borrow the ADE preset (no background class)
    pred = SegmenterPredictor(ColourModel(), ds, protocol="sclip")
    cfg = pred.cfg
    assert (cfg.short_side, cfg.max_side, cfg.slide, cfg.threshold, cfg.pamr) == (336, 2048, (224, 112), None, False)
    assert cfg.temperature == pytest.approx(100.0 / 40.0)  # logit scale 40 on a model scaling by 100
    assert pred.config["protocol"]["reference"] == 16.45
    assert "has no 'sclip' dense mode" in pred.warnings[0]  # the colour model is no CLIP


def test_cli_eval_json_report_and_dump(tmp_path, capsys):
    root = make_folder(tmp_path / "set", n=3)
    (root / "splits").mkdir()
    (root / "splits" / "test.txt").write_text("im00\nim02\n")
    out = tmp_path / "r.json"
    code = cli(["eval", "--dataset", "folder", "--root", str(root), "--split", "test", "--model", "oracle",
                "--out", str(out), "--no-progress", "--dump-worst", "1", str(tmp_path / "worst")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "100.00" in printed
    rep = json.loads(out.read_text())
    assert rep["miou"] == 100.0 and rep["images"] == 2 and rep["errors"] == []
    assert set(rep["per_class_iou"]) == {"red", "green", "blue"}
    assert rep["config"]["versions"]["torch"] and rep["config"]["split"] == "test"
    dumped = sorted(p.name.split("_", 1)[1] for p in (tmp_path / "worst").iterdir())
    assert dumped == ["gt.png", "overlay.jpg", "pred.png"]
    # a bad root is a one-line error (exit 2), not a traceback
    assert cli(["eval", "--dataset", "voc", "--root", str(tmp_path / "nope"), "--model", "oracle"]) == 2
    assert "no VOC2012/JPEGImages" in capsys.readouterr().err


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str], timeout: float = 90) -> None:
    code, out = run_torchrun(cmd, env=_env(), timeout=timeout)
    assert code == 0, out[-3000:]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_torchrun_two_processes_equal_one_process_exactly(tmp_path):
    root = make_folder(tmp_path / "set", n=5)  # odd count: ranks get 3 and 2 images
    worker = str(Path(__file__).parent / "eval_worker.py")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    threads = torch.get_num_threads()
    try:
        worker_main(str(root), str(one))  # one process, here
    finally:
        torch.set_num_threads(threads)
    _run([*TORCHRUN, worker, str(root), str(two)])
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["matrix"] == b["matrix"] and sum(map(sum, a["matrix"])) > 0
    assert a["report"]["miou"] == b["report"]["miou"] and 0 < a["report"]["miou"] < 100
    assert b["report"]["images"] == 5 and b["report"]["config"]["world_size"] == 2
    assert a["report"]["worst"] == b["report"]["worst"]


def test_torchrun_cli_gathers_errors(tmp_path):
    root = make_folder(tmp_path / "set", n=4)
    (root / "masks" / "im01.png").unlink()
    out = tmp_path / "r.json"
    _run([*TORCHRUN, "-m", "textseg.cli", "eval", "--dataset", "folder", "--root", str(root), "--model", "oracle",
          "--no-progress", "--max-failed", "0.5", "--out", str(out)])  # 1 of 4 failing is tolerated here
    rep = json.loads(out.read_text())
    assert rep["images"] == 3 and [e["id"] for e in rep["errors"]] == ["im01"] and rep["miou"] == 100.0
    assert rep["config"]["world_size"] == 2


def test_cli_protocol_with_a_clip_checkpoint(tmp_path, capsys):
    """A (tiny, random) CLIP saved as native safetensors runs under the NACLIP VOC-20 preset: the
    preset's dense mode, geometry, logit scale and PAMR reach the Segmenter, the report records them."""
    from seg_tiny import save_tiny_clip

    save_tiny_clip(tmp_path / "tiny.safetensors")
    root = make_folder(tmp_path / "set", n=2)
    out = tmp_path / "r.json"
    code = cli(["eval", "--dataset", "folder", "--root", str(root), "--weights", str(tmp_path / "tiny.safetensors"),
                "--protocol", "naclip:voc20", "--short-side", "64", "--templates", "none", "--no-progress",
                "--out", str(out)])
    assert code == 0
    assert "warning" not in capsys.readouterr().err
    rep = json.loads(out.read_text())
    seg = rep["config"]["segment"]
    assert rep["images"] == 2 and 0 <= rep["miou"] <= 100 and rep["config"]["model"] == "clip"
    # NACLIP's cfg_voc20.py: slide_crop=0, the whole image in one pass; PAMR(10, (8, 16)) at the original size
    assert seg["mode"] == "naclip" and seg["slide"] is None and seg["pamr"] is True
    assert seg["pamr_dilations"] == [8, 16] and seg["pamr_resolution"] == "original"
    # logits = model scale x cosine / temperature = 40 x cosine, NACLIP's logit scale (this untrained
    # CLIP's own scale is 1 / 0.07, a trained one's 100)
    assert seg["short_side"] == 64 and seg["temperature"] == pytest.approx((1 / 0.07) / 40, rel=1e-4)
    assert rep["config"]["protocol"]["reference"] == 83.03
