"""RGW: Random Gradient Weighting.

Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning",
TMLR 2022, arXiv:2111.10603 (Algorithm 2).

Every call draws fresh weights w = softmax(z), z ~ N(0, I_K), and returns sum_k w_k g_k: the gradient counterpart of
RLW (``"rlw"``), which draws the same weights for the losses. In expectation the two agree; RGW needs the per-task
gradients. The mathematics is torchjd's ``Random``; the draw uses the global generator of the matrix's device
(``torch.randn`` in float32, or float64 for a float64 matrix), so ``seed_everything`` makes it reproducible.
"""

from __future__ import annotations

import torchjd.aggregation as tjd

from lightning_mtl.mtl.balancing.registry import register_balancer
from lightning_mtl.mtl.balancing.torchjd_aggregator import TorchJDAggregator


@register_balancer("rgw")
class RandomGradientWeighting(TorchJDAggregator):
    """``sum_k w_k g_k`` with ``w = softmax(N(0, I))`` drawn anew at every call (weights on the simplex).

    Args:
        tasks: task names, in the order of the matrix rows.
    """

    def __init__(self, tasks: list[str]) -> None:
        super().__init__(tasks, tjd.Random())
