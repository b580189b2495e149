"""GradNorm: gradient normalisation for adaptive loss balancing.

Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
Multitask Networks", ICML 2018, arXiv:1711.02257.

The model minimises sum_k w_k L_k with learnable weights w. The weights minimise the auxiliary loss

    L_grad = sum_k | G_k - mean_j(G_j) * r_k^alpha |,    G_k = || grad_W (w_k L_k) || = w_k || grad_W L_k ||,

where W are the shared weights the norms are taken on (the paper's choice, to save compute, is the last shared layer:
``norm_params="last"``; ``"all"`` takes every shared parameter), r_k = (L_k / L_k(0)) / mean_j(L_j / L_j(0)) is
task k's relative inverse training rate and L_k(0) its loss at the first training step. The target mean(G) r^alpha is
a constant, as in the paper; ||grad_W L_k|| is computed without a second-order graph, so L_grad has a gradient with
respect to w only and never reaches the model. After each optimizer step the weights are renormalised to sum to K.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_mtl.mtl.balancing.base import LossWeighting
from lightning_mtl.mtl.balancing.registry import register_balancer


@register_balancer("gradnorm")
class GradNorm(LossWeighting):
    """Weighted sum of the losses plus GradNorm's auxiliary loss on the weights, in one scalar.

    :meth:`forward` returns ``sum_k w_k.detach() L_k + L_grad``: one backward pass gives the model the gradient of
    the weighted loss and the weights (``task_weights``, an ``nn.Parameter`` trained by the model's optimizer) the
    gradient of ``L_grad``. The returned value therefore includes ``L_grad``; log ``self.weights`` or the task losses
    rather than this value to follow training. Costs one extra backward pass per task, down to the weights it takes
    the norms on: with ``norm_params="last"`` that pass stops at the last shared layer, so it is cheap.

    Args:
        tasks: task names; the losses passed to :meth:`forward` must have exactly these keys.
        alpha: strength of the pull towards equal training rates (the paper uses 1.5; 0 equalises gradient norms).
        min_weight: the weights are clamped to at least this before renormalising, so a large step on the weights
            can never make a task's weight zero or negative (a safeguard, not in the paper).
        norm_params: which shared parameters the gradient norms G_k are taken on: ``"all"`` of them, or ``"last"``:
            the last shared weight tensor with at least two dimensions (the weight of the backbone's last
            convolution or linear layer, in parameter registration order), as in the paper.
    """

    needs_shared_params = True

    def __init__(
        self, tasks: list[str], alpha: float = 1.5, min_weight: float = 1e-6,
        norm_params: Literal["all", "last"] = "all",
    ) -> None:
        super().__init__(tasks)
        if min_weight <= 0:
            raise ValueError(f"GradNorm min_weight must be positive, got {min_weight}")
        if norm_params not in ("all", "last"):
            raise ValueError(f"GradNorm norm_params must be 'all' or 'last', got {norm_params!r}")
        self.norm_params = norm_params
        self.alpha = alpha
        self.min_weight = min_weight
        self.task_weights = nn.Parameter(torch.ones(len(self.tasks)))
        self.register_buffer("initial_losses", torch.ones(len(self.tasks)))  # L_k(0)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, losses: dict[str, Tensor], shared_params: list[Tensor] | None = None) -> Tensor:
        """``sum_k w_k L_k`` (weights as constants) plus ``L_grad`` (differentiable in the weights only).

        Without gradients (evaluation, or losses that do not require grad) only the weighted sum is returned.

        Raises:
            ValueError: if the keys of ``losses`` are not the tasks, or if gradients are needed and
                ``shared_params`` is empty.
        """
        stacked = self._stack_losses(losses)  # (tasks,)
        self.weights = self.task_weights.detach().clone()
        weighted = (self.task_weights.detach().to(stacked.dtype) * stacked).sum()
        if not (torch.is_grad_enabled() and stacked.requires_grad):
            return weighted
        if not shared_params:
            raise ValueError("GradNorm needs shared_params (e.g. the last shared layer's weights) during training")
        return weighted + self.gradnorm_loss([losses[t] for t in self.tasks], shared_params)

    def gradnorm_loss(self, task_losses: list[Tensor], shared_params: list[Tensor]) -> Tensor:
        """``L_grad`` for the task losses (in task order); records ``L(0)`` on its first call.

        Each norm is taken from the task's own loss tensor, not from an element of the stacked vector: the backward
        pass of ``stacked[k]`` would send zero gradients into every other task's graph, K backward passes per task.
        """
        losses = torch.stack([loss.detach().reshape(()) for loss in task_losses]).float()
        if not self.initialized:
            self.initial_losses.copy_(losses)
            self.initialized.fill_(True)
        params = self.select_params(shared_params)
        norms = torch.stack([self._grad_norm(loss, params) for loss in task_losses])  # (tasks,), constants
        g = self.task_weights * norms  # G_k = ||grad_W (w_k L_k)||, differentiable in w only
        rate = losses / self.initial_losses.clamp_min(torch.finfo(losses.dtype).tiny)
        target = (g.mean() * (rate / rate.mean()) ** self.alpha).detach()
        return (g - target).abs().sum()

    def select_params(self, shared_params: list[Tensor]) -> list[Tensor]:
        """The parameters the norms are taken on: all ``shared_params``, or the last one with ``ndim >= 2``.

        Raises:
            ValueError: ``norm_params="last"`` and no shared parameter has two or more dimensions.
        """
        if self.norm_params == "all":
            return list(shared_params)
        weights = [p for p in shared_params if p.ndim >= 2]
        if not weights:
            raise ValueError("GradNorm norm_params='last' needs a shared weight with >= 2 dimensions (a convolution "
                             "or linear layer), but the shared parameters have none; use norm_params='all'.")
        return weights[-1:]

    @staticmethod
    def _grad_norm(loss: Tensor, params: list[Tensor]) -> Tensor:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        flat = [(torch.zeros_like(p) if g is None else g).float().flatten() for g, p in zip(grads, params, strict=True)]
        return torch.linalg.vector_norm(torch.cat(flat))

    @torch.no_grad()
    def after_step(self, losses: dict[str, Tensor]) -> None:
        """Renormalise the weights to sum to the number of tasks (after the optimizer has updated them)."""
        self.task_weights.clamp_(min=self.min_weight)
        self.task_weights.mul_(len(self.tasks) / self.task_weights.sum())
