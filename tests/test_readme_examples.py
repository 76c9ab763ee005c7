"""The README's Python examples that start with ``import textseg`` run as written (offline model,
shipped example photos)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
          if b.startswith("import textseg\n")]


def test_readme_has_top_level_examples():
    assert len(BLOCKS) >= 2  # segmentation and classification


@pytest.mark.parametrize("block", BLOCKS, ids=[f"example{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(block):
    scope: dict = {}
    exec(compile(block, str(README), "exec"), scope)  # noqa: S102 - our own README
    if "probs" in scope:
        probs = scope["probs"]
        assert probs.shape == (1, 2) and abs(float(probs.sum()) - 1) < 1e-5
    if "res" in scope:
        res = scope["res"]
        assert res.labels[:3] == ["cat", "wall", "floor"] and res.label_map.shape == res.size
        assert set(res.to_record()["labels"]) == set(res.labels)


def test_top_level_api_is_lazy():
    import subprocess
    import sys

    code = "import sys, textseg; assert 'torch' not in sys.modules; print(textseg.Segmenter.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Segmenter"


def test_every_top_level_name_resolves():
    import textseg
    from textseg.models.registry import MODELS
    from textseg.weights.load import load_model

    for name in textseg.__all__:
        assert getattr(textseg, name) is not None, name
    assert textseg.MODELS is MODELS and textseg.load_model is load_model
    assert {"clip", "groupvit", "lseg", "offline", "lit", "cam"} <= set(textseg.MODELS)
    with pytest.raises(AttributeError):
        _ = textseg.not_a_name
