"""Image-text data: caption folders (coco-mini JSONL, CSV), streamed tar shards split over ranks and
workers, the skip-and-count decoding-error policy; retrieval / zero-shot metrics by hand."""

from __future__ import annotations

import io
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from textseg.data.imagetext import (
    CaptionDataset,
    ImageTextCollate,
    TarShardDataset,
    expand_shards,
    read_captions,
    write_tar_shard,
)
from textseg.errors import TextsegError
from textseg.train.clip import retrieval_metrics, zeroshot_metrics


def _jpeg(color: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


def test_coco_mini_captions_and_splits(coco_mini):
    train = CaptionDataset(coco_mini, split="train2017", transform=_to_tensor, seed=0)
    val = CaptionDataset(coco_mini, split="val2017", transform=_to_tensor, seed=0)
    assert (len(train), len(val)) == (80, 79)
    assert not {r.key for r in train.records} & {r.key for r in val.records}
    assert all(len(r.captions) == 5 for r in train.records)
    texts, owner = val.texts()
    assert len(texts) == 5 * 79 and owner[:6] == [0, 0, 0, 0, 0, 1]
    sample = train[3]
    assert sample["image"].shape == (3, 8, 8) and sample["text"] in train.records[3].captions
    picks = [train.records[i].captions.index(train[i]["text"]) for i in range(20)]
    assert picks == [train.records[i].captions.index(train[i]["text"]) for i in range(20)]  # deterministic
    train.set_epoch(1)
    assert picks != [train.records[i].captions.index(train[i]["text"]) for i in range(20)]  # new epoch, new pick
    with pytest.raises(TextsegError, match="split 'test2017' not found"):
        CaptionDataset(coco_mini, split="test2017")


def test_csv_captions_and_bad_image_skipped(tmp_path):
    (tmp_path / "img").mkdir()
    for i, color in enumerate((10, 120, 240)):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg(color))
    (tmp_path / "img" / "1.jpg").write_bytes(b"\xff\xd8 broken jpeg")
    (tmp_path / "caps.csv").write_text(
        "filepath,title\nimg/0.jpg,dark square\nimg/1.jpg,grey square\nimg/2.jpg,white square\nimg/0.jpg,black box\n"
    )
    records = read_captions(tmp_path / "caps.csv")
    assert [(r.key, r.captions) for r in records][0] == ("0", ["dark square", "black box"])
    ds = CaptionDataset(tmp_path, "caps.csv", transform=_to_tensor, caption="first")
    with pytest.warns(UserWarning, match="skipping unreadable sample"):
        sample = ds[1]  # broken: replaced by the next readable image
    assert sample["key"] == "2" and ds.num_skipped == 1
    batch = ImageTextCollate(lambda texts: torch.tensor([len(t) for t in texts]))([ds[0], ds[2]])
    assert batch["image"].shape == (2, 3, 8, 8) and batch["text"].tolist() == [11, 12]
    (tmp_path / "bad.csv").write_text("name,caption\na.jpg,x\n")
    with pytest.raises(TextsegError, match="image column"):
        read_captions(tmp_path / "bad.csv")


@pytest.fixture()
def shards(tmp_path):
    good = {f"s{i:02d}": (_jpeg(20 * i), f"caption {i}") for i in range(11)}
    write_tar_shard(tmp_path / "sh-0.tar", [(k, *good[k]) for k in ("s00", "s01", "s02", "s03")])
    write_tar_shard(tmp_path / "sh-1.tar", [(k, *good[k]) for k in ("s04", "s05", "s06")]
                    + [("bad", b"not an image", "broken"), ("nocap", good["s00"][0], "")])
    full = write_tar_shard(tmp_path / "sh-2.tar", [(k, *good[k]) for k in ("s07", "s08", "s09", "s10")])
    with tarfile.open(full) as tar:
        cut = tar.getmember("s10.jpg").offset_data + 100
    full.write_bytes(full.read_bytes()[:cut])  # cut inside the last image: a truncated shard
    return tmp_path, {k for k in good if k not in ("s10",)}


def test_tar_shards_stream_and_skip_errors(shards):
    root, expected = shards
    ds = TarShardDataset(str(root / "sh-{0..2}.tar"), transform=_to_tensor, shuffle=False)
    with pytest.warns(UserWarning):
        samples = list(ds)
    keys = [s["key"] for s in samples]
    assert set(keys) == expected and len(keys) == len(expected)
    assert ds.num_skipped >= 3  # corrupt image, missing caption, truncated shard
    assert samples[0]["text"] == "caption 0" and samples[0]["image"].shape == (3, 8, 8)
    assert expand_shards(str(root / "sh-{0..1}.tar")) == [str(root / "sh-0.tar"), str(root / "sh-1.tar")]
    assert expand_shards(str(root / "sh-*.tar")) == expand_shards(str(root / "sh-{0..2}.tar"))


@pytest.mark.parametrize("total", [2, 4])  # 3 shards: split by shard (G=2) or by sample (G=4)
def test_tar_shards_partition_over_ranks_and_workers(shards, monkeypatch, total):
    root, expected = shards
    seen = []
    for g in range(total):
        ds = TarShardDataset(str(root / "sh-*.tar"), shuffle=True, shuffle_buffer=3, seed=5)
        ds.set_epoch(2)
        monkeypatch.setattr(ds, "_worker_slot", lambda g=g: (g, total))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the worker holding the broken shard warns
            seen.append([s["key"] for s in ds])
    flat = [k for part in seen for k in part]
    assert sorted(flat) == sorted(expected)  # every sample once, over all ranks x workers


def test_tar_shards_in_dataloader_workers(shards):
    root, expected = shards
    ds = TarShardDataset(str(root / "sh-*.tar"), transform=_to_tensor, shuffle=False)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=ImageTextCollate())
    keys = [k for batch in loader for k in batch["key"]]  # (warnings are raised inside the workers)
    assert sorted(keys) == sorted(expected)


def test_retrieval_metrics_by_hand():
    img = torch.eye(3)
    # captions 0,1 -> image 0; caption 2 -> image 1; caption 3 -> image 2
    txt = torch.tensor([[1.0, 0, 0], [0, 0.9, 0.1], [0, 1.0, 0], [0.8, 0, 0.2]])
    m = retrieval_metrics(img, txt, [0, 0, 1, 2], ks=(1, 2))
    # t2i: caption0 -> image0 rank 0; caption1 -> best image1 (wrong), image0 score 0 vs image2 0.1 -> rank 2;
    #      caption2 -> image1 rank 0; caption3 -> image0 0.8 beats image2 0.2 -> rank 1
    assert m["t2i_R@1"] == pytest.approx(50.0) and m["t2i_R@2"] == pytest.approx(75.0)
    # i2t: image0 best caption0 (own); image1 best caption2 (own); image2 scores [0, .1, 0, .2] -> caption3 (own)
    assert m["i2t_R@1"] == pytest.approx(100.0)
    z = zeroshot_metrics(torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[1, 0], [1, 1]]).bool())
    assert z["zeroshot_top1"] == pytest.approx(50.0) and z["zeroshot_top5"] == pytest.approx(100.0)
