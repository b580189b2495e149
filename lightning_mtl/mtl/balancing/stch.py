"""STCH: Smooth Tchebycheff scalarisation of the log-normalised task losses.

Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective Optimization", ICML 2024,
arXiv:2402.19078; the multi-task recipe of the official ``STCH_MTL`` code (also LibMTL's ``STCH``).

The Tchebycheff scalarisation max_k lambda_k (f_k - z_k) optimises the worst task but is not smooth; STCH replaces
the max by its log-sum-exp smoothing with parameter mu. For multi-task learning the objectives are the log losses
relative to a nadir point n_k (the average loss of task k over a calibration period), with the ideal point z = 0:

    f_k = log(L_k / n_k + eps),      L = K mu log sum_k exp(lambda_k f_k / mu),

whose gradient weights task k by K softmax_k(lambda f / mu) lambda_k / (L_k + eps n_k): the worst-off task (relative
to its nadir) dominates as mu -> 0, and max_k lambda_k f_k <= L / K <= max_k lambda_k f_k + mu log K. Before and during
the calibration the loss is sum_k log(L_k + eps) (every task weighted by 1 / L_k). eps = 1e-20 as in the official code.

Deviations: the official code counts epochs (4 warm-up epochs, then one epoch averaging the nadir); a balancer does not
know the epoch length, so both periods are counted in optimizer steps (:meth:`after_step` calls): set them to the
number of batches per epoch times the epochs. The official value subtracts the (detached) max of the exponents and
does not add it back; the value here is the unshifted one (same gradient). The official code has no preference vector
(lambda = 1); ``preference`` adds the paper's lambda. The nadir is a buffer and the step count extra state, so
checkpoints resume exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_mtl.mtl.balancing.base import LossWeighting
from lightning_mtl.mtl.balancing.registry import register_balancer

_EPS = 1e-20  # the official code's, inside the logarithms


@register_balancer("stch")
class STCH(LossWeighting):
    """Smooth Tchebycheff scalarisation of ``log(L_k / nadir_k)`` after a warm-up and a nadir calibration period.

    Args:
        tasks: task names; the losses passed to :meth:`forward` must have exactly these keys.
        mu: smoothing; smaller is closer to the max over tasks (the official MTL code and LibMTL use 1.0; the paper
            evaluates 0.01 to 1).
        warmup_steps: optimizer steps trained on ``sum_k log L_k`` before the nadir is measured (the official code:
            4 epochs).
        nadir_steps: the following steps, also on ``sum_k log L_k``, whose average losses are the nadir point (the
            official code: 1 epoch); 0 uses a nadir of 1 (no normalisation).
        preference: lambda, one positive weight per task; ``None`` gives ones (the official code).

    Raises:
        ValueError: for a non-positive ``mu``, a negative period, or a ``preference`` without one positive entry per
            task.
    """

    def __init__(
        self,
        tasks: list[str],
        mu: float = 1.0,
        warmup_steps: int = 0,
        nadir_steps: int = 1,
        preference: list[float] | None = None,
    ) -> None:
        super().__init__(tasks)
        if mu <= 0:
            raise ValueError(f"STCH mu must be positive, got {mu}")
        if warmup_steps < 0 or nadir_steps < 0:
            raise ValueError(f"STCH warmup_steps and nadir_steps must be >= 0, got {warmup_steps}, {nadir_steps}")
        k = len(self.tasks)
        if preference is not None and (len(preference) != k or min(preference) <= 0):
            raise ValueError(f"STCH preference needs one positive entry per task {self.tasks}, got {preference}")
        self.mu, self.warmup_steps, self.nadir_steps = mu, warmup_steps, nadir_steps
        self.register_buffer("preference", torch.ones(k) if preference is None else torch.tensor(preference),
                             persistent=False)
        self.register_buffer("nadir", torch.ones(k))
        self.register_buffer("nadir_sum", torch.zeros(k))
        self.steps = 0  # a Python int, so that choosing the phase never synchronises the device

    @property
    def calibrating(self) -> bool:
        """Whether the loss is still ``sum_k log L_k`` (warm-up or nadir period)."""
        return self.steps < self.warmup_steps + self.nadir_steps

    def forward(self, losses: dict[str, Tensor], shared_params: list[Tensor] | None = None) -> Tensor:
        """The STCH loss (or ``sum_k log L_k`` while calibrating), differentiable in every loss.

        Raises:
            ValueError: if the keys of ``losses`` are not the tasks.
        """
        stacked = self._stack_losses(losses)  # (tasks,)
        if self.calibrating:
            self.weights = 1 / (stacked.detach() + _EPS)
            return torch.log(stacked + _EPS).sum()
        nadir = self.nadir.to(stacked.dtype)
        scaled = self.preference.to(stacked.dtype) * torch.log(stacked / nadir + _EPS) / self.mu  # (tasks,)
        k = len(self.tasks)
        share = torch.softmax(scaled.detach(), dim=0)
        self.weights = k * share * self.preference / (stacked.detach() + _EPS * nadir)
        return k * self.mu * torch.logsumexp(scaled, dim=0)

    @torch.no_grad()
    def after_step(self, losses: dict[str, Tensor]) -> None:
        """Count the step; during the nadir period, add its losses to the nadir average.

        Raises:
            ValueError: if the keys of ``losses`` are not the tasks.
        """
        stacked = self._stack_losses(losses).to(self.nadir_sum)
        self.steps += 1
        if self.warmup_steps < self.steps <= self.warmup_steps + self.nadir_steps:
            self.nadir_sum += stacked
            if self.steps == self.warmup_steps + self.nadir_steps:
                self.nadir.copy_(self.nadir_sum / self.nadir_steps)

    def get_extra_state(self) -> dict[str, Any]:
        """The number of steps taken, for checkpoints."""
        return {"steps": self.steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
