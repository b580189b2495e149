"""Uncertainty weighting: learned homoscedastic task uncertainty.

Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics",
CVPR 2018, arXiv:1705.07115.

Each task has a learnable log-variance s_k = log sigma_k^2 and the loss is

    L = sum_k exp(-s_k) * L_k + s_k.

This is twice the paper's regression form 1/(2 sigma_k^2) L_k + log sigma_k, which LibMTL applies to every task:
the factor 2 only doubles the gradients, so both share the optimum s_k = log L_k and the relative task weights
exp(-s_k) = 1/L_k there. One form is used for every task, classification included (the paper's classification
approximation 1/sigma^2 L + log sigma settles at sigma^2 = 2 L, where its weight 1/(2 L) is again proportional to
1/L). The log-variance is learned instead of sigma so the weight exp(-s_k) stays positive without constraints.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_mtl.mtl.balancing.base import LossWeighting
from lightning_mtl.mtl.balancing.registry import register_balancer


@register_balancer("uncertainty")
class UncertaintyWeighting(LossWeighting):
    """``sum_k exp(-s_k) L_k + s_k`` with learnable log-variances ``s``.

    ``log_vars`` is an ``nn.Parameter`` of this module: a :class:`~lightning_mtl.mtl.MultiTaskModule` holding the
    balancer optimises it with the model's optimizer, as in the paper. Avoid weight decay on it (decay pulls every
    ``s_k`` towards 0, i.e. back to equal weights).

    Args:
        tasks: task names; the losses passed to :meth:`forward` must have exactly these keys.
        init_log_var: initial ``s_k`` for every task; 0 gives equal weights at the start (LibMTL uses -0.5).
    """

    def __init__(self, tasks: list[str], init_log_var: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init_log_var)))

    def forward(self, losses: dict[str, Tensor], shared_params: list[Tensor] | None = None) -> Tensor:
        """The uncertainty-weighted loss, differentiable in the model and in ``log_vars``.

        Raises:
            ValueError: if the keys of ``losses`` are not the tasks.
        """
        stacked = self._stack_losses(losses)  # (tasks,)
        precision = torch.exp(-self.log_vars)  # 1 / sigma_k^2
        self.weights = precision.detach()
        return (precision * stacked + self.log_vars).sum()
