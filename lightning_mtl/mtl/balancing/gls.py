"""GLS: Geometric Loss Strategy.

Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy
for Multi-Task Learning", CVPR Workshops 2019, arXiv:1904.08492.

The loss is the geometric mean of the K task losses,

    L = (prod_k L_k)^(1/K),   whose gradient is sum_k (L / (K L_k)) grad L_k,

so each task is weighted by the inverse of its own loss: a task whose loss is 10x smaller gets a 10x larger weight,
which makes the method insensitive to the scale of each loss (no hyper-parameter). The value is computed as
exp(mean_k log L_k), equal to the product form but free of the product's underflow or overflow with many tasks or
very small or large losses; the gradient is the same. The losses must be positive: a zero loss makes L = 0 and that
task's weight infinite, a negative one makes L NaN (a step the model then skips). LibMTL's ``GLS`` back-propagates the
same loss; the weights it reports, L_k / (K prod_j L_j), are not the gradient's weights (``self.weights`` here are).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.mtl.balancing.base import LossWeighting
from lightning_mtl.mtl.balancing.registry import register_balancer


@register_balancer("gls")
class GeometricLossStrategy(LossWeighting):
    """The geometric mean of the task losses; no hyper-parameter.

    Args:
        tasks: task names; the losses passed to :meth:`forward` must have exactly these keys.
    """

    def forward(self, losses: dict[str, Tensor], shared_params: list[Tensor] | None = None) -> Tensor:
        """``(prod_k L_k)^(1/K)``, differentiable in every loss.

        Raises:
            ValueError: if the keys of ``losses`` are not the tasks.
        """
        stacked = self._stack_losses(losses)  # (tasks,)
        loss = torch.exp(torch.log(stacked).mean())
        # d L / d L_k = L / (K L_k): the weight each task gradient enters the update with.
        self.weights = (loss / (len(self.tasks) * stacked)).detach()
        return loss
