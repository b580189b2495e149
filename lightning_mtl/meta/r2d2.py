"""R2D2: a ridge-regression head solved in closed form inside every episode.

Bertinetto, Henriques, Torr & Vedaldi, "Meta-learning with differentiable closed-form solvers", ICLR 2019,
arXiv:1805.08136.

With the support embeddings ``X`` (``n x d``, a column of ones appended for the bias) and one-hot labels ``Y``
(``n x ways``), the ridge solution is computed through the Woodbury identity, cheap because ``n << d``::

    W = X^T (X X^T + lambda I_n)^{-1} Y        (= (X^T X + lambda I_d)^{-1} X^T Y)

and the query logits are ``alpha * X_q W + beta`` with learnable scalars ``alpha``, ``beta`` (the paper's
calibration) and a learnable ``lambda > 0``. Everything is differentiable, so the backbone, ``lambda``, ``alpha`` and
``beta`` are trained end to end with the query cross-entropy.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl.batches import Episode
from lightning_mtl.checkpointing import save_hyperparameters
from lightning_mtl.meta._checks import class_one_hot
from lightning_mtl.meta.base import EpisodicModule
from lightning_mtl.mtl.balancing import BalancerCallable
from lightning_mtl.nn import Conv4


def ridge_logits(support: Tensor, labels: Tensor, query: Tensor, ways: int, lam: Tensor | float) -> Tensor:
    """``X_q W`` with the ridge solution ``W`` of ``support`` ``(B, S, D)`` → one-hot ``labels`` ``(B, S)``.

    Returns:
        ``(B, Q, ways)`` for ``query`` ``(B, Q, D)``; both sets get a bias column of ones.
    """
    ones = support.new_ones(*support.shape[:-1], 1)
    x = torch.cat([support, ones], -1)  # (B, S, D + 1)
    xq = torch.cat([query, query.new_ones(*query.shape[:-1], 1)], -1)  # (B, Q, D + 1)
    y = class_one_hot(labels, ways, x.dtype)  # (B, S, ways)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    gram = x @ x.transpose(1, 2) + lam * eye  # (B, S, S): Woodbury keeps the solve at the support size
    w = x.transpose(1, 2) @ torch.linalg.solve(gram, y)  # (B, D + 1, ways)
    return xq @ w


class R2D2(EpisodicModule):
    """Backbone + closed-form ridge-regression head (R2D2).

    Args:
        backbone: embedding network ``(N, C, H, W) -> (N, D)``; default :class:`Conv4`.
        init_lambda: initial ridge regulariser (learned in log space, so it stays positive).
        init_scale: initial output scale ``alpha``.
        learn_lambda: learn ``lambda`` (else it stays ``init_lambda``).
        optimizer: optimizer factory; default Adam, lr 1e-3.
        lr_scheduler: scheduler factory, stepped every meta-batch.
        meta_balancer: gradient aggregator of the per-episode outer gradients of a meta-batch (``pcgrad``, ``mgda``,
            ``upgrad``, ...; see :class:`~lightning_mtl.meta.EpisodicModule`); ``None``: their mean.
        diagnostics_every: with a ``meta_balancer``, log the episode-gradient conflict (``diag/*``) every this many
            steps.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        init_lambda: float = 1.0,
        init_scale: float = 1.0,
        learn_lambda: bool = True,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        meta_balancer: str | BalancerCallable | None = None,
        diagnostics_every: int = 100,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, meta_balancer=meta_balancer,
                         diagnostics_every=diagnostics_every)
        if init_lambda <= 0:
            raise ValueError(f"R2D2 init_lambda must be positive, got {init_lambda}")
        save_hyperparameters(self, ["backbone", "optimizer", "lr_scheduler"])
        self.backbone = backbone if backbone is not None else Conv4()
        self.log_lambda = nn.Parameter(torch.tensor(math.log(init_lambda)), requires_grad=learn_lambda)
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings ``(N, D)`` of images ``(N, C, H, W)``."""
        return self.backbone(self.images(x)).flatten(1)

    def episode_logits(self, episode: Episode, stage: str) -> Tensor:
        support, query = (z.float() for z in self.embed_episode(episode))
        # the solve runs in float32 even under bf16 autocast: a bf16 Gram matrix is too coarse to invert
        with torch.autocast(support.device.type, enabled=False):
            logits = ridge_logits(support, episode.support_y, query, episode.ways, self.log_lambda.exp())
        return self.scale * logits + self.bias
