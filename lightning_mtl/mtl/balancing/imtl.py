"""IMTL: Impartial Multi-task Learning, the hybrid of its loss balance (IMTL-L) and gradient balance (IMTL-G).

Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021
(https://openreview.net/forum?id=IMPnRXEWpvr).

* IMTL-L: each task has a learned log-scale s_k and contributes the scaled loss e^{s_k} L_k - s_k; its gradient in
  s_k, e^{s_k} L_k - 1, vanishes at e^{s_k} L_k = 1, so the scaled losses are pulled to a common scale.
* IMTL-G: with g_k = e^{s_k} grad L_k the scaled-loss gradients and u_k = g_k / ||g_k||, the update d = sum_k a_k g_k
  with sum_k a_k = 1 has the same projection onto every u_k (d . u_1 = d . u_k). Since g_k . d = ||g_k|| (u_k . d),
  that is (G G^T) a = c ||g||: a = pinv(G G^T) ||g||, normalised to sum to 1 (the paper's closed form
  a_{2:K} = g_1 U^T (D U^T)^{-1} when G G^T is invertible; the pseudo-inverse, as in torchjd's IMTL-G, also
  handles linearly dependent gradients; a zero sum gives a zero update).

The update of the shared parameters is d = sum_k a_k e^{s_k} grad L_k, so :attr:`weights` are a_k e^{s_k}, the
weights on the rows of the raw gradient matrix this aggregator receives. The a_k may be negative (the paper does not
constrain them). Deviations from the paper and from LibMTL's ``IMTL``, which trains s with the model's optimizer:

* s is trained here, by the aggregator itself, with the exact gradient e^{s_k} L_k - 1 of sum_k (e^{s_k} L_k - s_k)
  (a closed form, so no backward pass); ``scale_optimizer`` and ``scale_lr`` choose the step (Adam by default, as
  LibMTL's experiments train everything with Adam). s and the optimizer state are buffers, so checkpoints resume
  exactly. The step is taken in training mode only, after the update direction was computed with the current s, as
  LibMTL's optimizer step does.
* The task-specific parameters (heads) receive whatever gradient the model gives them (the unscaled losses'), not
  the gradient of e^{s_k} L_k as in the paper: an aggregator only sees the shared gradients.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.optim.adam import adam

from lightning_mtl.mtl.balancing.base import GradientAggregator
from lightning_mtl.mtl.balancing.registry import register_balancer


def imtl_g_weights(matrix: Tensor) -> Tensor:
    """The ``(tasks,)`` IMTL-G weights of a ``(tasks, dims)`` matrix: equal projections onto every unit row."""
    gram = matrix @ matrix.T  # (K, K)
    norms = torch.diagonal(gram).clamp_min(0).sqrt()  # (K,)
    alpha = torch.linalg.pinv(gram, hermitian=True) @ norms
    total = alpha.sum()
    # Without this guard a zero sum (e.g. all-zero gradients) would give inf/NaN weights.
    return torch.where(total.abs() > torch.finfo(total.dtype).eps, alpha / total, torch.zeros_like(alpha))


@register_balancer("imtl")
class IMTL(GradientAggregator):
    """IMTL-G's update on the gradients of IMTL-L's scaled losses, with the log-scales learned here.

    Args:
        tasks: task names, in the order of the matrix rows.
        scale_lr: step size of the log-scale update.
        scale_optimizer: ``"adam"`` (``torch.optim.Adam``'s update, betas (0.9, 0.999)) or ``"sgd"`` (a plain step).
        init_log_scale: initial s_k for every task; 0 (LibMTL's choice) starts from the unscaled losses.

    Raises:
        ValueError: for a negative ``scale_lr`` or an unknown ``scale_optimizer``.
    """

    needs_losses = True

    def __init__(
        self,
        tasks: list[str],
        scale_lr: float = 1e-3,
        scale_optimizer: Literal["adam", "sgd"] = "adam",
        init_log_scale: float = 0.0,
    ) -> None:
        super().__init__(tasks)
        if scale_lr < 0:
            raise ValueError(f"IMTL scale_lr must be non-negative, got {scale_lr}")
        if scale_optimizer not in ("adam", "sgd"):
            raise ValueError(f"IMTL scale_optimizer must be 'adam' or 'sgd', got {scale_optimizer!r}")
        self.scale_lr, self.scale_optimizer = scale_lr, scale_optimizer
        k = len(self.tasks)
        self.register_buffer("log_scales", torch.full((k,), float(init_log_scale)))  # s
        self.register_buffer("exp_avg", torch.zeros(k))
        self.register_buffer("exp_avg_sq", torch.zeros(k))
        self.register_buffer("scale_steps", torch.zeros((), dtype=torch.long))

    def forward(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        """``sum_k a_k e^{s_k} g_k`` for the rows g_k of ``matrix``; in training, then one step on s.

        Raises:
            ValueError: if ``matrix`` is not ``(tasks, dims)`` or ``losses`` is not the ``(tasks,)`` losses.
        """
        self._check_matrix(matrix)
        if losses is None or losses.shape != (len(self.tasks),):
            raise ValueError(f"IMTL needs the ({len(self.tasks)},) task losses, got "
                             f"{None if losses is None else tuple(losses.shape)}")
        dtype = torch.promote_types(matrix.dtype, torch.float32)  # a pseudo-inverse in half precision is unreliable
        scales = self.log_scales.to(device=matrix.device, dtype=dtype).exp()  # (K,)
        alpha = imtl_g_weights(scales[:, None] * matrix.to(dtype))  # weights of the scaled-loss gradients
        weights = alpha * scales  # (K,): weights of the raw rows
        self.weights = weights.detach()
        if self.training:
            self._step_scales(scales * losses.detach().to(dtype) - 1)  # d/ds of sum_k e^{s_k} L_k - s_k
        return (weights @ matrix.to(dtype)).to(matrix.dtype)

    @torch.no_grad()
    def _step_scales(self, grad: Tensor) -> None:
        grad = grad.to(self.log_scales)
        if self.scale_optimizer == "sgd":
            self.log_scales.sub_(self.scale_lr * grad)
            return
        steps = self.scale_steps.to(self.log_scales.dtype)  # adam wants a floating step count; kept as long here
        adam([self.log_scales], [grad], [self.exp_avg], [self.exp_avg_sq], [], [steps], foreach=False, amsgrad=False,
             beta1=0.9, beta2=0.999, lr=self.scale_lr, weight_decay=0.0, eps=1e-8, maximize=False)
        self.scale_steps += 1
