"""PCD: Priority-Constrained Descent, for one primary task and secondary (auxiliary) tasks.

"Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical Multi-Objective Optimization",
TMLR 2026 (https://openreview.net/forum?id=HT01yGHLEt; arXiv:2606.29521 as cited by torchjd 0.18; reference code
github.com/DaraVaram/priority-constrained-descent).

The update follows the primary gradient g_1 as closely as possible while every secondary task j keeps at least a
fraction tau_j of the first-order progress of a step along its own normalised gradient:

    d~ = argmin_d 1/2 ||d - g~_1||^2   subject to   g~_j . d >= tau_j ||g~_j||^2   (j = 2..K),
    g~_k = g_k / sqrt(v_k + eps),     v_k = bias-corrected EMA (decay beta) of ||g_k||^2 over the calls,

and d~ is rescaled to the norm of g_1 (so tau is scale-free). The solution is sum_k w_k g_k with w the KKT
multipliers (w_1 = 1 before rescaling); infeasible constraints are dropped (update g_1), a zero g_1 gives a zero
update. The mathematics is torchjd's ``PCD`` (a dual active-set solver instead of the paper's enumeration of working
sets; same minimiser).

The method is asymmetric: ``primary`` names the primary task (default: the first task); the rows are reordered for
torchjd and ``self.weights`` are reported in task order. The EMA is torchjd's float64 CPU buffer, created at
construction so every ``state_dict`` has it (a module cast to 16 bits rounds it once; it is used in float64).
"""

from __future__ import annotations

import torch
import torchjd.aggregation as tjd
from torch import Tensor

from lightning_mtl.mtl.balancing.registry import register_balancer
from lightning_mtl.mtl.balancing.torchjd_aggregator import TorchJDAggregator


@register_balancer("pcd")
class PCD(TorchJDAggregator):
    """The primary task's gradient, bent just enough to guarantee every secondary task a share of progress.

    Args:
        tasks: task names, in the order of the matrix rows.
        tau: the guaranteed fraction in [0, 1] of normalised progress: one value for every secondary task, or a list
            with one value per secondary task (in task order, the primary left out).
        beta: decay in [0, 1) of the EMA of the squared gradient norms.
        eps: non-negative constant added to the EMA before its inverse square root.
        primary: the primary task; ``None`` makes it the first of ``tasks``.

    Raises:
        ValueError: for an unknown ``primary``, a ``tau`` list without one entry per secondary task, or a value out
            of range.
    """

    def __init__(
        self,
        tasks: list[str],
        tau: float | list[float] = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
        primary: str | None = None,
    ) -> None:
        if isinstance(tau, (list, tuple)):
            if len(tau) != len(tasks) - 1:
                raise ValueError(f"PCD tau needs one value per secondary task ({len(tasks) - 1}), got {len(tau)}")
            tau = torch.tensor(tau, dtype=torch.float64)
        super().__init__(tasks, tjd.PCD(tau=tau, beta=beta, eps=eps))  # torchjd checks the ranges
        if primary is not None and primary not in self.tasks:
            raise ValueError(f"PCD primary must be one of the tasks {self.tasks}, got {primary!r}")
        first = self.tasks.index(primary) if primary is not None else 0
        self._order = [first] + [i for i in range(len(self.tasks)) if i != first]  # primary row first
        self.aggregator.gramian_weighting._ensure_state(len(self.tasks))

    def forward(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        """The ``(dims,)`` PCD update of the ``(tasks, dims)`` matrix; advances the EMA (``losses`` is not read).

        Raises:
            ValueError: if ``matrix`` is not a matrix with one row per task.
        """
        self._check_matrix(matrix)
        if self._order[0] == 0:
            return super().forward(matrix, losses)
        update = super().forward(matrix[self._order], losses)  # a reordered copy of the matrix
        weights = torch.empty_like(self.weights)
        weights[self._order] = self.weights
        self.weights = weights
        return update
