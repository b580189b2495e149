"""NormalTask: angles of known vectors by hand, invalid pixels, mean / median / thresholds over the split, the cosine
loss, unit outputs, resizing, LibMTL's NormalMetric definition on random normals, target checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_mtl.mtl.tasks.normals import AngleWithin, NormalTask, angular_error


def _deg(angle: float) -> list[float]:
    return [math.cos(math.radians(angle)), math.sin(math.radians(angle)), 0.0]


def _image(vectors: list[list[float]]) -> torch.Tensor:
    """Six 3-vectors as a (1, 3, 2, 3) image."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 3, 2, 3)


# targets all (1, 0, 0) but the last pixel (invalid); predictions at 0, 10, 20, 45 and 90 degrees, any length
GT = _image([[1, 0, 0]] * 5 + [[0, 0, 0]])
PRED = _image([[2, 0, 0], [1, math.tan(math.radians(10)), 0], _deg(20), [1, 1, 0], [0, 3, 0], [0, 1, 0]])


def _compute(batches):
    metrics = NormalTask().metrics()
    for pred, gt in batches:
        for metric in metrics.values():
            metric.update(pred, gt)
    return {name: metric.compute().item() for name, metric in metrics.items()}


def test_angles_of_known_vectors():
    angles = angular_error(PRED, GT).flatten()[:5]
    torch.testing.assert_close(angles, torch.tensor([0.0, 10.0, 20.0, 45.0, 90.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(angular_error(_image([[0, 0, 1]] * 6), _image([[0, 0, -1]] * 6)), torch.full(
        (1, 2, 3), 180.0))


def test_metrics_by_hand_with_an_invalid_pixel():
    values = _compute([(PRED, GT)])  # valid angles 0, 10, 20, 45, 90
    assert values["mean_angle"] == pytest.approx(165 / 5, abs=1e-4)
    assert values["median_angle"] == pytest.approx(20, abs=1e-4)
    assert values["within_11_25"] == pytest.approx(2 / 5)
    assert values["within_22_5"] == pytest.approx(3 / 5)
    assert values["within_30"] == pytest.approx(3 / 5)


def test_accumulated_over_the_split_even_median_averages_the_middle_pair():
    second = (_image([_deg(60)] + [[1, 0, 0]] * 5), _image([[1, 0, 0]] + [[0, 0, 0]] * 5))  # one valid: 60 degrees
    values = _compute([(PRED, GT), second])  # angles 0, 10, 20, 45, 60, 90
    assert values["mean_angle"] == pytest.approx(225 / 6, abs=1e-4)
    assert values["median_angle"] == pytest.approx((20 + 45) / 2, abs=1e-4)
    assert values["within_30"] == pytest.approx(3 / 6)


def test_normals_summing_to_zero_are_valid():
    """LibMTL / MTAN's ``sum(gt) != 0`` would drop (1, -1, 0)/sqrt(2); here it counts (angle 90 to (1, 1, 0))."""
    gt = _image([[s, -s, 0] for s in [math.sqrt(0.5)]] + [[0, 0, 0]] * 5)
    pred = _image([[1, 1, 0]] * 6)
    values = _compute([(pred, gt)])
    assert values["mean_angle"] == pytest.approx(90, abs=1e-4)


def test_loss_by_hand():
    # cosines 1, cos 10, cos 20, cos 45, 0 on the valid pixels; the target's length does not matter
    expected = sum(1 - math.cos(math.radians(a)) for a in (0, 10, 20, 45, 90)) / 5
    task = NormalTask()
    torch.testing.assert_close(task.loss(F.normalize(PRED, dim=1), GT), torch.tensor(expected))
    torch.testing.assert_close(task.loss(F.normalize(PRED, dim=1), 3 * GT), torch.tensor(expected))
    assert task.loss(PRED, torch.zeros_like(GT)).item() == 0


def test_matches_libmtl_normalmetric_definition_on_random_unit_normals():
    """LibMTL's NormalMetric: arccos of (normalised prediction . unit target) in degrees, on pixels whose target
    components do not sum to 0, concatenated over batches; numpy mean, median and strict-threshold fractions."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for size in (3, 2):
        gt = F.normalize(torch.randn(size, 3, 4, 5, generator=gen), dim=1)
        gt = gt * (torch.rand(size, 1, 4, 5, generator=gen) > 0.2)  # invalid pixels
        pred = gt + 0.5 * torch.randn(size, 3, 4, 5, generator=gen)
        batches.append((pred, gt))
    errors = []
    for pred, gt in batches:
        p, g = F.normalize(pred.double(), dim=1).numpy(), gt.double().numpy()
        valid = g.sum(1) != 0
        errors.append(np.degrees(np.arccos(np.clip((p * g).sum(1)[valid], -1, 1))))
    errors = np.concatenate(errors)
    ours = _compute(batches)
    assert ours["mean_angle"] == pytest.approx(errors.mean(), abs=1e-3)
    assert ours["median_angle"] == pytest.approx(np.median(errors), abs=1e-3)
    for name, threshold in (("within_11_25", 11.25), ("within_22_5", 22.5), ("within_30", 30)):
        assert ours[name] == pytest.approx((errors < threshold).mean())
    assert ours == pytest.approx(_compute([(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]))


def test_head_outputs_unit_normals_and_align_keeps_them_unit():
    task = NormalTask()
    task.build((4, 3, 3))
    output = task(torch.randn(2, 4, 3, 3))
    assert output.shape == (2, 3, 3, 3)
    torch.testing.assert_close(output.norm(dim=1), torch.ones(2, 3, 3))
    aligned = task.align(output, torch.zeros(2, 3, 7, 5))
    assert aligned.shape == (2, 3, 7, 5)
    torch.testing.assert_close(aligned.norm(dim=1), torch.ones(2, 7, 5))
    with pytest.raises(ValueError, match=r"needs a \(C, H, W\) representation"):
        NormalTask().build((16,))


def test_directions():
    assert NormalTask().directions() == {"mean_angle": False, "median_angle": False, "within_11_25": True,
                                         "within_22_5": True, "within_30": True}


def test_check_target():
    task = NormalTask()
    task.check_target(GT)
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\) float normals, got a \(1, 2, 3\)"):
        task.check_target(GT[:, 0])
    with pytest.raises(ValueError, match="float normals"):
        task.check_target(GT.long())
    with pytest.raises(ValueError, match="not NaN"):
        task.check_target(torch.full_like(GT, float("nan")))


def test_metric_collection_does_not_merge_different_metrics():
    """MetricCollection shares the state of metrics whose states are equal after the first update: here every sum
    and count (first batch invalid) and then within_22_5 / within_30 (no angle in [22.5, 30)) would be."""
    from torchmetrics import MetricCollection

    invalid = (PRED, torch.zeros_like(GT))
    at_25 = (_image([_deg(25)] * 6), _image([[1, 0, 0]] * 6))
    batches = [invalid, (PRED, GT), at_25]
    collection = MetricCollection(NormalTask().metrics())
    for pred, gt in batches:
        collection.update(pred, gt)
    together = {name: value.item() for name, value in collection.compute().items()}
    assert together == pytest.approx(_compute(batches))
    assert together["within_30"] == pytest.approx(9 / 11) and together["within_22_5"] == pytest.approx(3 / 11)


def test_bad_threshold():
    with pytest.raises(ValueError, match=r"\(0, 180\] degrees, got 0"):
        AngleWithin(0)
