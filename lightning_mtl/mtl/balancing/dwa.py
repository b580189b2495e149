"""Dynamic Weight Average (DWA).

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, arXiv:1803.10704.

    w_k(t) = K * softmax_k(r_k(t-1) / T),    r_k(t-1) = L_k(t-1) / L_k(t-2)

where L_k(t) is task k's loss averaged over period t and T the temperature: a task whose loss fell less over the last
period gets more weight. Weights are 1 until two periods have been completed.

The paper averages over epochs. A balancer does not know the epoch length, so the period is ``period`` optimizer
steps (:meth:`DWA.after_step` calls): the default 1 is per-step DWA (LibMTL's ``DWA`` also works per epoch); set it
to the number of training batches per epoch to recover the paper. The history lives in registered buffers, so it is
saved in and restored from checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.mtl.balancing.base import LossWeighting
from lightning_mtl.mtl.balancing.registry import register_balancer


@register_balancer("dwa")
class DWA(LossWeighting):
    """``sum_k w_k L_k`` with weights from the ratio of the last two period-average losses.

    Args:
        tasks: task names; the losses passed to :meth:`forward` must have exactly these keys.
        temperature: T; larger values make the weights more uniform (the paper uses 2).
        period: optimizer steps averaged into one history entry; 1 compares consecutive steps, the number of
            batches per epoch gives the paper's epoch averages.

    Raises:
        ValueError: if ``temperature`` is not positive or ``period`` is below 1.
    """

    def __init__(self, tasks: list[str], temperature: float = 2.0, period: int = 1) -> None:
        super().__init__(tasks)
        if temperature <= 0:
            raise ValueError(f"DWA temperature must be positive, got {temperature}")
        if period < 1:
            raise ValueError(f"DWA period must be >= 1 step, got {period}")
        self.temperature = temperature
        self.period = period
        k = len(self.tasks)
        self.register_buffer("history", torch.ones(2, k))  # (2, tasks): averages of periods t-2 and t-1
        self.register_buffer("running_sum", torch.zeros(k))  # (tasks,): sum over the current period
        self.register_buffer("running_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("periods_done", torch.zeros((), dtype=torch.long))

    def current_weights(self) -> Tensor:
        """The ``(tasks,)`` weights the next :meth:`forward` uses."""
        if self.periods_done < 2:
            return torch.ones_like(self.running_sum)
        # A loss of exactly 0 two periods ago would give an infinite ratio, hence NaN weights.
        ratio = self.history[1] / self.history[0].clamp_min(torch.finfo(self.history.dtype).tiny)
        return len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0)

    def forward(self, losses: dict[str, Tensor], shared_params: list[Tensor] | None = None) -> Tensor:
        """The DWA-weighted sum of ``losses`` (the weights are constants).

        Raises:
            ValueError: if the keys of ``losses`` are not the tasks.
        """
        stacked = self._stack_losses(losses)  # (tasks,)
        weights = self.current_weights().to(stacked)
        self.weights = weights
        return (weights * stacked).sum()

    @torch.no_grad()
    def after_step(self, losses: dict[str, Tensor]) -> None:
        """Add the losses of the step just taken to the history.

        Raises:
            ValueError: if the keys of ``losses`` are not the tasks.
        """
        self.running_sum += self._stack_losses(losses).detach().to(self.running_sum)
        self.running_count += 1
        if self.running_count >= self.period:
            self.history.copy_(torch.stack([self.history[1], self.running_sum / self.running_count]))
            self.running_sum.zero_()
            self.running_count.zero_()
            self.periods_done += 1
