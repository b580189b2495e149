"""Model-Agnostic Meta-Learning (MAML) and first-order MAML.

Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017,
arXiv:1703.03400.

For each task: theta'_i = theta - alpha * grad_theta L_support(theta) (repeated ``inner_steps`` times), then the meta
loss is the mean over the meta-batch of L_query(theta'_i), minimised over theta by the outer optimizer. The second-
order meta-gradient differentiates through the inner updates; first-order MAML (``first_order=True``) treats the
inner gradients as constants, so the meta-gradient is grad L_query evaluated at theta'_i.

The inner loop, the network (``backbone`` → ``head``), the episode checks and evaluation are the core's
(:class:`~lightning_mtl.meta.gradient_based.GradientLearner`); MAML supplies the update rule, plain SGD with step
size alpha.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl.checkpointing import save_hyperparameters
from lightning_mtl.meta.gradient_based import GradientLearner
from lightning_mtl.mtl.balancing import BalancerCallable


class MAML(GradientLearner):
    """MAML / FOMAML classifier: ``backbone`` followed by a linear head of ``ways`` outputs, all adapted per task.

    Args:
        ways: classes per episode (size of the head); must match the datamodule's ways.
        backbone: feature extractor ``(N, C, H, W) → (N, D)``; default :class:`Conv4` without running BatchNorm
            statistics (transductive).
        image_shape: ``(C, H, W)`` of the inputs, used once to size the head.
        inner_lr: step size alpha of the inner updates during training.
        inner_steps: inner updates during training.
        eval_inner_lr: step size at validation / test; ``None`` uses ``inner_lr``.
        eval_inner_steps: inner updates at validation / test (the paper's code uses 10 for Omniglot).
        first_order: FOMAML: do not differentiate through the inner updates.
        optimizer: outer optimizer factory; default Adam, lr 1e-3.
        lr_scheduler: outer scheduler factory, stepped every meta-batch.
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
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        eval_inner_lr: float | None = None,
        eval_inner_steps: int = 10,
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

    def inner_lr(self, stage: str) -> float:
        """The inner step size at ``stage`` ("train", "val" or "test")."""
        hp = self.hparams
        return hp.eval_inner_lr if stage != "train" and hp.eval_inner_lr is not None else hp.inner_lr

    def update(self, params: dict[str, Tensor], grads: dict[str, Tensor], loss: Tensor, state: Any, stage: str,
               create_graph: bool) -> tuple[dict[str, Tensor], Any]:
        """SGD: ``theta - alpha * g``."""
        lr = self.inner_lr(stage)
        return {name: p - lr * grads[name] for name, p in params.items()}, state
