"""Task specifications: what a :class:`~lightning_mtl.mtl.MultiTaskModule` needs to know about each task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Accuracy, MetricCollection


@dataclass
class TaskSpec:
    """One task of a multi-task model.

    Attributes:
        head: maps the shared representation ``(B, D)`` to the task output.
        loss: ``loss(output, target) -> scalar`` (a mean over the batch).
        metrics: torchmetrics collection updated with ``(output, target)`` at validation and test.
        higher_is_better: direction of the task's main metric (the first of ``metrics``), used for Δm%.
        num_classes: output classes for classification heads (targets are checked against it), else ``None``.
    """

    head: nn.Module
    loss: Callable[[Tensor, Tensor], Tensor]
    metrics: MetricCollection
    higher_is_better: bool = True
    num_classes: int | None = None


def classification_task(feature_dim: int, num_classes: int) -> TaskSpec:
    """A linear softmax classifier with cross-entropy loss and accuracy."""
    if num_classes < 2:
        raise ValueError(f"a classification task needs at least 2 classes, got {num_classes}")
    return TaskSpec(
        head=nn.Linear(feature_dim, num_classes),
        loss=F.cross_entropy,
        metrics=MetricCollection({"acc": Accuracy(task="multiclass", num_classes=num_classes)}),
        higher_is_better=True,
        num_classes=num_classes,
    )
