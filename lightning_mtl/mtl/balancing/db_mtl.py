"""DB-MTL: Dual-Balancing Multi-Task Learning.

Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang & Kwok, "Dual-Balancing for Multi-Task Learning", arXiv:2308.12029
(2023).

Two balances, one of the loss scales and one of the gradient magnitudes:

* loss scales: each task's loss is replaced by log(L_k + eps), whose gradient is h_k = g_k / (L_k + eps) for the
  task gradient g_k (a task's loss scale no longer matters; needs the losses);
* gradient magnitudes: an exponential moving average of the log-loss gradients, at step t = 1, 2, ...

      m_k <- beta_t m_k + (1 - beta_t) h_k,    beta_t = beta / t^beta_sigma,    m_k = 0 at the start,

  is rescaled so every task has the largest task's norm: update = sum_k (max_j ||m_j|| / ||m_k||) m_k.

As in the authors' LibMTL implementation the average starts at zero without bias correction (the first update is
(1 - beta) times the balanced gradients) and eps = 1e-8 is added to each norm. :attr:`weights` are the
normalisation factors max_j ||m_j|| / ||m_k||, the weights of the averaged log-gradients m_k (not of the current
matrix's rows). Deviation: the task-specific parameters (heads) receive whatever gradient the model gives them (the
losses', not the log-losses'): an aggregator only sees the shared gradients.

The average has one column per gradient entry, unknown until the first call: it is allocated then, a ``state_dict``
taken before that holds a (tasks, 0) placeholder, and loading a state resizes it, so checkpoints resume exactly. It
costs K copies of the shared parameters in memory; a change of gradient width between steps (a smaller last batch
at representation level) raises an error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.mtl.balancing.base import GradientAggregator
from lightning_mtl.mtl.balancing.registry import register_balancer


@register_balancer("db_mtl")
class DBMTL(GradientAggregator):
    """Moving average of log-loss gradients, each rescaled to the largest task's norm, summed.

    Args:
        tasks: task names, in the order of the matrix rows.
        beta: weight of the past in the moving average (LibMTL's default 0.9; 0 uses the current step only).
        beta_sigma: decay exponent of that weight, beta_t = beta / t^beta_sigma (LibMTL's default 0: constant).
        eps: added to the losses inside the logarithm and to the gradient norms.

    Raises:
        ValueError: for ``beta`` outside [0, 1) or a negative ``beta_sigma`` or ``eps``.
    """

    needs_losses = True
    lazy_buffers = ("grad_ema",)  # (K, D), sized at the first call

    def __init__(self, tasks: list[str], beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8) -> None:
        super().__init__(tasks)
        if not 0 <= beta < 1:
            raise ValueError(f"DB-MTL beta must be in [0, 1), got {beta}")
        if beta_sigma < 0 or eps < 0:
            raise ValueError(f"DB-MTL beta_sigma and eps must be non-negative, got {beta_sigma} and {eps}")
        self.beta, self.beta_sigma, self.eps = beta, beta_sigma, eps
        self.register_buffer("grad_ema", torch.zeros(len(self.tasks), 0))  # m: (K, D) once the first matrix is seen
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        """Fold the log-loss gradients of ``matrix`` and ``losses`` into the average (in training mode) and return
        the balanced sum.

        Raises:
            ValueError: a matrix of the wrong shape or width, or no ``(tasks,)`` losses.
        """
        self._check_matrix(matrix)
        if losses is None or losses.shape != (len(self.tasks),):
            raise ValueError(f"DB-MTL needs the ({len(self.tasks)},) task losses, got "
                             f"{None if losses is None else tuple(losses.shape)}")
        if self.grad_ema.shape[1] != matrix.shape[1]:
            if self.steps > 0:
                raise ValueError(f"DB-MTL averages gradients of width {self.grad_ema.shape[1]}, got {matrix.shape[1]}: "
                                 f"the gradient must have the same entries at every step (use level='parameter')")
            dtype = torch.promote_types(matrix.dtype, torch.float32)
            self.grad_ema = torch.zeros(matrix.shape, dtype=dtype, device=matrix.device)
        if self.training:
            with torch.no_grad():
                log_grads = matrix.to(self.grad_ema) / (losses.to(self.grad_ema) + self.eps)[:, None]  # (K, D)
                self.steps += 1
                beta_t = self.beta / self.steps.to(self.grad_ema.dtype) ** self.beta_sigma
                self.grad_ema.lerp_(log_grads, 1 - beta_t)  # beta_t m + (1 - beta_t) h
        norms = torch.linalg.vector_norm(self.grad_ema, dim=1)  # (K,)
        factors = norms.max() / (norms + self.eps)
        self.weights = factors.detach()
        return (factors @ self.grad_ema).to(matrix.dtype)
