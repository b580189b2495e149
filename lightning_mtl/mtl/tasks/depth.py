"""Depth estimation: one value per pixel, L1 loss and absolute / relative errors on the pixels with a depth.

A pixel is valid where its target depth is not 0 (NYUv2's convention for missing depth, as in MTAN and LibMTL). With
``V`` the valid pixels of the whole split, ``p`` the prediction and ``g`` the target::

    loss    = mean over the batch's valid pixels of |p - g|
    abs_err = sum_V |p - g|     / |V|
    rel_err = sum_V |p - g| / g / |V|

The metrics keep the sums and the count as ``"sum"`` states, so they are exact over DDP ranks and independent of how
the split is batched.

References: Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, arXiv:1803.10704
(``lorenmt/mtan`` ``im2im_pred/utils.py``: ``model_fit``, ``depth_error``); Lin & Zhang, "LibMTL", JMLR 2023,
arXiv:2203.14338 (``examples/nyu/utils.py``: ``DepthLoss``, ``DepthMetric``). Differences:

- LibMTL's ``DepthMetric`` stores each batch's mean error and averages them weighted by ``pred.size()[0]`` read
  *after* ``pred`` was masked, i.e. by the batch's number of valid pixels: that is exactly the pooled mean above.
  (Had the weight been the batch size, the two would differ whenever batches have different numbers of valid pixels.)
- MTAN's ``depth_error`` averages the per-batch means with equal weights (``avg_cost += cost / test_batch``), which
  differs from ours when batches have different numbers of valid pixels (e.g. a smaller last batch).
- Both find valid pixels with ``sum(target, dim=1) != 0``, which for a ``(B, 1, H, W)`` target is ``target != 0``;
  we also accept ``(B, H, W)`` targets. Both divide by the valid count unguarded (NaN for a batch without a valid
  pixel); our loss is 0 there, and a split without one gives NaN metrics.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_mtl.mtl.tasks._dense import DenseTask, HeadCallable


def _like_output(output: Tensor, target: Tensor) -> Tensor:
    """``target`` ``(B, H, W)`` or ``(B, 1, H, W)`` as ``(B, 1, H, W)``, in the output's dtype."""
    return (target.unsqueeze(1) if target.ndim == 3 else target).to(output.dtype)


class _DepthErrors(Metric):
    """Sums of the absolute and relative errors over the valid pixels, and their count. Both metrics keep both sums,
    so their states are always equal and a ``MetricCollection`` may rightly share them (it merges metrics whose
    states are equal after the first update)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("abs_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rel_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, output: Tensor, target: Tensor) -> None:
        output = output.detach().float()
        target = _like_output(output, target)
        valid = target != 0
        zero = torch.zeros_like(output)
        error = torch.where(valid, (output - target).abs(), zero)
        # divide by 1 where invalid: target 0 would give 0 / 0 = NaN, and NaN survives a later mask
        relative = error / torch.where(valid, target, torch.ones_like(target))
        self.abs_sum += error.sum(dtype=torch.float64)
        self.rel_sum += relative.sum(dtype=torch.float64)
        self.count += valid.sum()


class AbsoluteDepthError(_DepthErrors):
    """Mean ``|pred - target|`` over the valid pixels of the split (lower is better)."""

    def compute(self) -> Tensor:
        return (self.abs_sum / self.count).float()


class RelativeDepthError(_DepthErrors):
    """Mean ``|pred - target| / target`` over the valid pixels of the split (lower is better)."""

    def compute(self) -> Tensor:
        return (self.rel_sum / self.count).float()


class DepthTask(DenseTask):
    """Per-pixel depth regression (NYUv2, or Cityscapes' disparity), 0 marking pixels without a depth.

    Outputs are ``(B, 1, H, W)`` (raw, no activation, as MTAN's head), resized by :meth:`align` to the target's size;
    targets are ``(B, 1, H, W)`` or ``(B, H, W)`` non-negative floats. Metrics: ``abs_err`` (main) and ``rel_err``,
    both lower-is-better (see the module docstring).

    Args:
        head: the head factory ``(in_channels, out_channels) -> nn.Module``; ``None`` → MTAN's (see ``DenseTask``).
    """

    def __init__(self, head: HeadCallable | None = None) -> None:
        super().__init__(out_channels=1, head=head)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean ``|pred - target|`` over the batch's valid pixels (0 for a batch with none)."""
        target = _like_output(output, target)
        valid = target != 0
        error = torch.where(valid, (output - target).abs(), torch.zeros_like(output))
        return error.sum() / valid.sum().clamp_min(1)

    def metrics(self) -> dict[str, Metric]:
        return {"abs_err": AbsoluteDepthError(), "rel_err": RelativeDepthError()}

    def check_target(self, target: Tensor) -> None:
        if not target.is_floating_point() or not (target.ndim == 3 or (target.ndim == 4 and target.shape[1] == 1)):
            raise ValueError(f"expected (B, 1, H, W) or (B, H, W) float depths, got a {tuple(target.shape)} "
                             f"{target.dtype} tensor")
        if not torch.isfinite(target).all():
            raise ValueError("depth targets must be finite: mark pixels without a depth with 0, not NaN or inf")
        if (target < 0).any():
            raise ValueError(f"depth targets must be >= 0 (0 marks a pixel without a depth), got a minimum of "
                             f"{float(target.min())}")
