"""DepthTask: abs / rel errors and the L1 loss by hand on valid pixels, pooling over batches (LibMTL's weighting,
not MTAN's), head shape, resizing, target checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_mtl.mtl.tasks.depth import DepthTask

# batch 1: three valid pixels, errors |1-2|, |3-1|, |4-4| = 1, 2, 0 (the pixel with target 0 is invalid)
PRED1, GT1 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), torch.tensor([[[[2.0, 0.0], [1.0, 4.0]]]])
# batch 2: one valid pixel, error |10-2| = 8
PRED2, GT2 = torch.tensor([[[[0.0, 0.0], [0.0, 10.0]]]]), torch.tensor([[[[0.0, 0.0], [0.0, 2.0]]]])


def _compute(batches):
    metrics = DepthTask().metrics()
    for pred, gt in batches:
        for metric in metrics.values():
            metric.update(pred, gt)
    return {name: metric.compute() for name, metric in metrics.items()}


@pytest.mark.parametrize("squeeze", [False, True])
def test_errors_and_loss_by_hand(squeeze):
    gt = GT1.squeeze(1) if squeeze else GT1  # (B, H, W) targets too
    values = _compute([(PRED1, gt)])
    torch.testing.assert_close(values["abs_err"], torch.tensor((1 + 2 + 0) / 3))
    torch.testing.assert_close(values["rel_err"], torch.tensor((1 / 2 + 2 / 1 + 0 / 4) / 3))
    torch.testing.assert_close(DepthTask().loss(PRED1, gt), torch.tensor(1.0))


def test_pooled_over_valid_pixels_not_averaged_over_batches():
    values = _compute([(PRED1, GT1), (PRED2, GT2)])
    torch.testing.assert_close(values["abs_err"], torch.tensor((1 + 2 + 0 + 8) / 4))
    torch.testing.assert_close(values["rel_err"], torch.tensor((1 / 2 + 2 + 0 + 8 / 2) / 4))
    means, counts = [], []
    for pred, gt in ((PRED1, GT1), (PRED2, GT2)):
        valid = gt != 0
        means.append((pred - gt).abs()[valid].mean().item())
        counts.append(int(valid.sum()))
    # LibMTL's DepthMetric: batch means weighted by their numbers of valid pixels -- the same value
    libmtl = sum(m * n for m, n in zip(means, counts, strict=True)) / sum(counts)
    assert values["abs_err"].item() == pytest.approx(libmtl)
    # MTAN's depth_error: batch means (1 and 8) averaged with equal weights -- a different value
    assert values["abs_err"].item() != pytest.approx(sum(means) / len(means))


def test_two_updates_equal_one_on_the_concatenation():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(5, 1, 4, 3, generator=gen) + 0.1
    gt = torch.rand(5, 1, 4, 3, generator=gen) * (torch.rand(5, 1, 4, 3, generator=gen) > 0.3)
    split, whole = _compute([(pred[:2], gt[:2]), (pred[2:], gt[2:])]), _compute([(pred, gt)])
    for name in whole:
        torch.testing.assert_close(split[name], whole[name])
    valid = gt != 0
    torch.testing.assert_close(whole["abs_err"], (pred - gt).abs()[valid].mean())
    torch.testing.assert_close(whole["rel_err"], ((pred - gt).abs() / gt)[valid].mean())


def test_loss_is_l1_on_valid_pixels_only():
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 1, 3, 3, generator=gen, requires_grad=True)
    gt = torch.rand(2, 1, 3, 3, generator=gen) * (torch.rand(2, 1, 3, 3, generator=gen) > 0.5)
    valid = gt != 0
    loss = DepthTask().loss(pred, gt)
    torch.testing.assert_close(loss, F.l1_loss(pred[valid], gt[valid]))
    loss.backward()
    assert torch.equal(pred.grad[~valid], torch.zeros(int((~valid).sum())))


def test_a_batch_without_valid_pixel_has_zero_loss():
    assert DepthTask().loss(torch.randn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == 0


def test_head_and_align():
    task = DepthTask()
    task.build((4, 3, 3))
    output = task(torch.randn(2, 4, 3, 3))
    assert output.shape == (2, 1, 3, 3)
    assert task.align(output, torch.zeros(2, 6, 6)).shape == (2, 1, 6, 6)
    assert task.align(output, torch.zeros(2, 1, 5, 4)).shape == (2, 1, 5, 4)
    with pytest.raises(ValueError, match=r"needs a \(C, H, W\) representation"):
        DepthTask().build((16,))


def test_directions():
    assert DepthTask().directions() == {"abs_err": False, "rel_err": False}


def test_check_target():
    task = DepthTask()
    task.check_target(GT1)
    task.check_target(GT1.squeeze(1))
    with pytest.raises(ValueError, match=r"expected \(B, 1, H, W\) or \(B, H, W\) float depths, got a \(1, 2, 2, 2\)"):
        task.check_target(torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="float depths"):
        task.check_target(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="must be >= 0"):
        task.check_target(-GT1)
    with pytest.raises(ValueError, match="with 0, not NaN"):
        task.check_target(torch.full((1, 2, 2), float("nan")))


def test_metric_collection_gives_each_metric_its_value():
    """MetricCollection shares the state of metrics whose states are equal after the first update (here a perfect
    first batch): abs and rel errors keep both sums, so sharing is harmless."""
    from torchmetrics import MetricCollection

    batches = [(GT1, GT1), (PRED1, GT1), (PRED2, GT2)]
    collection = MetricCollection(DepthTask().metrics())
    for pred, gt in batches:
        collection.update(pred, gt)
    together = collection.compute()
    for name, value in _compute(batches).items():
        torch.testing.assert_close(together[name], value)
    torch.testing.assert_close(together["abs_err"], torch.tensor((1 + 2 + 0 + 8) / 7))
