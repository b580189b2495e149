"""CR-MOGM: correlation-reduced stochastic multi-objective gradient manipulation.

Zhou, Zhang, Jiang, Zhong, Gu & Zhu, "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and
Beyond", NeurIPS 2022.

Stochastic MGDA-type methods compute their weights lambda^_t from the same mini-batch gradients they then combine; the
correlation between the two biases the update, and they need not converge. CR-MOGM smooths the weights across steps,

    lambda_t = alpha lambda_{t-1} + (1 - alpha) lambda^_t,      update = lambda_t^T G_t,

with lambda_0 = ``initial_weights`` or, by default, lambda^_1 (the first update is then the base method's). The paper
lets alpha_t grow towards 1 as the learning rate decays (Corollary 1); here alpha is a constant, torchjd's convention
(``CRMOGMWeighting``).

CR-MOGM modifies another aggregator, the ``base`` (MGDA in the paper; any registered aggregator that combines the task
gradients linearly, i.e. reports ``weights``): the base is called on the matrix for lambda^_t, and its own update is
replaced by the smoothed combination. So this class holds a balancer rather than a torchjd aggregator; the result
equals torchjd's ``CRMOGMWeighting`` wrapped around the base's weighting. lambda and whether it was started are
buffers; the base's own state lives in the same ``state_dict`` under ``base.``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_mtl.mtl.balancing.base import GradientAggregator
from lightning_mtl.mtl.balancing.registry import create_balancer, register_balancer


@register_balancer("cr_mogm")
class CRMOGM(GradientAggregator):
    """An exponential moving average of another aggregator's task weights.

    Args:
        tasks: task names, in the order of the matrix rows.
        alpha: weight in [0, 1] of the previous weights; 0 is the base method, 1 freezes the first weights.
        base: the registered name (or class path) of the aggregator whose weights are smoothed.
        base_args: the base's hyper-parameters (e.g. ``{"c": 0.5}`` for ``"cagrad"``); ``None`` keeps its defaults.
        initial_weights: lambda_0, one weight per task; ``None`` starts from the base's first weights.

    Raises:
        ValueError: for ``alpha`` outside [0, 1], ``initial_weights`` without one entry per task, or a ``base`` that
            is not a gradient aggregator.
    """

    def __init__(
        self,
        tasks: list[str],
        alpha: float = 0.9,
        base: str = "mgda",
        base_args: dict[str, Any] | None = None,
        initial_weights: list[float] | None = None,
    ) -> None:
        super().__init__(tasks)
        if not 0 <= alpha <= 1:
            raise ValueError(f"CR-MOGM alpha must be in [0, 1], got {alpha}")
        k = len(self.tasks)
        if initial_weights is not None and len(initial_weights) != k:
            raise ValueError(f"initial_weights needs one entry per task {self.tasks}, got {len(initial_weights)}")
        self.base = create_balancer(base, self.tasks, **(base_args or {}))
        if not isinstance(self.base, GradientAggregator):
            raise ValueError(f"CR-MOGM smooths a gradient aggregator's weights; {base!r} is a loss weighting")
        self.needs_losses = self.base.needs_losses
        self.alpha = alpha
        start = torch.zeros(k) if initial_weights is None else torch.tensor(initial_weights, dtype=torch.float32)
        self.register_buffer("smoothed", start)  # lambda_{t-1}
        self.register_buffer("started", torch.tensor(initial_weights is not None))

    def forward(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        """The ``(dims,)`` combination of the ``(tasks, dims)`` matrix with the smoothed weights.

        Raises:
            ValueError: if ``matrix`` is not a matrix with one row per task, or the base reports no weights.
        """
        self._check_matrix(matrix)
        self.base(matrix, losses)  # for its weights lambda^_t; its update is discarded
        if self.base.weights is None:
            raise ValueError(f"CR-MOGM needs task weights, but {type(self.base).__name__} does not combine the task "
                             "gradients linearly; choose another base")
        current = self.base.weights.to(self.smoothed)
        # Branch on the device, not the host: lambda_0 is lambda^_1 unless the run started from initial_weights.
        previous = torch.where(self.started, self.smoothed, current)
        self.smoothed.copy_(self.alpha * previous + (1 - self.alpha) * current)
        self.started.fill_(True)
        dtype = torch.promote_types(matrix.dtype, torch.float32)
        self.weights = self.smoothed.detach().clone()
        return (self.smoothed.to(dtype) @ matrix.to(dtype)).to(matrix.dtype)
