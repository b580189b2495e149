"""Equal weighting: the plain sum of the task losses, the baseline every balancing method is compared against.

L = sum_k L_k. The convention is the sum, not the mean: each task's gradient enters with weight 1, as in LibMTL's
``EW``; divide the learning rate by the number of tasks to recover the mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.mtl.balancing.base import LossWeighting
from lightning_mtl.mtl.balancing.registry import register_balancer


@register_balancer("equal")
class EqualWeighting(LossWeighting):
    """Sum of the task losses (all weights 1).

    Args:
        tasks: task names; the losses passed to :meth:`forward` must have exactly these keys.
    """

    def forward(self, losses: dict[str, Tensor], shared_params: list[Tensor] | None = None) -> Tensor:
        """The sum of ``losses``.

        Raises:
            ValueError: if the keys of ``losses`` are not the tasks.
        """
        stacked = self._stack_losses(losses)  # (tasks,)
        self.weights = torch.ones_like(stacked).detach()
        return stacked.sum()
