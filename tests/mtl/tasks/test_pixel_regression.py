"""PixelRegressionTask: MAE and PSNR by hand, pooled over the split (not averaged over batches), losses, directions,
head shape and resizing, target checks."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mtl.mtl.tasks import PixelRegressionTask
from lightning_mtl.mtl.tasks.pixel_regression import PixelMAE, PixelPSNR

# batch 1: errors 1, 0, 2, 0 (abs sum 3, squared sum 5, 4 values)
PRED1, GT1 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), torch.tensor([[[[2.0, 2.0], [1.0, 4.0]]]])
# batch 2: errors 0, 8 (abs sum 8, squared sum 64, 2 values)
PRED2, GT2 = torch.tensor([[[[0.0, 10.0]]]]), torch.tensor([[[[0.0, 2.0]]]])


def _compute(task: PixelRegressionTask, batches) -> dict[str, torch.Tensor]:
    metrics = task.metrics()
    for pred, gt in batches:
        for metric in metrics.values():
            metric.update(pred, gt)
    return {name: metric.compute() for name, metric in metrics.items()}


@pytest.mark.parametrize("squeeze", [False, True])
def test_metrics_and_losses_by_hand(squeeze):
    gt = GT1.squeeze(1) if squeeze else GT1  # (B, H, W) targets for one channel too
    values = _compute(PixelRegressionTask(1), [(PRED1, gt)])
    torch.testing.assert_close(values["mae"], torch.tensor(3 / 4))
    torch.testing.assert_close(values["psnr"], torch.tensor(-10 * math.log10(5 / 4)))
    torch.testing.assert_close(PixelRegressionTask(1, "l1").loss(PRED1, gt), torch.tensor(3 / 4))
    torch.testing.assert_close(PixelRegressionTask(1, "l2").loss(PRED1, gt), torch.tensor(5 / 4))


def test_pooled_over_the_split_not_averaged_over_batches():
    values = _compute(PixelRegressionTask(1), [(PRED1, GT1), (PRED2, GT2)])
    torch.testing.assert_close(values["mae"], torch.tensor(11 / 6))
    torch.testing.assert_close(values["psnr"], torch.tensor(-10 * math.log10(69 / 6)))
    assert not math.isclose(float(values["mae"]), (3 / 4 + 8 / 2) / 2)  # the mean of the batch means


def test_data_range_and_three_channels():
    pred = torch.zeros(2, 3, 2, 2)
    gt = torch.full((2, 3, 2, 2), 51.0)  # every error 51 on a 0..255 scale
    values = _compute(PixelRegressionTask(3, data_range=255.0), [(pred, gt)])
    torch.testing.assert_close(values["mae"], torch.tensor(51.0))
    torch.testing.assert_close(values["psnr"], torch.tensor(20 * math.log10(255 / 51)))  # 13.98 dB
    assert math.isinf(float(_compute(PixelRegressionTask(3), [(gt, gt)])["psnr"]))  # a perfect prediction


def test_directions_and_metric_classes():
    task = PixelRegressionTask(2)
    assert task.directions() == {"mae": False, "psnr": True}  # MAE first: the main metric
    assert isinstance(task.metrics()["mae"], PixelMAE) and isinstance(task.metrics()["psnr"], PixelPSNR)


def test_head_and_resizing():
    task = PixelRegressionTask(3)
    task.build((8, 4, 4))
    out = task(torch.randn(2, 8, 4, 4))
    assert out.shape == (2, 3, 4, 4)
    assert task.align(out, torch.zeros(2, 3, 8, 8)).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="dense task"):
        PixelRegressionTask(1).build((16,))


def test_target_checks_and_settings():
    task = PixelRegressionTask(3)
    task.check_target(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) float targets"):
        task.check_target(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="float targets"):
        PixelRegressionTask(1).check_target(torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        PixelRegressionTask(1).check_target(torch.tensor([[[float("nan")]]]))
    with pytest.raises(ValueError, match="loss must be 'l1' or 'l2'"):
        PixelRegressionTask(1, "mse")
    with pytest.raises(ValueError, match="data_range"):
        PixelRegressionTask(1, data_range=0)
    with pytest.raises(ValueError, match="at least one channel"):
        PixelRegressionTask(0)
