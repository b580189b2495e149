"""Random Loss Weighting (RLW).

Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning",
TMLR 2022, arXiv:2111.10603.

Every step draws fresh weights w = softmax(z), z ~ N(0, I_K), and returns sum_k w_k L_k. The weights sum to 1 (the
paper's normal-softmax variant and LibMTL's ``RLW``), not to K: the loss is on the scale of the mean of the task
losses, 1/K of ``"equal"``'s sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.mtl.balancing.base import LossWeighting
from lightning_mtl.mtl.balancing.registry import register_balancer


@register_balancer("rlw")
class RandomLossWeighting(LossWeighting):
    """``sum_k w_k L_k`` with ``w = softmax(N(0, I))`` drawn anew at every call.

    The draw uses the global generator of the losses' device (``torch.randn``), so ``seed_everything`` makes it
    reproducible; it is also drawn in evaluation, where the weighted loss is only a diagnostic.

    Args:
        tasks: task names; the losses passed to :meth:`forward` must have exactly these keys.
    """

    def forward(self, losses: dict[str, Tensor], shared_params: list[Tensor] | None = None) -> Tensor:
        """The randomly weighted sum of ``losses``.

        Raises:
            ValueError: if the keys of ``losses`` are not the tasks.
        """
        stacked = self._stack_losses(losses)  # (tasks,)
        # Draw in float32 at least: half-precision normal samples would make coarse, tied weights.
        dtype = torch.promote_types(stacked.dtype, torch.float32)
        weights = torch.softmax(torch.randn(len(self.tasks), device=stacked.device, dtype=dtype), dim=0)
        self.weights = weights.detach()
        return (weights * stacked).sum()
