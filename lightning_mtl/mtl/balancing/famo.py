"""FAMO: Fast Adaptive Multitask Optimization.

Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023, arXiv:2306.03792.

With task logits xi, z = softmax(xi) and c = 1 / sum_k(z_k / (L_k + eps)) (a constant), the model minimises

    L = c * sum_k z_k log(L_k + eps),   whose gradient is sum_k (c z_k / (L_k + eps)) grad L_k,

a convex combination of the task gradients (the weights reported in ``self.weights`` sum to 1). After the model step,
with delta_k = log(L_k(before) + eps) - log(L_k(after) + eps) the log-loss decrease of task k, the logits take one
step along the gradient J_softmax(xi)^T delta + gamma * xi (gamma: the paper's regularisation), so a task whose loss
fell less than the others gains weight. The paper's Algorithm 1 takes a plain gradient step; its Algorithm 2 and the
official code take an Adam step (lr 0.025), the default here. Logits and Adam moments are registered buffers, so they
are checkpointed and never touched by the model's optimizer.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_mtl.mtl.balancing.base import LossWeighting
from lightning_mtl.mtl.balancing.registry import register_balancer

_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, used by the official code
_ADAM_EPS = 1e-8


@register_balancer("famo")
class FAMO(LossWeighting):
    """FAMO's loss, with task logits updated from the loss decrease of each step.

    The logit update needs the losses at the parameters after the step. Both ways of getting them work:

    * the official protocol: recompute the losses on the same batch after ``optimizer.step()`` and pass them to
      :meth:`after_step`, which updates the logits at once;
    * no extra forward pass: pass the losses of the step just taken to :meth:`after_step` (the usual balancer
      contract); these equal the losses :meth:`forward` saw, so nothing happens there, and the next training
      :meth:`forward` updates the logits with its own losses (the next batch, at the new parameters) before weighting.

    Only a module in training mode stores losses and updates logits; evaluation calls leave the state unchanged.

    Args:
        tasks: task names; the losses passed to :meth:`forward` must have exactly these keys.
        w_lr: step size of the logit update (the paper and official code use 0.025).
        gamma: regularisation of the logits (weight decay): 1e-3 as in the paper's Algorithm 2 and LibMTL; the
            official ``famo.py`` defaults to 0.01 and its experiment code to 1e-5.
        logit_optimizer: ``"adam"`` (Algorithm 2 / official code) or ``"sgd"`` (Algorithm 1's plain step).
        eps: added to every loss before the logarithm; losses must stay above ``-eps``.

    Raises:
        ValueError: for a negative ``w_lr``, ``gamma`` or an unknown ``logit_optimizer``.
    """

    def __init__(
        self,
        tasks: list[str],
        w_lr: float = 0.025,
        gamma: float = 1e-3,
        logit_optimizer: Literal["adam", "sgd"] = "adam",
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks)
        if w_lr < 0 or gamma < 0:
            raise ValueError(f"FAMO w_lr and gamma must be non-negative, got w_lr={w_lr}, gamma={gamma}")
        if logit_optimizer not in ("adam", "sgd"):
            raise ValueError(f"FAMO logit_optimizer must be 'adam' or 'sgd', got {logit_optimizer!r}")
        self.w_lr, self.gamma, self.logit_optimizer, self.eps = w_lr, gamma, logit_optimizer, eps
        k = len(self.tasks)
        self.register_buffer("logits", torch.zeros(k))  # xi
        self.register_buffer("exp_avg", torch.zeros(k))
        self.register_buffer("exp_avg_sq", torch.zeros(k))
        self.register_buffer("logit_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("prev_losses", torch.ones(k))  # losses seen by the last training forward
        self.register_buffer("pending", torch.zeros((), dtype=torch.bool))  # prev_losses not yet used for an update

    @property
    def z(self) -> Tensor:
        """The ``(tasks,)`` task weights ``softmax(xi)`` (sum to 1)."""
        return torch.softmax(self.logits, dim=0)

    def forward(self, losses: dict[str, Tensor], shared_params: list[Tensor] | None = None) -> Tensor:
        """``c * sum_k z_k log(L_k + eps)``; in training, first updates the logits if an update is pending.

        Raises:
            ValueError: if the keys of ``losses`` are not the tasks.
        """
        stacked = self._stack_losses(losses)  # (tasks,)
        current = stacked.detach().float()
        # A non-finite loss (a step the module will skip) must neither update the logits nor be compared later.
        finite = self.training and bool(torch.isfinite(current).all())
        if finite and self.pending:
            self._update_logits(current)
        z = self.z.to(stacked.dtype)
        shifted = stacked + self.eps
        c = 1.0 / (z / shifted).sum().detach()
        self.weights = (c * z / shifted).detach()
        if self.training:
            self.prev_losses.copy_(current)
            self.pending.fill_(finite)
        return (c * z * torch.log(shifted)).sum()

    @torch.no_grad()
    def after_step(self, losses: dict[str, Tensor]) -> None:
        """Update the logits if ``losses`` are the losses at the new parameters (see the class docstring).

        Raises:
            ValueError: if the keys of ``losses`` are not the tasks.
        """
        current = self._stack_losses(losses).detach().float()
        # Losses identical to the ones forward saw are the step's own losses: the next forward does the update.
        if self.pending and torch.isfinite(current).all() and not torch.equal(current, self.prev_losses):
            self._update_logits(current)

    @torch.no_grad()
    def _update_logits(self, after: Tensor) -> None:
        delta = torch.log(self.prev_losses + self.eps) - torch.log(after + self.eps)  # (tasks,)
        z = self.z
        grad = z * (delta - (z * delta).sum())  # J_softmax^T delta (the softmax Jacobian is symmetric)
        grad = grad + self.gamma * self.logits
        if self.logit_optimizer == "sgd":
            self.logits.sub_(self.w_lr * grad)
        else:  # torch.optim.Adam's update, with its state in buffers
            self.logit_steps += 1
            beta1, beta2 = _BETAS
            self.exp_avg.lerp_(grad, 1 - beta1)
            self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            steps = self.logit_steps.float()
            bias1, bias2 = 1 - beta1**steps, 1 - beta2**steps
            denom = self.exp_avg_sq.sqrt() / bias2.sqrt() + _ADAM_EPS
            self.logits.sub_(self.w_lr / bias1 * self.exp_avg / denom)
        self.pending.fill_(False)
