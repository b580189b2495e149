"""Semantic segmentation: per-pixel classes, cross-entropy, mIoU and pixel accuracy from a confusion matrix.

Metrics. A ``(C, C)`` confusion matrix ``M`` (rows: true class, columns: predicted class, prediction = arg-max of the
logits) is summed over every labelled pixel of the split (a ``"sum"`` state, so DDP ranks add up exactly); pixels whose
label is ``ignore_index`` are left out. Then, with ``TP_c = M[c, c]``, ``FP_c = sum_r M[r, c] - TP_c`` and
``FN_c = sum_k M[c, k] - TP_c``::

    mIoU      = mean over the classes with TP_c + FP_c + FN_c > 0 of  TP_c / (TP_c + FP_c + FN_c)
    pixel acc = sum_c TP_c / sum M

How this relates to the reference code (NYUv2, Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019, arXiv:1803.10704; LibMTL, Lin & Zhang, JMLR 2023, arXiv:2203.14338):

- MTAN's ``ConfMatrix`` (``im2im_pred/utils.py``, which replaced its first per-image formula) and LibMTL's
  ``SegMetric`` (``examples/nyu/utils.py``) build the same matrix over the whole split and the same pixel accuracy,
  but average the IoU over *all* ``C`` classes: a class that is neither labelled nor predicted anywhere gives 0/0, and
  their mIoU is NaN. Ours skips such classes (as torchmetrics' ``MulticlassJaccardIndex(average="macro")`` does), so
  the two agree whenever every class appears, as on the NYUv2 test split, and ours stays finite otherwise.
- MTAN's first formula (kept in its code as "Legacy") averaged a per-image mIoU and pixel accuracy over images and
  batches; that weights small images and rare classes differently and is not what either repository reports now.
- Both drop every label outside ``[0, C)``; we drop ``ignore_index`` and :meth:`SegmentationTask.check_target`
  rejects any other out-of-range label instead of silently ignoring it.

The head is MTAN's (see :mod:`lightning_mtl.mtl.tasks._dense`); the loss is the cross-entropy of the labelled pixels
(MTAN: ``nll_loss`` of a ``log_softmax``, LibMTL: ``CrossEntropyLoss(ignore_index=-1)``, the same value).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_mtl.mtl.tasks._dense import DenseTask, HeadCallable


def confusion_matrix(output: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """The ``(C, C)`` int64 confusion matrix (rows: true, columns: predicted) of the pixels labelled in ``[0, C)``.

    Args:
        output: ``(B, C, H, W)`` logits.
        target: ``(B, H, W)`` labels; labels outside ``[0, C)`` (``ignore_index``) are left out.
    """
    pred = output.argmax(1).flatten()  # (B*H*W,)
    true = target.flatten().long()
    keep = (true >= 0) & (true < num_classes)
    # invalid pixels land in bin 0 with weight 0: no boolean indexing, so no device synchronisation
    index = torch.where(keep, true * num_classes + pred, torch.zeros_like(true))
    counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=output.device)
    counts.scatter_add_(0, index, keep.long())
    return counts.view(num_classes, num_classes)


def mean_iou(confmat: Tensor) -> Tensor:
    """Mean over the classes that appear (labelled or predicted) of ``TP / (TP + FP + FN)``; NaN if none does."""
    h = confmat.double()
    tp = h.diagonal()
    union = h.sum(0) + h.sum(1) - tp  # TP + FP + FN
    present = union > 0
    return ((tp / union.clamp_min(1)).sum() / present.sum()).float()


def pixel_accuracy(confmat: Tensor) -> Tensor:
    """Fraction of the labelled pixels whose arg-max is their label; NaN if none is labelled."""
    h = confmat.double()
    return (h.diagonal().sum() / h.sum()).float()


class _ConfusionMatrixMetric(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, output: Tensor, target: Tensor) -> None:
        self.confmat += confusion_matrix(output.detach(), target, self.num_classes)


class MeanIoU(_ConfusionMatrixMetric):
    """:func:`mean_iou` of the confusion matrix accumulated over the split (higher is better)."""

    def compute(self) -> Tensor:
        return mean_iou(self.confmat)


class PixelAccuracy(_ConfusionMatrixMetric):
    """:func:`pixel_accuracy` of the confusion matrix accumulated over the split (higher is better)."""

    def compute(self) -> Tensor:
        return pixel_accuracy(self.confmat)


class SegmentationTask(DenseTask):
    """Per-pixel ``num_classes``-way classification (NYUv2's 13 classes, Cityscapes' 7 or 19).

    Outputs are ``(B, num_classes, H, W)`` logits, resized by :meth:`align` to the labels' size; targets are
    ``(B, H, W)`` integer labels, ``ignore_index`` marking unlabelled pixels. Metrics: ``miou`` (main) and
    ``pixel_acc``, both higher-is-better (see the module docstring for the exact formulas).

    Args:
        num_classes: number of classes (at least 2).
        ignore_index: label of unlabelled pixels (NYUv2: -1); must lie outside ``0..num_classes - 1``.
        head: the head factory ``(in_channels, out_channels) -> nn.Module``; ``None`` → MTAN's (see :class:`DenseTask`).

    Raises:
        ValueError: fewer than 2 classes, or ``ignore_index`` is a real class.
    """

    def __init__(self, num_classes: int, ignore_index: int = -1, head: HeadCallable | None = None) -> None:
        if num_classes < 2:
            raise ValueError(f"a segmentation task needs at least 2 classes, got num_classes={num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} is one of the classes 0..{num_classes - 1}; pick a label "
                             f"outside that range (e.g. -1 or 255)")
        super().__init__(num_classes, head)
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy over the labelled pixels (0, not NaN, for a batch with none)."""
        target = target.long()
        total = F.cross_entropy(output, target, ignore_index=self.ignore_index, reduction="sum")
        return total / (target != self.ignore_index).sum().clamp_min(1)

    def metrics(self) -> dict[str, Metric]:
        return {"miou": MeanIoU(self.num_classes), "pixel_acc": PixelAccuracy(self.num_classes)}

    def check_target(self, target: Tensor) -> None:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool or target.ndim != 3:
            raise ValueError(f"expected (B, H, W) integer class labels, got a {tuple(target.shape)} {target.dtype} "
                             f"tensor (squeeze a channel dimension, convert float labels with .long())")
        bad = target[(target != self.ignore_index) & ((target < 0) | (target >= self.num_classes))]
        if bad.numel():
            raise ValueError(f"label {int(bad[0])} is neither a class 0..{self.num_classes - 1} nor ignore_index="
                             f"{self.ignore_index}; fix num_classes, ignore_index or the labels")
