"""Prototypical Networks.

Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017, arXiv:1703.05175.

Each class is represented by the mean of its embedded support examples, c_k = mean_{(x, y) in S_k} f(x); a query x
gets logits -||f(x) - c_k||^2 (squared Euclidean distance), trained with cross-entropy over the query set.
"""

from __future__ import annotations

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl.batches import Episode
from lightning_mtl.checkpointing import save_hyperparameters
from lightning_mtl.meta._checks import class_one_hot
from lightning_mtl.meta.base import EpisodicModule
from lightning_mtl.mtl.balancing import BalancerCallable
from lightning_mtl.nn import Conv4


def prototypes(support: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Class means ``(B, ways, D)`` of ``support`` ``(B, S, D)`` with ``labels`` ``(B, S)`` in ``0 .. ways - 1``."""
    # a comparison instead of F.one_hot, whose bounds check synchronises the device every step
    onehot = class_one_hot(labels, ways, support.dtype)  # (B, S, ways)
    return onehot.transpose(1, 2) @ support / onehot.sum(1).unsqueeze(-1)


def squared_euclidean_logits(query: Tensor, protos: Tensor) -> Tensor:
    """``-||q - c||^2`` for ``query`` ``(B, Q, D)`` against ``protos`` ``(B, ways, D)`` → ``(B, Q, ways)``."""
    return -(query.unsqueeze(2) - protos.unsqueeze(1)).pow(2).sum(-1)


class ProtoNet(EpisodicModule):
    """Prototypical network with squared Euclidean distance to class means.

    Args:
        backbone: embedding network mapping ``(N, C, H, W)`` images to ``(N, D)``; default :class:`Conv4` for
            one-channel images.
        optimizer: optimizer factory; default Adam, lr 1e-3.
        lr_scheduler: scheduler factory, stepped every episode batch (the paper halves the lr every 2000 episodes).
        meta_balancer: gradient aggregator of the per-episode outer gradients of a meta-batch (``pcgrad``, ``mgda``,
            ``upgrad``, ...; see :class:`~lightning_mtl.meta.EpisodicModule`); ``None``: their mean.
        diagnostics_every: with a ``meta_balancer``, log the episode-gradient conflict (``diag/*``) every this many
            steps.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        meta_balancer: str | BalancerCallable | None = None,
        diagnostics_every: int = 100,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, meta_balancer=meta_balancer,
                         diagnostics_every=diagnostics_every)
        save_hyperparameters(self, ["backbone", "optimizer", "lr_scheduler"])
        self.backbone = backbone if backbone is not None else Conv4()

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings ``(N, D)`` of images ``(N, C, H, W)``."""
        return self.backbone(self.images(x)).flatten(1)

    def episode_logits(self, episode: Episode, stage: str) -> Tensor:
        support, query = self.embed_episode(episode)
        protos = prototypes(support.float(), episode.support_y, episode.ways)
        return squared_euclidean_logits(query.float(), protos)
