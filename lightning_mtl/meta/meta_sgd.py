"""Meta-SGD: MAML with a learned step size for every parameter.

Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", arXiv:1707.09835, 2017.

Each parameter tensor theta has a learned step-size tensor alpha of the same shape, and a task adapts with

    theta'_i = theta - alpha ⊙ grad_theta L_support(theta)                  (⊙: element-wise product)

so alpha sets both the size and, through its signs, the direction of each coordinate's update. The meta loss is the
mean over the meta-batch of L_query(theta'_i), minimised over theta AND alpha by the outer optimizer (the meta-
gradient with respect to alpha is -grad L_support ⊙ grad L_query for one step). The paper adapts in one step at
training and test time; more steps (``inner_steps``) reuse the same alpha. Arguments, the default transductive-
BatchNorm :class:`~lightning_mtl.nn.Conv4` and evaluation (gradients re-enabled under ``inference_mode``) are
:class:`~lightning_mtl.meta.maml.MAML`'s. The paper draws alpha at random; here every entry starts at ``alpha_init``
(MAML's step size is the natural choice), which makes step 0 exactly MAML's.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl.checkpointing import save_hyperparameters
from lightning_mtl.meta.gradient_based import GradientLearner
from lightning_mtl.mtl.balancing import BalancerCallable


class MetaSGD(GradientLearner):
    """Meta-SGD classifier: ``backbone`` → linear head of ``ways`` outputs, adapted with learned per-parameter steps.

    Args:
        ways: classes per episode (size of the head); must match the datamodule's ways.
        backbone: feature extractor ``(N, C, H, W) → (N, D)``; default :class:`Conv4` without running BatchNorm
            statistics (transductive).
        image_shape: ``(C, H, W)`` of the inputs, used once to size the head.
        alpha_init: initial value of every entry of the step sizes alpha (then meta-learned).
        inner_steps: adaptation steps during training (the paper uses 1).
        eval_inner_steps: adaptation steps at validation / test (the paper uses 1, as in training).
        first_order: do not differentiate through the inner gradients (alpha still gets its meta-gradient).
        optimizer: outer optimizer factory, over theta and alpha; default Adam, lr 1e-3.
        lr_scheduler: outer scheduler factory, stepped every meta-batch.
        meta_balancer: gradient aggregator of the per-episode outer gradients of a meta-batch (``pcgrad``, ``mgda``,
            ``upgrad``, ...; see :class:`~lightning_mtl.meta.EpisodicModule`); ``None``: their mean.
        diagnostics_every: with a ``meta_balancer``, log the episode-gradient conflict (``diag/*``) every this many
            steps.

    Raises:
        ValueError: ``ways < 2`` or a negative number of steps.
    """

    def __init__(
        self,
        ways: int = 5,
        backbone: nn.Module | None = None,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        alpha_init: float = 0.4,
        inner_steps: int = 1,
        eval_inner_steps: int = 1,
        first_order: bool = False,
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
        # one alpha per parameter tensor of backbone and head, in fast_parameters() order (full_like keeps memory
        # formats)
        self.alpha = nn.ParameterList([nn.Parameter(torch.full_like(p, alpha_init))
                                       for p in self.fast_parameters().values()])

    def update(self, params: dict[str, Tensor], grads: dict[str, Tensor], loss: Tensor, state: Any, stage: str,
               create_graph: bool) -> tuple[dict[str, Tensor], Any]:
        """``theta - alpha ⊙ g``. With ``create_graph=True`` the result is differentiable with respect to theta and
        alpha (second order); otherwise the inner gradients are constants, and the result is still differentiable
        with respect to alpha."""
        return {name: p - a * grads[name] for (name, p), a in zip(params.items(), self.alpha, strict=True)}, state
