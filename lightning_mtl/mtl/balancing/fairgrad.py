"""FairGrad: alpha-fair resource allocation between the tasks.

Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, arXiv:2402.15638 (Equation 4, Algorithm 1).

The update d = G^T w (G the (K, D) matrix of task gradients) maximises the alpha-fair utility of the tasks'
first-order loss decreases g_k . d; its weights w > 0 solve

    (G G^T) w = w^(-1/alpha)      (element-wise power),

found, as in the official code, by ``scipy.optimize.least_squares`` on that residual with w >= 0, started from
uniform weights at every call (the official code does not warm-start either, so the method is stateless). ``alpha``
selects the fairness: 0 is linear scalarisation (the mean gradient, returned without solving), 1 is proportional
fairness (the weights of Nash-MTL, (G G^T) w = 1/w), and alpha -> infinity approaches max-min fairness. The
mathematics is torchjd's ``FairGrad``; it needs scipy (torchjd's ``fairgrad`` extra).
"""

from __future__ import annotations

import torchjd.aggregation as tjd

from lightning_mtl.mtl.balancing.registry import register_balancer
from lightning_mtl.mtl.balancing.torchjd_aggregator import TorchJDAggregator


@register_balancer("fairgrad")
class FairGrad(TorchJDAggregator):
    """The alpha-fair combination of the task gradients.

    Args:
        tasks: task names, in the order of the matrix rows.
        alpha: the fairness parameter; 1.0 (proportional fairness) is LibMTL's default, torchjd has none. The paper
            tunes it per benchmark.
        max_iters: maximum residual evaluations of the least-squares solver; ``None`` keeps scipy's ``100 * K``.

    Raises:
        ValueError: for a negative ``alpha`` or a ``max_iters`` below 1.
    """

    def __init__(self, tasks: list[str], alpha: float = 1.0, max_iters: int | None = None) -> None:
        if alpha < 0:
            raise ValueError(f"FairGrad alpha must be >= 0 (0: mean gradient, 1: proportional fairness), got {alpha}")
        if max_iters is not None and max_iters < 1:
            raise ValueError(f"FairGrad max_iters must be >= 1 or None (scipy's default), got {max_iters}")
        super().__init__(tasks, tjd.FairGrad(alpha=alpha, max_iters=max_iters))
