"""Surface-normal estimation: a unit 3-vector per pixel, cosine loss, angular-error metrics on the valid pixels.

A pixel is valid where its target normal is not the zero vector. The head's output is L2-normalised over its 3
channels (again after :meth:`NormalTask.align` resizes it). With ``V`` the valid pixels, ``p`` the prediction and
``g`` the target::

    loss        = 1 - mean over the batch's valid pixels of cos(p, g)
    angle       = atan2(|p x g|, p . g) in degrees     (= arccos(p . g) for unit vectors, stable near 0 and 180)
    mean_angle, median_angle                             over all valid pixels of the split (lower is better)
    within_t    = fraction of valid pixels with angle < t, for t = 11.25, 22.5, 30 degrees (higher is better)

References: Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, arXiv:1803.10704
(``lorenmt/mtan`` ``im2im_pred/utils.py``: ``model_fit``, ``normal_error``); Lin & Zhang, "LibMTL", JMLR 2023,
arXiv:2203.14338 (``examples/nyu/utils.py``: ``NormalLoss``, ``NormalMetric``). Differences:

- Both find valid pixels with ``sum(target, dim=1) != 0``: a unit normal whose components sum to 0, such as
  ``(1, -1, 0) / sqrt(2)``, counts as invalid there and valid here (we test ``any(target != 0)``). On NYUv2 such exact
  sums essentially never occur, so the metrics agree.
- Their loss and ``arccos`` use ``p . g`` assuming a unit target (NYUv2's are); we use the cosine, so targets need
  not be exactly unit. For unit targets the values are equal (up to ``arccos``'s float rounding near 0 and 180).
- LibMTL's ``NormalMetric`` concatenates the angles of the whole split, as we do; MTAN's ``normal_error`` averages
  per-batch means, medians and fractions over batches, which differs from ours (a mean of per-batch medians is not
  the median). Thresholds are strict (``<``), as in both. Fractions are in [0, 1], as in both (papers print %).
- The median needs every valid pixel's angle: :class:`MedianAngularError` keeps them as a ``"cat"`` state, 4 bytes
  per valid pixel on the metric's device (NYUv2's 654 test images at 288x384: about 290 MB), gathered onto every rank
  under DDP at :meth:`~torchmetrics.Metric.compute`. The other metrics keep sums only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_mtl.mtl.tasks._dense import DenseTask, HeadCallable


def valid_normals(target: Tensor) -> Tensor:
    """``(B, H, W)`` mask of the pixels whose ``(B, 3, H, W)`` target normal is not the zero vector."""
    return (target != 0).any(dim=1)


def angular_error(output: Tensor, target: Tensor) -> Tensor:
    """``(B, H, W)`` angle in degrees between the ``(B, 3, H, W)`` vectors of ``output`` and ``target`` (any
    non-zero lengths)."""
    output, target = output.float(), target.float()
    cross = torch.linalg.cross(output, target, dim=1).norm(dim=1)
    dot = (output * target).sum(dim=1)
    return torch.rad2deg(torch.atan2(cross, dot))


class _UnitNormal(nn.Module):
    """L2-normalises ``(B, 3, H, W)`` over its channels."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1)


