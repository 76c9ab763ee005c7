"""The one label grammar (textseg.text) and the one template vocabulary (textseg.prompts), and that
segment, classify and eval read the same labels file into the same classes.

Expected classes are written out by hand from the grammar in textseg/text.py's docstring: on the
command line ``,`` between classes and ``;`` between synonyms; in a file one line per class, ``,`` or
``;`` between synonyms (SCLIP / NACLIP / ClearCLIP ``cls_*.txt``), ``name: prompt; prompt`` for a
display name.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from textseg.cli import main
from textseg.errors import TextsegError
from textseg.text import LabelClass, parse_labels, read_labels_file

FILE_TEXT = "# a comment\nperson, person in shirt\n\ntv: television; tv monitor\ndog; puppy\ncat\n"
FILE_CLASSES = [
    LabelClass("person", ("person", "person in shirt")),
    LabelClass("tv", ("television", "tv monitor")),
    LabelClass("dog", ("dog", "puppy")),
    LabelClass("cat", ("cat",)),
]


@pytest.fixture()
def labels_file(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text(FILE_TEXT, encoding="utf-8")
    return p


def test_command_line_form():
    assert parse_labels("cat, dog; puppy, grass") == [
        LabelClass("cat", ("cat",)), LabelClass("dog", ("dog", "puppy")), LabelClass("grass", ("grass",))]
    # a display name works on the command line too; the comma still ends the class
    assert parse_labels("tv: television; tv monitor, cat") == [
        LabelClass("tv", ("television", "tv monitor")), LabelClass("cat", ("cat",))]
    # on the command line a comma always separates classes: "person, person in shirt" is two
    assert parse_labels("person, person in shirt") == [
        LabelClass("person", ("person",)), LabelClass("person in shirt", ("person in shirt",))]


def test_file_form(labels_file):
    assert read_labels_file(labels_file) == FILE_CLASSES


def test_sequence_form():
    assert parse_labels(["person, person in shirt", "tv: television; tv monitor", ["dog", "puppy"],
                         LabelClass("cat", ("cat",))]) == FILE_CLASSES
    assert parse_labels(["name only:"]) == [LabelClass("name only", ("name only",))]


def test_grammar_errors(tmp_path):
    with pytest.raises(TextsegError, match="given twice"):
        parse_labels("cat, Cat; kitty")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(TextsegError, match="no classes"):
        read_labels_file(tmp_path / "empty.txt")


def test_shipped_class_files_keep_their_meaning():
    """Lines of the shipped files, parsed by hand: SCLIP's cls_voc21.txt background line and a
    display-name line."""
    from textseg.data.classnames import load_classes

    voc = load_classes("voc21", default="voc21")
    assert voc.names[0] == "background" and voc.prompts[0][:3] == ["sky", "wall", "tree"]
    assert voc.names[20] == "tvmonitor" and voc.prompts[20] == ["television monitor", "tv monitor", "monitor",
                                                                "television", "screen"]
    coco = load_classes("coco_object", default="coco_object")
    assert coco.prompts[1] == ["person", "person in shirt", "person in jeans", "person in dress",
                               "person in sweater", "person in skirt", "person in jacket", "body"]


def test_segment_classify_eval_read_one_file_alike(labels_file, tmp_path, capsys):
    from textseg.data.classnames import load_classes
    from textseg.examples import example_path

    names = [c.name for c in FILE_CLASSES]
    # eval --classes FILE
    cl = load_classes(str(labels_file), default="voc21")
    assert cl.names == names and cl.prompts == [list(c.synonyms) for c in FILE_CLASSES]
    # classify --labels-file FILE (offline model)
    img = str(example_path("coffee"))
    assert main(["classify", img, "--labels-file", str(labels_file), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["labels"] == names and len(row["probs"]) == 4
    # segment --labels-file FILE (no threshold: no background label is added)
    assert main(["segment", img, "--labels-file", str(labels_file), "--json", "--threshold", "none",
                 "--short-side", "64", "--out", str(tmp_path / "seg"), "--no-progress"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["labels"] == names


def test_classify_scores_the_max_over_synonyms():
    from textseg.preprocess import preprocess
    from textseg.weights.load import load_model
    from textseg.zeroshot import classify

    model = load_model()
    img = Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8))
    probs = classify(model, [img], "dog; puppy, cat", templates="{}")[0]
    # independent: per-synonym logits, max per class, softmax over the two classes
    with torch.no_grad():
        emb = model.embed_texts(["dog", "puppy", "cat"], ("{}",))
        lg = model.image_logits(model.encode_image(preprocess(img, model.preprocess_cfg)[None]), emb)[0].float()
    expect = torch.stack([torch.maximum(lg[0], lg[1]), lg[2]]).softmax(0)
    torch.testing.assert_close(probs, expect, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- templates
def test_template_vocabulary():
    import textseg.text
    from textseg.prompts import resolve_templates

    assert textseg.text.resolve_templates is resolve_templates  # one function
    imagenet = resolve_templates("imagenet")
    # OpenAI's notebook (Prompt_Engineering_for_ImageNet.ipynb): 80 templates, first and last
    assert len(imagenet) == 80 and imagenet[0] == "a bad photo of a {}." and imagenet[-1] == "a tattoo of the {}."
    assert resolve_templates("simple") == ("itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                                           "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                                           "a photo of the small {}.")
    assert resolve_templates("single") == ("a photo of a {}.",)
    assert resolve_templates("identity") == resolve_templates("none") == ("{}",)
    assert resolve_templates("a drawing of a {}.") == ("a drawing of a {}.",)
    assert resolve_templates(["a {}.", "the {}."]) == ("a {}.", "the {}.")
    for bad in (None, "imagenett", ["no slot"], ["{} and {}"], []):
        with pytest.raises(TextsegError):
            resolve_templates(bad)


@pytest.mark.parametrize("command", ["segment", "classify", "eval", "serve"])
def test_one_templates_flag(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "--templates" in out and "--template " not in out
