"""RegressionTask: head shapes, MSE / L1 by hand, no (B,) vs (B, 1) broadcasting, MAE and MSE, target checks."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl.mtl.tasks.regression import RegressionTask


@pytest.mark.parametrize("shape", [(5,), (5, 1, 1), (2, 3, 3)])
@pytest.mark.parametrize("out_features", [1, 3])
def test_head_shapes(shape, out_features):
    task = RegressionTask(out_features=out_features)
    task.build(shape)
    assert task(torch.randn(4, *shape)).shape == (4, out_features)


@pytest.mark.parametrize("target", [torch.tensor([0.0, 4.0]), torch.tensor([[0.0], [4.0]])])
def test_losses_by_hand(target):
    output = torch.tensor([[1.0], [2.0]])  # errors 1 and -2
    torch.testing.assert_close(RegressionTask(loss="mse").loss(output, target), torch.tensor((1 + 4) / 2))
    torch.testing.assert_close(RegressionTask(loss="l1").loss(output, target), torch.tensor((1 + 2) / 2))


def test_align_gives_a_single_output_the_target_shape():
    task = RegressionTask()
    output = torch.tensor([[1.0], [2.0]])
    assert task.align(output, torch.zeros(2)).shape == (2,)
    assert task.align(output, torch.zeros(2, 1)).shape == (2, 1)


def test_metrics_by_hand_over_two_updates():
    task = RegressionTask(out_features=2)
    metrics = task.metrics()
    batches = [(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])),  # errors 1, 2
               (torch.tensor([[3.0, 3.0], [0.0, 1.0]]), torch.tensor([[3.0, 0.0], [1.0, 1.0]]))]  # 0, 3, -1, 0
    for output, target in batches:
        for metric in metrics.values():
            metric.update(task.align(output, target), target)
    torch.testing.assert_close(metrics["mae"].compute(), torch.tensor((1 + 2 + 0 + 3 + 1 + 0) / 6))
    torch.testing.assert_close(metrics["mse"].compute(), torch.tensor((1 + 4 + 0 + 9 + 1 + 0) / 6))


def test_directions_mae_first():
    assert list(RegressionTask(loss="mse").directions().items()) == [("mae", False), ("mse", False)]


def test_check_target():
    task = RegressionTask()
    task.check_target(torch.zeros(3))
    task.check_target(torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"expected \(B, 1\) or \(B,\) float targets"):
        task.check_target(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \(B, 2\) float targets, got a \(3,\)"):
        RegressionTask(out_features=2).check_target(torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        task.check_target(torch.tensor([0.0, float("nan")]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one value"):
        RegressionTask(out_features=0)
    with pytest.raises(ValueError, match="'mse' or 'l1'"):
        RegressionTask(loss="huber")
