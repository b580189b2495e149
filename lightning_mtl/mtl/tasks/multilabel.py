"""Multi-label classification: ``num_labels`` independent binary attributes (CelebA's 40), BCE, mean accuracy.

The head is ``Linear(prod(representation_shape), num_labels)`` on the flattened representation, giving one logit per
attribute; the loss is the binary cross-entropy with logits averaged over samples and attributes; the metric is the
mean over attributes of each attribute's accuracy, an attribute being predicted present where its logit is > 0
(probability > 0.5)::

    acc = mean_l  (1 / N) sum_n [ (z_nl > 0) == y_nl ]

Every attribute is scored on the same N samples, so this equals the accuracy over all N x L decisions; it is
torchmetrics' ``MultilabelAccuracy(num_labels, threshold=0.5, average="macro")``. We count it ourselves because that
class decides per batch whether its inputs are logits (applying a sigmoid only if some value lies outside [0, 1]), so
a batch of logits that all happen to lie in [0, 1] would be thresholded at logit 0.5 instead of 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_mtl.mtl.tasks.base import Task


class MeanAttributeAccuracy(Metric):
    """Mean over the ``num_labels`` attributes of their accuracy over the split, logits thresholded at 0 (higher is
    better).

    Args:
        num_labels: number of attributes.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.add_state("correct", torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, output: Tensor, target: Tensor) -> None:
        self.correct += ((output.detach() > 0) == target.bool()).sum(0)  # (L,)
        self.total += output.shape[0]

    def compute(self) -> Tensor:
        return (self.correct.double() / self.total).mean().float()


class MultiLabelTask(Task):
    """``num_labels`` binary attributes of each input (e.g. CelebA's 40).

    Targets are ``(B, num_labels)`` 0/1 values (int, bool or float). Metric: ``acc``, the mean attribute accuracy.

    Args:
        num_labels: number of binary attributes (at least 1).

    Raises:
        ValueError: ``num_labels`` is not positive.
    """

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"a multi-label task needs at least one label, got num_labels={num_labels}")
        self.num_labels = num_labels

    def build_head(self, representation_shape: tuple[int, ...]) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(representation_shape), self.num_labels))

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Binary cross-entropy with logits, averaged over samples and attributes."""
        return F.binary_cross_entropy_with_logits(output, target.to(output.dtype))

    def metrics(self) -> dict[str, Metric]:
        return {"acc": MeanAttributeAccuracy(self.num_labels)}

    def check_target(self, target: Tensor) -> None:
        if target.ndim != 2 or target.shape[1] != self.num_labels:
            raise ValueError(f"expected (B, {self.num_labels}) 0/1 attributes, got a {tuple(target.shape)} tensor; "
                             f"fix num_labels or the targets")
        if not ((target == 0) | (target == 1)).all():
            bad = target[(target != 0) & (target != 1)][0]
            raise ValueError(f"attribute targets must be 0 or 1, got {bad.item()} (map CelebA's -1 to 0)")
