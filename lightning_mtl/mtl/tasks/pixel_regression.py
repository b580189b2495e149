"""Dense per-pixel regression (image-to-image tasks: edges, colourisation, denoising, ...): L1 or L2 loss, MAE and
PSNR pooled over the split.

With ``P`` every (pixel, channel) value of the whole split, ``p`` the prediction, ``g`` the target and ``R`` the
``data_range`` (the span of the target's values, 1 for images in [0, 1])::

    loss = mean over the batch's values of |p - g|  ("l1")   or   (p - g)^2  ("l2")
    mae  = sum_P |p - g| / |P|                                   (lower is better; the main metric)
    psnr = 10 log10(R^2 / mse),  mse = sum_P (p - g)^2 / |P|     (dB, higher is better)

Both metrics keep the sums and the count as ``"sum"`` states (as :class:`~lightning_mtl.mtl.tasks.DepthTask` does),
so they are exact over DDP ranks and independent of how the split is batched. The PSNR is that of the split's pooled
MSE, not the mean of per-image PSNRs that denoising papers often report (the two differ: the log of a mean is not the
mean of logs); it is infinite for a perfect prediction. Every pixel counts: unlike depth or normals, the targets have
no invalid-pixel marker.

The head is MTAN's dense prediction head (:func:`~lightning_mtl.mtl.tasks._dense.prediction_head`), linear (no output
activation), so it can reach any target range.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_mtl.mtl.tasks._dense import DenseTask, HeadCallable


def _like_output(output: Tensor, target: Tensor) -> Tensor:
    """``target`` ``(B, H, W)`` (one channel) or ``(B, C, H, W)`` as ``(B, C, H, W)``, in the output's dtype."""
    return (target.unsqueeze(1) if target.ndim == 3 else target).to(output.dtype)


class _PixelErrors(Metric):
    """Sums of the absolute and squared errors over every value, and their count. Both metrics keep both sums, so
    their states are always equal and a ``MetricCollection`` may rightly share them."""

    is_differentiable = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("abs_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sq_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, output: Tensor, target: Tensor) -> None:
        output = output.detach().float()
        error = (output - _like_output(output, target)).double()  # float64: sums over a split of ~10^8 values
        self.abs_sum += error.abs().sum()
        self.sq_sum += error.square().sum()
        self.count += error.numel()


class PixelMAE(_PixelErrors):
    """Mean ``|pred - target|`` over every value of the split (lower is better)."""

    higher_is_better = False

    def compute(self) -> Tensor:
        return (self.abs_sum / self.count).float()


class PixelPSNR(_PixelErrors):
    """``10 log10(data_range^2 / mse)`` of the split's pooled mean squared error, in dB (higher is better).

    Args:
        data_range: the span of the target values (1.0 for images in [0, 1], 255 for uint8 scales).

    Raises:
        ValueError: ``data_range`` is not positive.
    """

    higher_is_better = True

    def __init__(self, data_range: float = 1.0) -> None:
        if not data_range > 0:
            raise ValueError(f"data_range must be > 0, got {data_range}")
        super().__init__()
        self.data_range = float(data_range)

    def compute(self) -> Tensor:
        mse = self.sq_sum / self.count
        return (20 * math.log10(self.data_range) - 10 * torch.log10(mse)).float()


class PixelRegressionTask(DenseTask):
    """``out_channels`` real values per pixel (an image-to-image task).

    Outputs are ``(B, out_channels, H, W)``, resized by :meth:`align` to the target's size; targets are
    ``(B, out_channels, H, W)`` floats, or ``(B, H, W)`` for one channel. Metrics: ``mae`` (main) and ``psnr`` (see the
    module docstring for the formulas).

    Args:
        out_channels: values predicted per pixel (1 for a greyscale image or an edge map, 3 for RGB).
        loss: training loss, ``"l1"`` (mean absolute error) or ``"l2"`` (mean squared error).
        data_range: span of the target values, for the PSNR (1.0 for images in [0, 1]).
        head: the head factory ``(in_channels, out_channels) -> nn.Module``; ``None`` → MTAN's (see ``DenseTask``).

    Raises:
        ValueError: ``out_channels`` is not positive, ``loss`` is unknown or ``data_range`` is not positive.
    """

    def __init__(self, out_channels: int = 1, loss: Literal["l1", "l2"] = "l1", data_range: float = 1.0,
                 head: HeadCallable | None = None) -> None:
        super().__init__(out_channels, head)
        if loss not in ("l1", "l2"):
            raise ValueError(f"loss must be 'l1' or 'l2', got {loss!r}")
        if not data_range > 0:
            raise ValueError(f"data_range must be > 0, got {data_range}")
        self.loss_name, self.data_range = loss, float(data_range)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean absolute (``"l1"``) or squared (``"l2"``) error over every value of the batch."""
        target = _like_output(output, target)
        return F.l1_loss(output, target) if self.loss_name == "l1" else F.mse_loss(output, target)

    def metrics(self) -> dict[str, Metric]:
        return {"mae": PixelMAE(), "psnr": PixelPSNR(self.data_range)}

    def check_target(self, target: Tensor) -> None:
        one = self.out_channels == 1
        shape_ok = (target.ndim == 4 and target.shape[1] == self.out_channels) or (target.ndim == 3 and one)
        if not target.is_floating_point() or not shape_ok:
            allowed = "(B, 1, H, W) or (B, H, W)" if one else f"(B, {self.out_channels}, H, W)"
            raise ValueError(f"expected {allowed} float targets, got a {tuple(target.shape)} {target.dtype} tensor; "
                             f"fix out_channels or the targets")
        if not torch.isfinite(target).all():
            raise ValueError("pixel regression targets must be finite (no NaN or inf)")
