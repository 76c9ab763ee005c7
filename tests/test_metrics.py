"""ConfusionMatrix against hand-worked examples (every number below computed by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from textseg.errors import TextsegError
from textseg.metrics import ConfusionMatrix


def test_hand_worked_with_ignore_pixels():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 1, 0]])  # the prediction under the ignore pixel must not count
    cm = ConfusionMatrix(3).update(pred, target)
    assert cm.mat.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    m = cm.compute()
    # TP = [1, 2, 0]; GT = [2, 2, 1]; PRED = [1, 4, 0]; union = [2, 4, 1]
    assert m.iou == pytest.approx([0.5, 0.5, 0.0])
    assert m.miou == pytest.approx(1 / 3)
    assert m.pixel_accuracy == pytest.approx(3 / 5)
    assert m.mean_accuracy == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m.fw_iou == pytest.approx(2 / 5 * 0.5 + 2 / 5 * 0.5 + 1 / 5 * 0.0)
    assert m.gt_pixels == [2, 2, 1] and m.pred_pixels == [1, 4, 0]


def test_absent_class_and_class_only_in_predictions():
    target = np.array([0, 0, 1, 1], dtype=np.uint8)
    pred = np.array([0, 2, 1, 1], dtype=np.uint8)  # class 2 only predicted, class 3 nowhere
    cm = ConfusionMatrix(4).update(pred, target)
    union = cm.compute()  # default: classes in GT or predictions
    assert union.iou[:3] == pytest.approx([0.5, 1.0, 0.0]) and math.isnan(union.iou[3])
    assert union.miou == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    gt = cm.compute(average="gt")  # classes in GT only: the predicted-only class 2 is not averaged
    assert gt.miou == pytest.approx((0.5 + 1.0) / 2)
    assert union.pixel_accuracy == pytest.approx(3 / 4)
    assert union.mean_accuracy == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert union.fw_iou == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    d = union.to_dict(["bg", "a", "b", "c"])
    assert d["per_class_iou"] == {"bg": 50.0, "a": 100.0, "b": 0.0, "c": None}
    assert d["miou"] == pytest.approx(50.0)


def test_empty_images_change_nothing_and_empty_matrix_is_nan():
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long))
    cm.update(torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), 255))  # all ignore
    assert int(cm.mat.sum()) == 0
    m = cm.compute()
    assert all(math.isnan(v) for v in m.iou)
    assert math.isnan(m.miou) and math.isnan(m.pixel_accuracy) and math.isnan(m.fw_iou)
    assert m.to_dict()["miou"] is None
    # an empty image between two real ones leaves the total exactly as without it
    a = ConfusionMatrix(3).update(torch.tensor([0, 1]), torch.tensor([0, 2]))
    a.update(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert a.mat.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]


def test_perfect_prediction_is_one():
    target = torch.randint(0, 5, (2, 7, 9))
    target[0, :2] = 255
    m = ConfusionMatrix(5).update(target.clamp(max=4), target).compute()
    assert m.miou == 1.0 and m.pixel_accuracy == 1.0 and m.fw_iou == pytest.approx(1.0)


def test_matches_reference_and_merges_exactly():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (3, 20, 30), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred = torch.randint(0, 6, (3, 20, 30), generator=g)
    ref = np.zeros((6, 6), dtype=np.int64)
    t, p = target.numpy().ravel(), pred.numpy().ravel()
    np.add.at(ref, (t[t != 255], p[t != 255]), 1)
    whole = ConfusionMatrix(6).update(pred, target)
    assert whole.mat.numpy().tolist() == ref.tolist()
    parts = [ConfusionMatrix(6).update(pred[i], target[i]) for i in range(3)]
    merged = parts[0].merge(parts[1]).merge(parts[2].mat)
    assert torch.equal(merged.mat, whole.mat)
    assert whole.all_reduce() is whole  # no process group: a no-op


def test_bad_inputs_raise_clear_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(TextsegError, match="class id 7"):
        cm.update(torch.tensor([0]), torch.tensor([7]))
    with pytest.raises(TextsegError, match="prediction holds class id 3"):
        cm.update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(TextsegError, match="differs"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError):
        cm.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        cm.compute(average="mean")
    with pytest.raises(ValueError):
        cm.merge(ConfusionMatrix(4))
    assert int(cm.mat.sum()) == 0  # failed updates added nothing
