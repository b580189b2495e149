"""ClassificationTask: head shapes, cross-entropy and accuracy by hand, LibMTL's AccMetric, target checks."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lightning_mtl.mtl.tasks.classification import ClassificationTask


def _libmtl_metrics():
    # LibMTL 1.1.5 imports torchvision.models.utils, gone from current torchvision
    shim = types.ModuleType("torchvision.models.utils")
    shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    sys.modules.setdefault("torchvision.models.utils", shim)
    return pytest.importorskip("LibMTL.metrics")


@pytest.mark.parametrize("shape", [(5,), (5, 1, 1), (2, 3, 3)])
def test_head_reads_flattened_representation(shape):
    task = ClassificationTask(num_classes=4)
    task.build(shape)
    assert task(torch.randn(3, *shape)).shape == (3, 4)


def test_loss_by_hand():
    task = ClassificationTask(num_classes=2)
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0]])  # softmax: (1/4, 3/4), (2/3, 1/3)
    target = torch.tensor([1, 1])
    expected = (-math.log(3 / 4) - math.log(1 / 3)) / 2
    torch.testing.assert_close(task.loss(logits, target), torch.tensor(expected))


def test_label_smoothing_by_hand():
    eps = 0.2
    task = ClassificationTask(num_classes=2, label_smoothing=eps)
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4), label 1
    # smoothed target (eps/2, 1 - eps/2) = (0.1, 0.9)
    expected = -(0.1 * math.log(1 / 4) + 0.9 * math.log(3 / 4))
    torch.testing.assert_close(task.loss(logits, torch.tensor([1])), torch.tensor(expected))


def test_accuracy_by_hand_and_accumulated():
    task = ClassificationTask(num_classes=3)
    acc = task.metrics()["acc"]
    acc.update(torch.tensor([[3.0, 0, 0], [0, 2.0, 0]]), torch.tensor([0, 2]))  # 1 of 2 right
    acc.update(torch.tensor([[0, 0, 1.0], [0, 5.0, 1]]), torch.tensor([2, 1]))  # 2 of 2 right
    torch.testing.assert_close(acc.compute(), torch.tensor(3 / 4))


def test_accuracy_matches_libmtl_accmetric():
    lib = _libmtl_metrics()
    gen = torch.Generator().manual_seed(0)
    task, ref = ClassificationTask(num_classes=5), lib.AccMetric()
    acc = task.metrics()["acc"]
    for batch in (7, 3, 11):
        logits, target = torch.randn(batch, 5, generator=gen), torch.randint(0, 5, (batch,), generator=gen)
        acc.update(logits, target)
        ref.update_fun(logits, target)
    torch.testing.assert_close(acc.compute().double(), torch.tensor(ref.score_fun()[0], dtype=torch.float64))


def test_directions():
    assert ClassificationTask(num_classes=3).directions() == {"acc": True}


def test_check_target():
    task = ClassificationTask(num_classes=3)
    task.check_target(torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="integer class indices"):
        task.check_target(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        task.check_target(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="target 3 is out of the head's range 0..2"):
        task.check_target(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="target -1"):
        task.check_target(torch.tensor([-1, 1]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 classes"):
        ClassificationTask(num_classes=1)
    with pytest.raises(ValueError, match="label_smoothing"):
        ClassificationTask(num_classes=3, label_smoothing=1.0)


def test_loss_matches_functional():
    gen = torch.Generator().manual_seed(1)
    logits, target = torch.randn(6, 4, generator=gen), torch.randint(0, 4, (6,), generator=gen)
    torch.testing.assert_close(ClassificationTask(4).loss(logits, target), F.cross_entropy(logits, target))


def test_average_pooled_head_reads_the_mean_of_each_channel():
    task = ClassificationTask(3, pool="avg")
    task.build((4, 5, 6))
    linear = task.head[-1]
    assert linear.in_features == 4
    z = torch.randn(2, 4, 5, 6)
    assert torch.allclose(task(z), linear(z.mean(dim=(2, 3))), atol=1e-6)
    with pytest.raises(ValueError, match=r"pool='avg' averages a \(C, H, W\) feature map, got a \(8,\)"):
        ClassificationTask(3, pool="avg").build((8,))
    with pytest.raises(ValueError, match="pool must be 'flatten' or 'avg'"):
        ClassificationTask(3, pool="max")
