"""MoDo: multi-objective gradient with double sampling.

Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
Conflict-Avoidance", NeurIPS 2023 (JMLR 2024), arXiv:2305.20057.

MoDo tracks MGDA's weights with one projected gradient step per call instead of solving for them:

    lambda <- Proj_simplex(lambda - gamma (G_1 G_2^T lambda + rho lambda)),      update = lambda^T G_3,

the gradient of 1/2 ||G^T lambda||^2 + rho/2 ||lambda||^2 (with rho = 0, lambda converges to MGDA's min-norm weights
on a fixed matrix). The mathematics is torchjd's ``MoDoWeighting`` (simplex projection of the official code).

Deviation: the paper draws G_1, G_2 and G_3 from independent mini-batches so that G_1 G_2^T is an unbiased estimate
of G G^T. A :class:`~lightning_mtl.mtl.balancing.base.GradientAggregator` sees one ``(tasks, dims)`` matrix per step,
so here G_1 = G_2 = G_3 = G: the single-sample variant, whose lambda update is biased (the convergence guarantee needs
the double sampling). lambda is torchjd's buffer, created at construction so every ``state_dict`` has it.
"""

from __future__ import annotations

import torch
import torchjd.aggregation as tjd
from torch import Tensor

from lightning_mtl.mtl.balancing.registry import register_balancer
from lightning_mtl.mtl.balancing.torchjd_aggregator import TorchJDAggregator


@register_balancer("modo")
class MoDo(TorchJDAggregator):
    """One projected-gradient step on the MGDA weights per call, then their combination of the task gradients.

    Args:
        tasks: task names, in the order of the matrix rows.
        gamma: step size of the lambda update (torchjd's default; LibMTL's is 1e-3). The step is taken on the raw
            Gramian, so a good value depends on the squared gradient norms.
        rho: l2 regularisation of lambda (pulls it towards uniform weights).

    Raises:
        ValueError: for a non-positive ``gamma`` or a negative ``rho``.
    """

    def __init__(self, tasks: list[str], gamma: float = 0.1, rho: float = 0.1) -> None:
        if gamma <= 0 or rho < 0:
            raise ValueError(f"MoDo needs gamma > 0 and rho >= 0, got gamma={gamma}, rho={rho}")
        super().__init__(tasks, tjd.GramianWeightedAggregator(tjd.MoDoWeighting(gamma=gamma, rho=rho)))
        # torchjd creates lambda (uniform) at the first call; creating it now puts it in every state_dict.
        k = len(self.tasks)
        self.aggregator.gramian_weighting._ensure_state(torch.zeros(k, k))

    def forward(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        """The ``(dims,)`` update of the ``(tasks, dims)`` matrix after one lambda step (``losses`` is not read).

        Raises:
            ValueError: if ``matrix`` is not a matrix with one row per task.
        """
        self._check_matrix(matrix)
        state = self.aggregator.gramian_weighting
        dtype = torch.promote_types(matrix.dtype, torch.float32)
        # torchjd restarts lambda when the call's (tasks, dtype, device) differs from its key, which load_state_dict,
        # .to() and .half() do not update: continue from the current lambda on this call's device and dtype.
        state._lambda = state._lambda.to(device=matrix.device, dtype=dtype)
        state._state_key = (len(self.tasks), dtype, matrix.device)
        return super().forward(matrix, losses)
