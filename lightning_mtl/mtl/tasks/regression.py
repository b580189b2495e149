"""Regression: ``out_features`` real values per input, MSE or L1 loss, MAE and MSE metrics.

The head is ``Linear(prod(representation_shape), out_features)`` on the flattened representation. With ``p`` the
predictions and ``y`` the targets, over all ``N x out_features`` values of the split::

    mae = mean |p - y|        mse = mean (p - y)^2        (both lower is better; MAE is the main metric)

(torchmetrics' ``MeanAbsoluteError`` and ``MeanSquaredError``, whose sums and counts add up exactly over DDP ranks.)
MAE comes first whatever the loss, so runs with either loss report the same main metric.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, Metric

from lightning_mtl.mtl.tasks.base import Task


class RegressionTask(Task):
    """``out_features`` real values of each input.

    Targets are floats of shape ``(B, out_features)``, or ``(B,)`` when ``out_features`` is 1 (:meth:`align` then
    gives the ``(B, 1)`` output the target's shape). Metrics: ``mae`` (main) and ``mse``.

    Args:
        out_features: values predicted per input (at least 1).
        loss: training loss, ``"mse"`` (mean squared error) or ``"l1"`` (mean absolute error).

    Raises:
        ValueError: ``out_features`` is not positive or ``loss`` is unknown.
    """

    def __init__(self, out_features: int = 1, loss: Literal["mse", "l1"] = "mse") -> None:
        super().__init__()
        if out_features < 1:
            raise ValueError(f"a regression task predicts at least one value, got out_features={out_features}")
        if loss not in ("mse", "l1"):
            raise ValueError(f"loss must be 'mse' or 'l1', got {loss!r}")
        self.out_features, self.loss_name = out_features, loss

    def build_head(self, representation_shape: tuple[int, ...]) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(representation_shape), self.out_features))

    def align(self, output: Tensor, target: Tensor) -> Tensor:
        """A ``(B, 1)`` output as ``(B,)`` for ``(B,)`` targets; otherwise unchanged."""
        return output.reshape(target.shape) if output.ndim == 2 and target.ndim == 1 else output

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean squared or absolute error over all values (``target`` reshaped to ``output``'s shape, so a ``(B,)``
        target never broadcasts against a ``(B, 1)`` output)."""
        target = target.to(output.dtype).reshape(output.shape)
        return F.mse_loss(output, target) if self.loss_name == "mse" else F.l1_loss(output, target)

    def metrics(self) -> dict[str, Metric]:
        return {"mae": MeanAbsoluteError(), "mse": MeanSquaredError()}

    def check_target(self, target: Tensor) -> None:
        allowed = "(B, 1) or (B,)" if self.out_features == 1 else f"(B, {self.out_features})"
        shape_ok = (target.ndim == 2 and target.shape[1] == self.out_features) or (
            target.ndim == 1 and self.out_features == 1)
        if not target.is_floating_point() or not shape_ok:
            raise ValueError(f"expected {allowed} float targets, got a {tuple(target.shape)} {target.dtype} tensor; "
                             f"fix out_features or the targets")
        if not torch.isfinite(target).all():
            raise ValueError("regression targets must be finite (no NaN or inf)")
