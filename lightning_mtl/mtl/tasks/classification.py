"""Multi-class classification: a linear softmax head on the flattened representation, cross-entropy, accuracy."""

from __future__ import annotations

import math
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Accuracy, Metric

from lightning_mtl.mtl.tasks.base import Task


class ClassificationTask(Task):
    """``num_classes``-way classification of each input.

    The head is ``Linear(prod(representation_shape), num_classes)`` on the flattened representation (a ``(C, 1, 1)``
    map, as Conv-4 gives on 28x28 inputs, is read as ``C`` features), or with ``pool="avg"`` ``Linear(C, num_classes)``
    on the spatial average of a ``(C, H, W)`` map (a class read from a dense network's feature map, as a ResNet does).
    Targets are int64 class indices.

    Args:
        num_classes: number of classes (at least 2).
        label_smoothing: cross-entropy label smoothing (0: none).
        pool: ``"flatten"`` every value of the representation, or ``"avg"`` (global average pooling of a
            ``(C, H, W)`` map).

    Raises:
        ValueError: fewer than 2 classes, a smoothing outside [0, 1), an unknown ``pool``, or (when the head is
            built) ``pool="avg"`` on a representation that is not a ``(C, H, W)`` map.
    """

    def __init__(self, num_classes: int, label_smoothing: float = 0.0,
                 pool: Literal["flatten", "avg"] = "flatten") -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classification task needs at least 2 classes, got num_classes={num_classes}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if pool not in ("flatten", "avg"):
            raise ValueError(f"pool must be 'flatten' or 'avg', got {pool!r}")
        self.num_classes, self.label_smoothing, self.pool = num_classes, label_smoothing, pool

    def build_head(self, representation_shape: tuple[int, ...]) -> nn.Module:
        if self.pool == "flatten":
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(representation_shape), self.num_classes))
        if len(representation_shape) != 3:
            raise ValueError(f"pool='avg' averages a (C, H, W) feature map, got a {tuple(representation_shape)} "
                             f"representation; use pool='flatten'.")
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(representation_shape[0],
                                                                              self.num_classes))

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target, label_smoothing=self.label_smoothing)

    def metrics(self) -> dict[str, Metric]:
        return {"acc": Accuracy(task="multiclass", num_classes=self.num_classes)}

    def check_target(self, target: Tensor) -> None:
        if target.is_floating_point() or target.ndim != 1:
            raise ValueError(f"expected (B,) integer class indices, got a {tuple(target.shape)} {target.dtype} tensor")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.num_classes):
            bad = int(target.max()) if int(target.max()) >= self.num_classes else int(target.min())
            raise ValueError(f"target {bad} is out of the head's range 0..{self.num_classes - 1}; fix num_classes "
                             f"or the labels.")
