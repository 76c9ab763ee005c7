"""The pipeline (textseg.pipeline): background preparation in order and bounded, batched tower passes
equal to one image at a time, background writes whose failures surface as one clear error; and
`textseg segment` / `evaluate` giving the same outputs with and without prefetch and batching."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textseg.cli import main as cli
from textseg.data.folder import FolderDataset
from textseg.errors import TextsegError
from textseg.evaluate import SegmenterPredictor, evaluate
from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from textseg.pipeline import BackgroundWriter, Batcher, batch_or_each, chunks, prefetch
from textseg.segment import SegmentCfg, Segmenter

sys.path.insert(0, str(Path(__file__).parent))
from eval_worker import ColourModel, make_folder  # noqa: E402
from seg_tiny import save_tiny_clip  # noqa: E402


# ------------------------------------------------------------------------------------------------ prefetch
@pytest.mark.parametrize("workers", [0, 1, 3])
def test_prefetch_keeps_order_and_returns_item_errors(workers):
    def prepare(i):
        time.sleep(0.002 * ((7 * i) % 5))  # out-of-order completion in the pool
        if i == 4:
            raise TextsegError("item 4 is bad")
        return i * i

    got = list(prefetch(range(10), prepare, workers=workers, depth=3))
    assert [g[0] for g in got] == list(range(10))
    assert [g[1] for g in got] == [i * i if i != 4 else None for i in range(10)]
    assert [str(g[2]) if g[2] else None for g in got] == [None] * 4 + ["item 4 is bad"] + [None] * 5


def test_prefetch_propagates_bugs():
    def prepare(i):
        if i == 2:
            raise ZeroDivisionError("bug")
        return i

    with pytest.raises(ZeroDivisionError):
        list(prefetch(range(5), prepare, workers=2, depth=2))


@pytest.mark.parametrize("workers,depth", [(1, 2), (2, 3), (0, 5)])
def test_prefetch_takes_at_most_depth_items_ahead(workers, depth):
    taken = []

    def source():
        for i in range(20):
            taken.append(i)
            yield i

    consumed = 0
    for item, value, _ in prefetch(source(), lambda i: i, workers=workers, depth=depth):
        consumed += 1
        time.sleep(0.003)  # a slow consumer: the workers would run ahead if nothing bounded them
        assert len(taken) <= consumed + (depth if workers else 0), (len(taken), consumed)
        assert value == item
    assert consumed == 20


def test_chunks():
    assert list(chunks(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunks([], 2)) == []


# ------------------------------------------------------------------------------------------------ writer
@pytest.mark.parametrize("workers", [0, 1])
def test_writer_runs_in_order_and_surfaces_the_first_error_once(tmp_path, workers):
    done = []

    def job(k):
        if k == 3:
            raise TextsegError(f"{tmp_path}/x: is a directory, cannot write a file there")
        done.append(k)

    w = BackgroundWriter(max_pending=2, workers=workers)
    with pytest.raises(TextsegError) as info:
        for k in range(8):
            w.submit(job, k, what=f"image {k}")
        w.close()
    msg = str(info.value)
    assert msg.startswith("writing image 3 failed: ") and "is a directory" in msg and "\n" not in msg
    assert done == [0, 1, 2]  # nothing after the failure is written
    if workers:
        assert threading.current_thread().name != "textseg-writer"


def test_writer_wraps_os_errors_and_bounds_its_queue():
    gate = threading.Event()
    started = threading.Event()

    def slow():
        started.set()
        gate.wait(5)

    w = BackgroundWriter(max_pending=1)
    w.submit(slow)
    started.wait(5)
    w.submit(lambda: None)  # fills the one queue slot
    blocked = threading.Thread(target=w.submit, args=(lambda: None,))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # a full queue blocks the producer: memory stays bounded
    gate.set()
    blocked.join(5)
    assert not blocked.is_alive()

    def disk_full():
        raise OSError(28, "No space left on device")

    w.submit(disk_full, what="out/a_mask.png")
    with pytest.raises(TextsegError, match=r"^writing out/a_mask.png failed: No space left on device$"):
        w.close()


# ------------------------------------------------------------------------------------------------ batching
def tiny_clip():
    torch.manual_seed(0)
    return CLIP(CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=2, width=32, patch_size=8, heads=2),
                           text=TextConfig(context_length=16, width=32, heads=2, layers=1))).eval()


@pytest.mark.parametrize("resolution,slide,flip", [("pixel", None, False), ("canvas", None, True),
                                                    ("pixel", (32, 16), False)])
def test_segment_batch_equals_one_image_at_a_time(resolution, slide, flip):
    rng = np.random.default_rng(0)
    images = [(rng.random(shape) * 255).astype(np.uint8) for shape in
              [(40, 56, 3), (40, 56, 3), (48, 48, 3), (40, 56, 3), (30, 70, 3)]]
    cfg = SegmentCfg(short_side=40, resolution=resolution, slide=slide, flip=flip, templates="none",
                     threshold=0.3, batch_size=3)
    seg = Segmenter(tiny_clip(), cfg)
    labels = "cat, dog; puppy, grass, sky"
    single = [seg.segment(im, labels) for im in images]
    batched = seg.segment_batch([seg.prepare(im) for im in images], labels)
    for a, b in zip(single, batched):
        assert a.labels == b.labels
        np.testing.assert_array_equal(a.label_map, b.label_map)
        torch.testing.assert_close(a.logits_lowres, b.logits_lowres, atol=1e-5, rtol=1e-5)


def test_encode_prepared_shares_forward_passes_between_same_size_images():
    seen = []

    class Counting(ColourModel):
        def encode_dense(self, pixels, mode=None):
            seen.append(pixels.shape[0])
            return super().encode_dense(pixels, mode)

    seg = Segmenter(Counting(), SegmentCfg(short_side=None, templates="none", threshold=None, batch_size=4))
    imgs = [np.zeros((32, 40, 3), np.uint8)] * 3 + [np.zeros((24, 24, 3), np.uint8)]
    seg.segment_batch(imgs, "red, green")
    assert sorted(seen) == [1, 3]  # the three 32 x 40 images in one pass, the other alone
    seen.clear()
    for im in imgs:
        seg.segment(im, "red, green")
    assert seen == [1, 1, 1, 1]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_tiny_clip(path)
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    for k, shape in enumerate([(40, 56), (40, 56), (33, 20), (40, 56), (60, 30), (40, 56)]):
        Image.fromarray((rng.random((*shape, 3)) * 255).astype(np.uint8)).save(d / f"im{k}.png")
    (d / "im3b_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" + bytes(50))
    return d


def run_segment(capsys, out, weights, images, *extra):
    code = cli(["segment", str(images), "--weights", weights, "--labels", "cat, dog, grass", "--short-side", "40",
                "--templates", "none", "--out", str(out), "--json", "--no-progress", *map(str, extra)])
    got, err = capsys.readouterr()
    return code, [json.loads(x) for x in got.splitlines()], err


def test_segment_folder_same_outputs_with_and_without_prefetch_and_batching(capsys, tmp_path, clip_weights, folder):
    code0, lines0, _ = run_segment(capsys, tmp_path / "a", clip_weights, folder, "--decode-workers", "0",
                                   "--batch-images", "1")
    code1, lines1, _ = run_segment(capsys, tmp_path / "b", clip_weights, folder, "--decode-workers", "2",
                                   "--prefetch", "2", "--batch-images", "3")
    assert code0 == code1 == 1  # the corrupt file, reported in its place
    assert [x["image"] for x in lines0] == [x["image"] for x in lines1] == sorted(str(p) for p in folder.iterdir())
    bad = [k for k, x in enumerate(lines1) if "error" in x]
    assert bad == [4] and "cannot read image" in lines1[4]["error"] and "error" in lines0[4]  # in its place
    for a, b in zip(lines0[:4] + lines0[5:], lines1[:4] + lines1[5:]):
        assert a["labels"] == b["labels"] and a["fractions"] == b["fractions"]
        ma, mb = Path(a["mask"]), Path(b["mask"])
        np.testing.assert_array_equal(np.asarray(Image.open(ma)), np.asarray(Image.open(mb)))
        assert Image.open(Path(a["overlay"])).tobytes() == Image.open(Path(b["overlay"])).tobytes()
        ja, jb = json.loads((ma.parent / f"{ma.stem[:-5]}.json").read_text()), json.loads(
            (mb.parent / f"{mb.stem[:-5]}.json").read_text())
        assert ja["legend"] == jb["legend"]
    assert not list((tmp_path / "b").glob(".*.tmp"))  # atomic writes left no temporaries


def test_segment_writer_error_is_one_clear_line(capsys, tmp_path, clip_weights, folder):
    out = tmp_path / "out"
    (out / "im1_mask.png").mkdir(parents=True)  # the second image's mask cannot be written
    code, lines, err = run_segment(capsys, out, clip_weights, folder)
    assert code == 2
    errors = [x for x in err.splitlines() if "error" in x]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("textseg segment: error: writing the outputs of ") and "im1.png failed: " in errors[0]
    assert "is a directory" in errors[0]
    assert [Path(x["image"]).name for x in lines] == ["im0.png"]  # written before the failure, nothing after


def test_evaluate_same_numbers_with_and_without_the_pipeline(tmp_path):
    root = make_folder(tmp_path / "set", n=7)
    (root / "masks" / "im03.png").unlink()  # an error in the middle keeps its place
    ds = FolderDataset(root)
    pred = SegmenterPredictor(ColourModel(), ds, short_side=48, templates="none", slide=(24, 16))
    plain = evaluate(ds, pred, progress=False, keep_worst=3, workers=0, batch=1)
    piped = evaluate(ds, pred, progress=False, keep_worst=3, workers=2, prefetch_depth=2, batch=3)
    assert torch.equal(plain.confusion.mat, piped.confusion.mat)
    assert plain.images == piped.images == 6 and plain.errors == piped.errors
    assert [e["id"] for e in piped.errors] == ["im03"] and plain.worst == piped.worst
    assert piped.config["pipeline"] == {"decode_workers": 2, "prefetch": 2, "batch_images": 3}  # in the report


class _SplitPredictor:
    """A predictor whose tower (``encode_batch``) and scoring (``finish``) record their threads; the
    "tower" is the image itself, the label map its mask (one image's finish fails)."""

    def __init__(self):
        self.tower_threads, self.finish_threads, self.order = set(), set(), []

    def encode_batch(self, prepared):
        self.tower_threads.add(threading.current_thread().name)
        return [p for p in prepared]

    def finish(self, sample, prepared, encoded):
        self.finish_threads.add(threading.current_thread().name)
        self.order.append(sample["id"])
        if sample["id"] == "im02":
            raise TextsegError("no labels scored")
        return sample["mask"].copy()

    def prepare(self, sample):
        return sample["id"]


@pytest.mark.parametrize("workers", [0, 1])
def test_evaluate_scores_in_a_finisher_thread_behind_the_tower(tmp_path, workers):
    ds = FolderDataset(make_folder(tmp_path / "set", n=6))
    pred = _SplitPredictor()
    res = evaluate(ds, pred, progress=False, workers=workers, batch=2)
    assert res.images == 5 and [e["id"] for e in res.errors] == ["im02"] and "no labels scored" in res.errors[0]["error"]
    assert res.metrics().miou == 1.0 and pred.order == [f"im{i:02d}" for i in range(6)]  # in order
    if workers:  # the tower in this thread, the scoring in one other thread
        assert pred.tower_threads == {threading.current_thread().name} and len(pred.finish_threads) == 1
        assert pred.finish_threads != pred.tower_threads
    else:
        assert pred.tower_threads == pred.finish_threads == {threading.current_thread().name}


# ------------------------------------------------------------------------------------------------ batcher
def test_batcher_gathers_concurrent_calls_and_isolates_a_bad_item():
    calls = []

    def fn(key, items):
        calls.append((key, list(items)))
        if 5 in items:
            raise TextsegError("item 5 is bad")
        return [f"{key}:{2 * i}" for i in items]

    b = Batcher(fn, max_batch=4, max_wait_s=2.0)  # a long wait: all 8 arrive before any batch closes
    start = threading.Barrier(8)
    got: dict = {}

    def caller(i):
        start.wait()
        try:
            got[i] = b.submit("k" if i % 2 else "j", i)
        except TextsegError as e:
            got[i] = e

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    b.close()
    assert {i: v for i, v in got.items() if i != 5} == {i: f"{'k' if i % 2 else 'j'}:{2 * i}" for i in range(8)
                                                        if i != 5}
    assert isinstance(got[5], TextsegError) and str(got[5]) == "item 5 is bad"
    batched = [items for _, items in calls if len(items) > 1]
    assert batched and all(len(items) <= 4 for _, items in calls)  # gathered, never past max_batch
    assert all(len({i % 2 for i in items}) == 1 for _, items in calls)  # one key per call
    lone = Batcher(lambda key, items: [i + 1 for i in items], max_batch=8, max_wait_s=0.01)
    assert lone.submit(None, 1) == 2  # a lone call does not wait for a full batch
    lone.close()


def test_server_batches_concurrent_uploads_with_results_equal_to_unbatched():
    from seg_tiny import TinyColourModel

    from textseg.serve.app import SegmentService, ServeSettings, _Image
    from textseg.text import parse_labels

    rng = np.random.default_rng(3)
    uploads = []
    for shape in [(48, 64), (48, 64), (40, 40), (48, 64), (48, 64), (40, 40)]:
        buf = __import__("io").BytesIO()
        Image.fromarray((rng.random((*shape, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
        uploads.append(buf.getvalue())
    labels = parse_labels("red, blue; navy, green")

    def serve(batch):
        model = TinyColourModel(cell=8)
        service = SegmentService(model, ServeSettings(batch=batch, batch_wait_s=1.0))
        out: dict = {}
        start = threading.Barrier(len(uploads))

        def request(k):
            start.wait()
            out[k] = service.segment(_Image(uploads[k]), f"id{k}", labels, None, None, True, False)

        threads = [threading.Thread(target=request, args=(k,)) for k in range(len(uploads))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return service, model, out

    plain_service, plain_model, plain = serve(0)
    service, model, batched = serve(6)
    assert plain_service.batcher is None and SegmentService(TinyColourModel(), ServeSettings()).batch == 0  # CPU
    assert max(service.batcher.batches) > 1 and model.dense_calls < plain_model.dense_calls == len(uploads)
    for k in range(len(uploads)):
        a, b = plain[k], batched[k]
        assert a["labels"] == b["labels"] and a["fractions"] == b["fractions"] and a["mask_png"] == b["mask_png"]


def test_batch_or_each_finds_the_item_at_fault():
    calls = []

    def fn(items):
        calls.append(list(items))
        if "bad" in items:
            raise TextsegError("bad item")
        return [s.upper() for s in items]

    assert batch_or_each(fn, ["a", "b"]) == ["A", "B"] and calls == [["a", "b"]]
    calls.clear()
    out = batch_or_each(fn, ["a", "bad", "c"])
    assert out[0] == "A" and isinstance(out[1], TextsegError) and str(out[1]) == "bad item" and out[2] == "C"
    assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]
    calls.clear()
    assert isinstance(batch_or_each(fn, ["bad"])[0], TextsegError) and calls == [["bad"]]  # one item: one call
    assert batch_or_each(fn, []) == []


def test_prepare_makes_the_pamr_image_only_for_canvas_pamr_and_late_pamr_still_works(tmp_path):
    """prepare() skips PAMR's downsampled canvas image when PAMR is off (or runs at the original size);
    turning canvas PAMR on after the image was set rebuilds it from the cached input: same result."""
    img = np.asarray(Image.open(make_folder(tmp_path / "set", n=1) / "images" / "im00.png").convert("RGB"))
    kw = dict(short_side=48, templates="none", pamr_resolution="canvas")
    plain, refined = Segmenter(ColourModel(), SegmentCfg(**kw)), Segmenter(ColourModel(), SegmentCfg(**kw, pamr=True))
    assert plain.prepare(img).image_small is None
    assert Segmenter(ColourModel(), SegmentCfg(short_side=48, pamr=True)).prepare(img).image_small is None  # original
    ref = refined.prepare(img).image_small
    assert ref is not None and ref.shape[-2:] == (12, ref.shape[-1])
    labels = "red, green, blue"
    plain.set_image(img)
    plain.cfg.pamr = True  # switched on after set_image
    late = plain.predict(labels)
    refined.set_image(img)
    torch.testing.assert_close(plain._image_small, ref, atol=1e-6, rtol=0)
    assert (late.label_map == refined.predict(labels).label_map).mean() > 0.999
