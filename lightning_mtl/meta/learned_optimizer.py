"""A learned, coordinate-wise update rule as the inner loop of adaptation: the meta-learner LSTM of Ravi & Larochelle.

Ravi & Larochelle, "Optimization as a Model for Few-Shot Learning", ICLR 2017; gradient preprocessing of Andrychowicz
et al., "Learning to learn by gradient descent by gradient descent", NeurIPS 2016, arXiv:1606.04474.

The learner's parameters are the cell state of an LSTM whose gates are computed for every coordinate from the same
small weights (coordinate-wise, so the rule applies to any network)::

    i_t = sigmoid(W_I [grad_t, L_t, theta_{t-1}, i_{t-1}] + b_I)      learned step size
    f_t = sigmoid(W_F [grad_t, L_t, theta_{t-1}, f_{t-1}] + b_F)      learned shrinkage / forgetting
    theta_t = f_t * theta_{t-1} - i_t * grad_t

``grad_t`` and the support loss ``L_t`` enter preprocessed: ``x -> (log|x| / p, sign x)`` if ``|x| >= e^-p`` else
``(-1, e^p x)``. The initial parameters ``theta_0`` and the gate weights are meta-learned by back-propagating the
query loss through the unrolled updates. As in the paper, the learner's gradients and loss are inputs treated as
constants (``first_order=True``); ``first_order=False`` also differentiates through them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl.checkpointing import save_hyperparameters
from lightning_mtl.meta.gradient_based import GradientLearner
from lightning_mtl.mtl.balancing import BalancerCallable


def preprocess(x: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al.'s scaling of gradients and losses: ``(...)`` → ``(..., 2)``."""
    big = x.abs() >= math.exp(-p)
    magnitude = torch.where(big, x.abs().clamp_min(math.exp(-p)).log() / p, torch.full_like(x, -1.0))
    direction = torch.where(big, torch.sign(x), x * math.exp(p))
    return torch.stack([magnitude, direction], -1)


class MetaLearnerLSTM(nn.Module):
    """Ravi & Larochelle's coordinate-wise update: ``theta_t = f_t * theta_{t-1} - i_t * grad_t``.

    Args:
        input_bias: initial ``b_I``; ``sigmoid(b_I)`` is the initial step size (default ~0.018).
        forget_bias: initial ``b_F``; ``sigmoid(b_F)`` close to 1 keeps the parameters (default ~0.993).
        init_scale: the gate weights start uniform in ``(-init_scale, init_scale)`` (the paper's code: 0.01).
    """

    def __init__(self, input_bias: float = -4.0, forget_bias: float = 5.0, init_scale: float = 0.01) -> None:
        super().__init__()
        self.input_gate = nn.Linear(6, 1)  # (grad 2, loss 2, theta 1, previous gate 1) -> 1
        self.forget_gate = nn.Linear(6, 1)
        for gate, bias in ((self.input_gate, input_bias), (self.forget_gate, forget_bias)):
            nn.init.uniform_(gate.weight, -init_scale, init_scale)
            nn.init.constant_(gate.bias, bias)

    def initial_gates(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """``i_0``, ``f_0`` for a parameter: the gates' bias values everywhere."""
        return (torch.sigmoid(self.input_gate.bias).expand_as(theta),
                torch.sigmoid(self.forget_gate.bias).expand_as(theta))

    def forward(self, theta: Tensor, grad: Tensor, loss: Tensor, i_prev: Tensor, f_prev: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """One update of one parameter tensor; returns ``(theta_t, i_t, f_t)``."""
        shared = torch.cat([preprocess(grad), preprocess(loss).expand(*theta.shape, 2), theta.unsqueeze(-1)], -1)
        i = torch.sigmoid(self.input_gate(torch.cat([shared, i_prev.unsqueeze(-1)], -1))).squeeze(-1)
        f = torch.sigmoid(self.forget_gate(torch.cat([shared, f_prev.unsqueeze(-1)], -1))).squeeze(-1)
        return f * theta - i * grad, i, f


class LearnedOptimizer(GradientLearner):
    """Few-shot classifier adapted by a meta-learned update rule (:class:`MetaLearnerLSTM`) instead of SGD.

    The classifier (``backbone`` + linear head), its inner loop and its evaluation are the core's
    (:class:`~lightning_mtl.meta.gradient_based.GradientLearner`); the update rule is the learned one, run for
    ``inner_steps`` (training) or ``eval_inner_steps`` (evaluation) updates on the support set.

    Args:
        ways: classes per episode.
        backbone: feature extractor; default Conv-4 with transductive BatchNorm.
        image_shape: ``(C, H, W)`` of the inputs.
        inner_steps: learned updates per task in training (the paper: 5 on 5-way 1-shot).
        eval_inner_steps: learned updates at validation / test (the paper: 10; the rule generalises to more).
        first_order: treat the learner's gradients and losses as constants, as in the paper.
        input_bias: initial input-gate bias (initial step size ``sigmoid(input_bias)``).
        forget_bias: initial forget-gate bias.
        optimizer: outer optimizer factory (trains ``theta_0`` and the rule); default Adam, lr 1e-3.
        lr_scheduler: outer scheduler factory.
        meta_balancer: gradient aggregator of the per-episode outer gradients of a meta-batch (``pcgrad``, ``mgda``,
            ``upgrad``, ...; see :class:`~lightning_mtl.meta.EpisodicModule`); ``None``: their mean.
        diagnostics_every: with a ``meta_balancer``, log the episode-gradient conflict (``diag/*``) every this many
            steps.
    """

    def __init__(
        self,
        ways: int = 5,
        backbone: nn.Module | None = None,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        inner_steps: int = 5,
        eval_inner_steps: int = 10,
        first_order: bool = True,
        input_bias: float = -4.0,
        forget_bias: float = 5.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        meta_balancer: str | BalancerCallable | None = None,
        diagnostics_every: int = 100,
    ) -> None:
        super().__init__(ways=ways, backbone=backbone, image_shape=image_shape, inner_steps=inner_steps,
                         eval_inner_steps=eval_inner_steps, first_order=first_order, optimizer=optimizer,
                         lr_scheduler=lr_scheduler, meta_balancer=meta_balancer,
                         diagnostics_every=diagnostics_every)
        save_hyperparameters(self, ["backbone", "optimizer", "lr_scheduler"])
        self.update_rule = MetaLearnerLSTM(input_bias, forget_bias)

    def init_state(self, params: dict[str, Tensor], stage: str) -> dict[str, tuple[Tensor, Tensor]]:
        """The gates ``(i_0, f_0)`` of every parameter."""
        return {name: self.update_rule.initial_gates(p) for name, p in params.items()}

    def update(self, params: dict[str, Tensor], grads: dict[str, Tensor], loss: Tensor, state: Any, stage: str,
               create_graph: bool) -> tuple[dict[str, Tensor], Any]:
        """One learned update of every parameter. The result is differentiable w.r.t. ``theta_0`` and the rule
        whenever gradients are enabled; ``create_graph`` (second order) also keeps the learner's gradients in the
        graph, otherwise the rule sees them and the loss as plain inputs."""
        if not create_graph:
            grads, loss = {name: g.detach() for name, g in grads.items()}, loss.detach()
        new, gates = {}, {}
        for name, p in params.items():
            new[name], i, f = self.update_rule(p, grads[name], loss, *state[name])
            gates[name] = (i, f)
        return new, gates
