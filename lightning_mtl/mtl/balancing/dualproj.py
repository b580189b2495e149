"""DualProj: the preference-weighted average of the task gradients, projected onto their dual cone.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, arXiv:2406.16232; the projection is
Equation 11 of Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017,
arXiv:1706.08840.

With G the (K, D) matrix of task gradients and g = w^T G the average (w = 1/K each by default),

    update = argmin_{d : G d >= 0} ||d - g||^2,

the closest direction to the average that decreases no task loss to first order. torchjd solves the dual, a
K-dimensional quadratic program on the Gramian G G^T (quadprog), so the update is ``weights @ G`` with
``weights = w + mu``, mu >= 0 the multipliers of the violated constraints. When the average conflicts with no task,
it is returned unchanged. UPGrad (``"upgrad"``) projects every gradient instead of their average.

torchjd solves the program on the Gramian divided by its trace plus ``reg_eps`` times the identity, which keeps
quadprog stable when gradients are nearly dependent but relaxes the constraints to G d >= -reg_eps tr(G G^T) weights:
set ``reg_eps=0`` for the exact projection of linearly independent gradients.
"""

from __future__ import annotations

import torchjd.aggregation as tjd
from torchjd.linalg import QuadprogProjector

from lightning_mtl.mtl.balancing.registry import register_balancer
from lightning_mtl.mtl.balancing.torchjd_aggregator import TorchJDAggregator


@register_balancer("dualproj")
class DualProj(TorchJDAggregator):
    """The average task gradient, projected onto the dual cone of the task gradients (non-conflicting).

    Args:
        tasks: task names, in the order of the matrix rows.
        pref_vector: one weight per task for the average that is projected; ``None`` gives ``1/K`` each.
        norm_eps: a Gramian whose trace is below this is not normalised (guards the division).
        reg_eps: added to the diagonal of the normalised Gramian (torchjd's default; 0 is the exact projection).

    Raises:
        ValueError: for a negative ``norm_eps`` or ``reg_eps``.
    """

    def __init__(
        self, tasks: list[str], pref_vector: list[float] | None = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4
    ) -> None:
        projector = QuadprogProjector(norm_eps=norm_eps, reg_eps=reg_eps)  # raises for negative values
        super().__init__(tasks, tjd.DualProj(projector=projector), {"pref_vector": pref_vector})