class _AngleSums(Metric):
    """Mean angle (``threshold=None``) or fraction of angles below ``threshold``, from sums over the valid pixels."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, threshold: float | None) -> None:
        super().__init__()
        self.threshold = threshold
        # distinct state names: MetricCollection merges metrics whose states have equal names and values after the
        # first update (e.g. within_22_5 and within_30 when no first-batch angle lies between 22.5 and 30)
        self._sum = "angle_sum" if threshold is None else f"below_{threshold:g}".replace(".", "_")
        self.add_state(self._sum, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, output: Tensor, target: Tensor) -> None:
        angle = angular_error(output.detach(), target)  # (B, H, W)
        value = angle if self.threshold is None else (angle < self.threshold).to(angle.dtype)
        valid = valid_normals(target)
        total = getattr(self, self._sum) + torch.where(valid, value, torch.zeros_like(value)).sum(dtype=torch.float64)
        setattr(self, self._sum, total)
        self.count += valid.sum()

    def compute(self) -> Tensor:
        return (getattr(self, self._sum) / self.count).float()


class MeanAngularError(_AngleSums):
    """Mean angle in degrees over the valid pixels of the split (lower is better)."""

    higher_is_better = False

    def __init__(self) -> None:
        super().__init__(threshold=None)


class AngleWithin(_AngleSums):
    """Fraction of the split's valid pixels whose angle is below ``threshold`` degrees (higher is better).

    Args:
        threshold: the angle in degrees (11.25, 22.5 and 30 on NYUv2).

    Raises:
        ValueError: ``threshold`` is not in (0, 180].
    """

    higher_is_better = True

    def __init__(self, threshold: float) -> None:
        if not 0 < threshold <= 180:
            raise ValueError(f"an angle threshold must be in (0, 180] degrees, got {threshold}")
        super().__init__(threshold=threshold)


class MedianAngularError(Metric):
    """Median angle in degrees over the valid pixels of the split (lower is better); the mean of the two middle
    angles for an even count, as ``numpy.median``. Keeps every valid angle (see the module docstring for memory)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("angles", [], dist_reduce_fx="cat")

    def update(self, output: Tensor, target: Tensor) -> None:
        self.angles.append(angular_error(output.detach(), target)[valid_normals(target)])  # (N,)

    def compute(self) -> Tensor:
        angles = dim_zero_cat(self.angles) if len(self.angles) else torch.zeros(0, device=self.device)
        n = angles.numel()
        if n == 0:
            return torch.tensor(float("nan"), device=angles.device)
        # kthvalue is O(n) and, unlike torch.quantile, has no input-size limit
        low = torch.kthvalue(angles, (n + 1) // 2).values
        high = torch.kthvalue(angles, n // 2 + 1).values
        return (low + high) / 2


class NormalTask(DenseTask):
    """Per-pixel surface normals (NYUv2), the zero vector marking pixels without one.

    Outputs are ``(B, 3, H, W)`` unit vectors (resized by :meth:`align` to the target's size, then re-normalised);
    targets are ``(B, 3, H, W)`` floats. Metrics: ``mean_angle`` (main), ``median_angle``, ``within_11_25``,
    ``within_22_5``, ``within_30`` (see the module docstring).

    Args:
        head: the head factory ``(in_channels, out_channels) -> nn.Module``; ``None`` → MTAN's (see ``DenseTask``).
    """

    def __init__(self, head: HeadCallable | None = None) -> None:
        super().__init__(out_channels=3, head=head)

    def build_head(self, representation_shape: tuple[int, ...]) -> nn.Module:
        return nn.Sequential(super().build_head(representation_shape), _UnitNormal())

    def align(self, output: Tensor, target: Tensor) -> Tensor:
        resized = super().align(output, target)
        # bilinear interpolation of unit vectors shortens them
        return resized if resized is output else F.normalize(resized, dim=1)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean ``1 - cos(pred, target)`` over the batch's valid pixels (0 for a batch with none)."""
        valid = valid_normals(target)
        cosine = F.cosine_similarity(output, target.to(output.dtype), dim=1)  # (B, H, W)
        return torch.where(valid, 1 - cosine, torch.zeros_like(cosine)).sum() / valid.sum().clamp_min(1)

    def metrics(self) -> dict[str, Metric]:
        return {"mean_angle": MeanAngularError(), "median_angle": MedianAngularError(),
                "within_11_25": AngleWithin(11.25), "within_22_5": AngleWithin(22.5), "within_30": AngleWithin(30.0)}

    def check_target(self, target: Tensor) -> None:
        if not target.is_floating_point() or target.ndim != 4 or target.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) float normals, got a {tuple(target.shape)} {target.dtype} tensor")
        if not torch.isfinite(target).all():
            raise ValueError("normal targets must be finite: mark pixels without a normal with (0, 0, 0), not NaN")
