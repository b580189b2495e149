"""MoCo: stochastic Multi-objective gradient Correction.

Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in Multi-objective Learning: A Provably
Convergent Approach", ICLR 2023, arXiv:2210.12624.

MGDA's weights computed from one mini-batch's gradients make a biased update. MoCo tracks the true gradients with a
(tasks, dims) variable Y and moves the task weights lambda by projected gradient steps instead of solving MGDA's
problem at every step (the paper's Algorithm 1, with h_k the stochastic gradient of task k at step t = 1, 2, ...):

    Y_k      <- Y_k - beta_t (Y_k - h_k),                        beta_t  = beta  / t^beta_sigma
    lambda   <- Proj_simplex(lambda - gamma_t (Y Y^T + rho I) lambda),   gamma_t = gamma / t^gamma_sigma
    update   =  Y^T lambda

Y starts at zero and lambda at 1/K (as in the authors' code shared with LibMTL). Deviations and options:

* ``lambda_update="projection"`` is the paper's Euclidean projection onto the simplex; ``"softmax"`` replaces it by
  a softmax, as the authors' code in LibMTL does.
* ``gradient_scaling="loss"`` feeds h_k = L_k g_k / ||g_k|| (unit gradient times the loss), the normalisation of the
  authors' code in LibMTL; it needs the losses. The default ``"none"`` feeds the gradients themselves, as the paper.
  LibMTL's MoCo is ``lambda_update="softmax", gradient_scaling="loss"`` with the default steps.
* The paper's projection of Y onto a bounded set (an assumption of its analysis) is not applied.

Y has as many columns as the gradient has entries (the shared parameters, or the batch's representations with
``level="representation"``), unknown until the first call: it is allocated then, and a ``state_dict`` taken before
the first call holds a (tasks, 0) placeholder; loading a state resizes it, so checkpoints resume exactly. It costs K
copies of the shared parameters in memory. Since Y averages gradients over steps, the gradient must describe the
same quantities at every step: a change of width (a smaller last batch at representation level) raises an error.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_mtl.mtl.balancing.base import GradientAggregator
from lightning_mtl.mtl.balancing.registry import register_balancer


def project_to_simplex(v: Tensor) -> Tensor:
    """The Euclidean projection of the vector ``v`` onto the probability simplex (sort-based; Held, Wolfe &
    Crowder 1974, as in Duchi et al., ICML 2008)."""
    u, _ = torch.sort(v, descending=True)  # (K,)
    cumulative = u.cumsum(0) - 1
    index = torch.arange(1, v.numel() + 1, device=v.device, dtype=v.dtype)
    # the largest r with u_r > (sum_{i<=r} u_i - 1) / r; r = 1 always qualifies, so the count is at least 1
    r = (u > cumulative / index).sum()
    threshold = cumulative[r - 1] / r.to(v.dtype)
    return (v - threshold).clamp_min(0)


@register_balancer("moco")
class MoCo(GradientAggregator):
    """MoCo's update ``Y^T lambda`` from a tracked gradient matrix Y and simplex weights lambda.

    :attr:`weights` holds lambda, the weights of the tracked gradients Y (not of the current matrix's rows). The
    step defaults are LibMTL's (beta 0.5, beta_sigma 0.5, gamma 0.1, gamma_sigma 0.5, rho 0).

    Args:
        tasks: task names, in the order of the matrix rows.
        beta: step of the tracking update of Y (1 replaces Y by the current gradients).
        beta_sigma: decay exponent of that step, beta_t = beta / t^beta_sigma.
        gamma: step of the lambda update.
        gamma_sigma: decay exponent of that step, gamma_t = gamma / t^gamma_sigma.
        rho: l2 regularisation of lambda in its update (the paper's rho).
        lambda_update: ``"projection"`` (the paper) or ``"softmax"`` (the authors' code, LibMTL).
        gradient_scaling: ``"none"`` (the paper) or ``"loss"``: track L_k g_k / ||g_k|| (the authors' code, LibMTL).
        eps: added to the gradient norms when ``gradient_scaling="loss"``.

    Raises:
        ValueError: for a step outside (0, 1] for ``beta``, a negative ``gamma``, ``rho``, ``eps`` or decay, or an
            unknown ``lambda_update`` or ``gradient_scaling``.
    """

    lazy_buffers = ("tracked",)  # Y, (K, D), sized at the first call

    def __init__(
        self,
        tasks: list[str],
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        lambda_update: Literal["projection", "softmax"] = "projection",
        gradient_scaling: Literal["none", "loss"] = "none",
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks)
        if not 0 < beta <= 1:
            raise ValueError(f"MoCo beta must be in (0, 1], got {beta}")
        if min(gamma, rho, eps, beta_sigma, gamma_sigma) < 0:
            raise ValueError(f"MoCo gamma, rho, eps, beta_sigma and gamma_sigma must be non-negative, got "
                             f"gamma={gamma}, rho={rho}, eps={eps}, beta_sigma={beta_sigma}, gamma_sigma={gamma_sigma}")
        if lambda_update not in ("projection", "softmax"):
            raise ValueError(f"MoCo lambda_update must be 'projection' or 'softmax', got {lambda_update!r}")
        if gradient_scaling not in ("none", "loss"):
            raise ValueError(f"MoCo gradient_scaling must be 'none' or 'loss', got {gradient_scaling!r}")
        self.beta, self.beta_sigma, self.gamma, self.gamma_sigma, self.rho = beta, beta_sigma, gamma, gamma_sigma, rho
        self.lambda_update, self.gradient_scaling, self.eps = lambda_update, gradient_scaling, eps
        self.needs_losses = gradient_scaling == "loss"
        k = len(self.tasks)
        self.register_buffer("tracked", torch.zeros(k, 0))  # Y: (K, D) once the first matrix is seen
        self.register_buffer("lambd", torch.full((k,), 1.0 / k))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        """Update Y and lambda with the ``(tasks, dims)`` gradients (in training mode) and return ``Y^T lambda``.

        Raises:
            ValueError: a matrix of the wrong shape or width, or no ``(tasks,)`` losses when they are needed.
        """
        self._check_matrix(matrix)
        if self.tracked.shape[1] != matrix.shape[1]:
            if self.steps > 0:
                raise ValueError(f"MoCo tracks gradients of width {self.tracked.shape[1]}, got {matrix.shape[1]}: the "
                                 f"gradient must have the same entries at every step (use level='parameter')")
            dtype = torch.promote_types(matrix.dtype, torch.float32)
            self.tracked = torch.zeros(matrix.shape, dtype=dtype, device=matrix.device)
        if self.training:
            self._update(matrix, losses)
        y = self.tracked.to(torch.promote_types(matrix.dtype, torch.float32))  # (K, D)
        self.weights = self.lambd.detach().clone()
        return (self.lambd.to(y) @ y).to(matrix.dtype)

    @torch.no_grad()
    def _update(self, matrix: Tensor, losses: Tensor | None) -> None:
        h = matrix.to(self.tracked.dtype)  # (K, D)
        if self.gradient_scaling == "loss":
            if losses is None or losses.shape != (len(self.tasks),):
                raise ValueError(f"MoCo with gradient_scaling='loss' needs the ({len(self.tasks)},) task losses")
            h = h * (losses.to(h) / (torch.linalg.vector_norm(h, dim=1) + self.eps))[:, None]
        self.steps += 1
        t = self.steps.to(h.dtype)
        self.tracked.lerp_(h, self.beta / t**self.beta_sigma)  # Y - beta_t (Y - h)
        lambd = self.lambd.to(h)
        gram = self.tracked @ self.tracked.T + self.rho * torch.eye(len(self.tasks), device=h.device, dtype=h.dtype)
        moved = lambd - self.gamma / t**self.gamma_sigma * (gram @ lambd)
        new = project_to_simplex(moved) if self.lambda_update == "projection" else torch.softmax(moved, dim=0)
        self.lambd.copy_(new)
