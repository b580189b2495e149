"""SegmentationTask: a known confusion matrix by hand, ignored pixels, absent classes, accumulation, DDP-style
merging, torchmetrics' references, the MTAN head, resizing, loss and target checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from lightning_mtl.mtl.tasks._dense import prediction_head, resize_to
from lightning_mtl.mtl.tasks.segmentation import SegmentationTask, confusion_matrix

# a 2x2 image, 3 classes: labels [[0, 1], [2, ignored]], predictions [[0, 2], [2, 1]]
TARGET = torch.tensor([[[0, 1], [2, -1]]])
PRED = torch.tensor([[[0, 2], [2, 1]]])


def _logits(pred: torch.Tensor, num_classes: int, scale: float = 5.0) -> torch.Tensor:
    return scale * F.one_hot(pred, num_classes).permute(0, 3, 1, 2).float()  # (B, C, H, W)


def _compute(task, output, target, splits=1):
    metrics = task.metrics()
    for out, tgt in zip(output.chunk(splits), target.chunk(splits), strict=True):
        for metric in metrics.values():
            metric.update(out, tgt)
    return {name: metric.compute() for name, metric in metrics.items()}


def test_confusion_matrix_and_metrics_by_hand():
    # rows true, columns predicted; the ignored pixel (predicted 1) counts nowhere
    expected = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 0, 1]])
    assert torch.equal(confusion_matrix(_logits(PRED, 3), TARGET, 3), expected)
    # TP = (1, 0, 1), TP + FP + FN = (1, 1, 2): IoU = (1, 0, 1/2)
    values = _compute(SegmentationTask(num_classes=3), _logits(PRED, 3), TARGET)
    torch.testing.assert_close(values["miou"], torch.tensor((1 + 0 + 0.5) / 3))
    torch.testing.assert_close(values["pixel_acc"], torch.tensor(2 / 3))


def test_ignored_pixels_do_not_count_whatever_is_predicted_there():
    task = SegmentationTask(num_classes=3)
    other = PRED.clone()
    other[0, 1, 1] = 0  # change only the prediction at the ignored pixel
    assert _compute(task, _logits(PRED, 3), TARGET) == _compute(task, _logits(other, 3), TARGET)


def test_classes_absent_from_labels_and_predictions_are_skipped():
    # class 3 never labelled nor predicted: MTAN's ConfMatrix / LibMTL's SegMetric would give NaN (0/0 in their mean)
    values = _compute(SegmentationTask(num_classes=4), _logits(PRED, 4), TARGET)
    torch.testing.assert_close(values["miou"], torch.tensor(0.5))
    # a class predicted but never labelled has IoU 0 and counts
    pred = torch.tensor([[[0, 3], [2, 1]]])  # pixel (0, 1): true 1, predicted 3
    values = _compute(SegmentationTask(num_classes=4), _logits(pred, 4), TARGET)
    # TP = (1, 0, 1, 0), unions = (1, 1, 1, 1)
    torch.testing.assert_close(values["miou"], torch.tensor(2 / 4))


def test_accumulation_equals_one_update_and_matches_torchmetrics():
    gen = torch.Generator().manual_seed(0)
    output = torch.randn(6, 5, 4, 3, generator=gen)
    target = torch.randint(-1, 5, (6, 4, 3), generator=gen)  # about 1/6 ignored
    task = SegmentationTask(num_classes=5)
    once, split = _compute(task, output, target), _compute(task, output, target, splits=3)
    jaccard = MulticlassJaccardIndex(num_classes=5, average="macro", ignore_index=-1)
    accuracy = MulticlassAccuracy(num_classes=5, average="micro", ignore_index=-1)
    torch.testing.assert_close(split["miou"], once["miou"])
    torch.testing.assert_close(split["pixel_acc"], once["pixel_acc"])
    torch.testing.assert_close(once["miou"], jaccard(output, target))
    torch.testing.assert_close(once["pixel_acc"], accuracy(output, target))


def test_confusion_matrix_is_a_sum_state_as_ddp_reduces_it():
    gen = torch.Generator().manual_seed(1)
    output, target = torch.randn(4, 3, 2, 2, generator=gen), torch.randint(0, 3, (4, 2, 2), generator=gen)
    task = SegmentationTask(num_classes=3)
    rank0, rank1, whole = task.metrics()["miou"], task.metrics()["miou"], task.metrics()["miou"]
    rank0.update(output[:2], target[:2])
    rank1.update(output[2:], target[2:])
    whole.update(output, target)
    rank0.merge_state(rank1)  # the reduction DDP applies to the states
    torch.testing.assert_close(rank0.compute(), whole.compute())


def test_loss_by_hand_ignores_unlabelled_pixels():
    task = SegmentationTask(num_classes=3)
    # right pixels: -log(e^5 / (e^5 + 2)); the wrong one (true 1, logit 0 for it): -log(1 / (e^5 + 2))
    right, wrong = math.log(1 + 2 * math.exp(-5)), math.log(math.exp(5) + 2)
    torch.testing.assert_close(task.loss(_logits(PRED, 3), TARGET), torch.tensor((2 * right + wrong) / 3))
    gen = torch.Generator().manual_seed(2)
    output, target = torch.randn(2, 3, 4, 4, generator=gen), torch.randint(-1, 3, (2, 4, 4), generator=gen)
    torch.testing.assert_close(task.loss(output, target), F.cross_entropy(output, target, ignore_index=-1))


def test_loss_of_a_fully_ignored_batch_is_zero_not_nan():
    output = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = SegmentationTask(num_classes=3).loss(output, torch.full((1, 2, 2), -1))
    loss.backward()
    assert loss.item() == 0 and torch.equal(output.grad, torch.zeros_like(output))


def test_head_is_mtans_and_keeps_the_resolution():
    task = SegmentationTask(num_classes=13)
    task.build((8, 6, 5))
    assert task(torch.randn(2, 8, 6, 5)).shape == (2, 13, 6, 5)
    conv3, conv1 = task.head
    assert (conv3.in_channels, conv3.out_channels, conv3.kernel_size) == (8, 8, (3, 3))
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size) == (8, 13, (1, 1))
    assert torch.equal(conv3.bias, torch.zeros(8)) and torch.equal(conv1.bias, torch.zeros(13))
    assert len(prediction_head(4, 2)) == 2


def test_a_vector_representation_is_refused_with_advice():
    with pytest.raises(ValueError, match=r"needs a \(C, H, W\) representation, got \(64,\).*feature map"):
        SegmentationTask(num_classes=3).build((64,))


def test_align_resizes_bilinearly_to_the_target():
    task = SegmentationTask(num_classes=2)
    output = torch.tensor([[[[0.0, 1.0]], [[1.0, 1.0]]]])  # (1, 2, 1, 2)
    aligned = task.align(output, torch.zeros(1, 1, 4, dtype=torch.long))
    # align_corners=False: source x = (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to [0, 1]
    torch.testing.assert_close(aligned[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    torch.testing.assert_close(aligned[0, 1, 0], torch.ones(4))
    assert task.align(output, torch.zeros(1, 1, 2, dtype=torch.long)) is output
    big = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(resize_to(big, (3, 5)), F.interpolate(big, size=(3, 5), mode="bilinear"))


def test_directions():
    assert SegmentationTask(num_classes=3).directions() == {"miou": True, "pixel_acc": True}


def test_check_target():
    task = SegmentationTask(num_classes=3)
    task.check_target(TARGET)
    with pytest.raises(ValueError, match=r"expected \(B, H, W\) integer class labels.*squeeze"):
        task.check_target(TARGET.unsqueeze(1))
    with pytest.raises(ValueError, match=r"\.long\(\)"):
        task.check_target(TARGET.float())
    with pytest.raises(ValueError, match="label 3 is neither a class 0..2 nor ignore_index=-1"):
        task.check_target(torch.tensor([[[0, 3]]]))
    with pytest.raises(ValueError, match="label -2"):
        task.check_target(torch.tensor([[[0, -2]]]))
    SegmentationTask(num_classes=3, ignore_index=255).check_target(torch.tensor([[[0, 255]]]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 classes"):
        SegmentationTask(num_classes=1)
    with pytest.raises(ValueError, match="ignore_index=0 is one of the classes 0..2"):
        SegmentationTask(num_classes=3, ignore_index=0)


def test_metric_collection_shares_one_confusion_matrix_correctly():
    from torchmetrics import MetricCollection

    gen = torch.Generator().manual_seed(3)
    output, target = torch.randn(4, 3, 3, 3, generator=gen), torch.randint(-1, 3, (4, 3, 3), generator=gen)
    task = SegmentationTask(num_classes=3)
    collection = MetricCollection(task.metrics())
    for out, tgt in zip(output.chunk(2), target.chunk(2), strict=True):
        collection.update(out, tgt)
    together, separate = collection.compute(), _compute(task, output, target, splits=2)
    for name, value in separate.items():
        torch.testing.assert_close(together[name], value)
