"""The co-occurrence scene generator and the evaluator probe command."""

from __future__ import annotations

import json

import numpy as np

from textseg.data.cooccurrence import BACKGROUNDS, CLASSES, PAIRS, make_scenes, write_scene_folder


def test_scenes_pair_objects_with_their_background_and_name_both(tmp_path):
    scenes = make_scenes(200, size=64, seed=0)
    paired = total = bg_only = 0
    for sc in scenes:
        present = {CLASSES[k] for k in np.unique(sc.mask) if k}
        assert present == set(sc.labels)
        bgs = {BACKGROUNDS[m - 1] for m in np.unique(sc.context) if m}
        assert set(sc.captions[1].split(", ")) == set(sc.labels) | bgs  # every object and background named
        bg_only += not sc.labels and bool(bgs)
        for c in sc.labels:
            total += 1
            paired += PAIRS[c] in bgs
    assert 0.75 < paired / total < 0.95  # the pair appears together in most images of the class
    assert bg_only > 5  # backgrounds also appear alone
    a, b = make_scenes(3, 64, seed=5), make_scenes(3, 64, seed=5)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    root = write_scene_folder(scenes[:4], tmp_path / "s")
    assert len(json.loads((root / "labels.json").read_text())) == 4
    assert (root / "background_wrong.txt").read_text().splitlines()[0] == "boat: rails"
