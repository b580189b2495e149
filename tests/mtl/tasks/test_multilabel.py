"""MultiLabelTask: head shapes, BCE and mean attribute accuracy by hand, logits in [0, 1], target checks."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import MultilabelAccuracy

from lightning_mtl.mtl.tasks.multilabel import MultiLabelTask


@pytest.mark.parametrize("shape", [(6,), (6, 1, 1), (2, 2, 2)])
def test_head_gives_one_logit_per_label(shape):
    task = MultiLabelTask(num_labels=40)
    task.build(shape)
    assert task(torch.randn(3, *shape)).shape == (3, 40)


@pytest.mark.parametrize("dtype", [torch.long, torch.float32, torch.bool])
def test_loss_by_hand(dtype):
    task = MultiLabelTask(num_labels=2)
    logits = torch.tensor([[0.0, math.log(3.0)]])  # sigmoid: 1/2, 3/4
    target = torch.tensor([[1, 0]]).to(dtype)
    expected = (-math.log(1 / 2) - math.log(1 - 3 / 4)) / 2  # = 1.5 ln 2
    torch.testing.assert_close(task.loss(logits, target), torch.tensor(expected))


def test_mean_attribute_accuracy_by_hand():
    acc = MultiLabelTask(num_labels=3).metrics()["acc"]
    logits = torch.tensor([[1.0, -1.0, 2.0], [-1.0, -2.0, 3.0]])
    target = torch.tensor([[1, 1, 0], [0, 0, 1]])
    acc.update(logits, target)
    # attribute 0: 2/2 right; attribute 1: 1/2 (first sample predicted absent); attribute 2: 1/2
    torch.testing.assert_close(acc.compute(), torch.tensor((1 + 0.5 + 0.5) / 3))


def test_logits_inside_unit_interval_are_still_logits():
    """Logits 0.2 and 0.9 mean probabilities > 0.5: present. (torchmetrics would read them as probabilities.)"""
    acc = MultiLabelTask(num_labels=2).metrics()["acc"]
    acc.update(torch.tensor([[0.2, 0.9]]), torch.tensor([[1, 1]]))
    torch.testing.assert_close(acc.compute(), torch.tensor(1.0))
    reference = MultilabelAccuracy(num_labels=2, average="macro")
    reference.update(torch.tensor([[0.2, 0.9]]), torch.tensor([[1, 1]]))
    assert reference.compute() == 0.5  # its per-batch logits-or-probabilities guess, which we avoid


def test_matches_torchmetrics_on_probabilities_and_accumulates():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 5, generator=gen)
    target = torch.randint(0, 2, (10, 5), generator=gen)
    split, whole = MultiLabelTask(num_labels=5).metrics()["acc"], MultiLabelTask(num_labels=5).metrics()["acc"]
    split.update(logits[:4], target[:4])
    split.update(logits[4:], target[4:])
    whole.update(logits, target)
    reference = MultilabelAccuracy(num_labels=5, average="macro", threshold=0.5)
    reference.update(logits.sigmoid(), target)
    torch.testing.assert_close(split.compute(), whole.compute())
    torch.testing.assert_close(split.compute(), reference.compute())


def test_directions():
    assert MultiLabelTask(num_labels=3).directions() == {"acc": True}


def test_check_target():
    task = MultiLabelTask(num_labels=3)
    task.check_target(torch.tensor([[0, 1, 1]]))
    task.check_target(torch.tensor([[0.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"expected \(B, 3\) 0/1 attributes, got a \(1, 2\)"):
        task.check_target(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="must be 0 or 1, got -1.*map CelebA's -1 to 0"):
        task.check_target(torch.tensor([[0, -1, 1]]))
    with pytest.raises(ValueError, match="got 0.5"):
        task.check_target(torch.tensor([[0.0, 0.5, 1.0]]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one label"):
        MultiLabelTask(num_labels=0)
