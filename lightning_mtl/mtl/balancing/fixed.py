"""Fixed weighting: a hand-chosen constant weight per task, L = sum_k w_k L_k (the classic grid-searched baseline)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.mtl.balancing.base import LossWeighting
from lightning_mtl.mtl.balancing.registry import register_balancer


@register_balancer("fixed")
class FixedWeighting(LossWeighting):
    """Constant weights, in the order of ``tasks``; not normalised (weights ``[1, 1]`` equal ``"equal"``).

    Args:
        tasks: task names; the losses passed to :meth:`forward` must have exactly these keys.
        weights: one weight per task, in the order of ``tasks``; ``None`` gives every task weight 1.

    Raises:
        ValueError: if ``weights`` does not have one entry per task.
    """

    def __init__(self, tasks: list[str], weights: list[float] | None = None) -> None:
        super().__init__(tasks)
        weights = [1.0] * len(self.tasks) if weights is None else list(weights)
        if len(weights) != len(self.tasks):
            raise ValueError(
                f"fixed weighting expected {len(self.tasks)} weights (one per task {self.tasks}), got {len(weights)}; "
                f"give the balancer's weights one weight per task, in task order."
            )
        # Non-persistent: the weights are a hyper-parameter (saved with the module's hparams), not training state.
        self.register_buffer("fixed_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)

    def forward(self, losses: dict[str, Tensor], shared_params: list[Tensor] | None = None) -> Tensor:
        """``sum_k w_k L_k``.

        Raises:
            ValueError: if the keys of ``losses`` are not the tasks.
        """
        stacked = self._stack_losses(losses)  # (tasks,)
        weights = self.fixed_weights.to(stacked.dtype)
        self.weights = weights.detach()
        return (weights * stacked).sum()
