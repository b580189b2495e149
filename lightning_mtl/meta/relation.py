"""Relation Networks.

Sung, Yang, Zhang, Xiang, Torr & Hospedales, "Learning to Compare: Relation Network for Few-Shot Learning", CVPR 2018,
arXiv:1711.06025.

An embedding module f maps images to feature maps (no flattening); the feature of class k is the element-wise sum of
its embedded shots, c_k = sum_{(x, y) in S_k} f(x) (the embedding itself in one-shot); a relation module g scores
every query x_j against every class on the channel-wise concatenation C of the two maps:

    r_{k,j} = g(C(c_k, f(x_j))) in (0, 1),

trained by regressing the scores to the one-hot match, the paper's loss sum_{k,j} (r_{k,j} - 1[y_j = k])^2, here
averaged over the ways x queries scores and the meta-batch as in the authors' code (a constant factor). The base class
logs this MSE as ``*/loss``; queries are classified by their highest relation score.

Architecture (Omniglot, as in the authors' code): the embedding is 4 blocks [conv 3x3 with 64 filters, BatchNorm,
ReLU], the first two unpadded and followed by 2x2 max-pooling (28x28 → 64x5x5); the relation module is 2 such blocks
with max-pooling (padding 1 on Omniglot, 0 on miniImageNet), then FC to 8 units (ReLU) and FC to 1 (sigmoid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl.batches import Episode
from lightning_mtl.checkpointing import save_hyperparameters
from lightning_mtl.meta._checks import class_one_hot
from lightning_mtl.meta.base import EpisodicModule
from lightning_mtl.mtl.balancing import BalancerCallable
from lightning_mtl.nn.probe import probe


def conv_block(c_in: int, c_out: int, padding: int, pool: bool) -> nn.Sequential:
    """[conv 3x3, BatchNorm, ReLU] with an optional 2x2 max-pooling."""
    layers = [nn.Conv2d(c_in, c_out, 3, padding=padding), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class RelationEmbedding(nn.Sequential):
    """The paper's embedding module: ``(N, C, H, W)`` images → ``(N, channels, h, w)`` maps (5x5 for 28x28 inputs).

    Args:
        in_channels: image channels (1 for Omniglot, 3 for colour images).
        channels: filters of every block.
    """

    def __init__(self, in_channels: int = 1, channels: int = 64) -> None:
        super().__init__(
            conv_block(in_channels, channels, padding=0, pool=True),
            conv_block(channels, channels, padding=0, pool=True),
            conv_block(channels, channels, padding=1, pool=False),
            conv_block(channels, channels, padding=1, pool=False),
        )


def class_features(maps: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Per-class sums ``(B, ways, C, h, w)`` of support ``maps`` ``(B, S, C, h, w)`` with ``labels`` ``(B, S)``."""
    onehot = class_one_hot(labels, ways, maps.dtype)  # (B, S, ways)
    return (onehot.transpose(1, 2) @ maps.flatten(2)).view(labels.shape[0], ways, *maps.shape[2:])


class RelationNetwork(EpisodicModule):
    """Relation network: learned relation scores between query maps and summed class maps, trained with MSE.

    Args:
        backbone: embedding module mapping ``(N, C, H, W)`` images to feature maps ``(N, C', h, w)``; default
            :class:`RelationEmbedding` (the paper's).
        image_shape: ``(C, H, W)`` of the inputs, used once to size the relation module.
        relation_channels: filters of the two conv blocks of the relation module (64 in the paper).
        relation_hidden: units of the hidden FC layer of the relation module (8 in the paper).
        relation_padding: padding of the relation convolutions: 1 for 28x28 Omniglot, 0 for 84x84 miniImageNet.
        optimizer: optimizer factory; default Adam, lr 1e-3 (the paper's).
        lr_scheduler: scheduler factory, stepped every episode batch (the paper halves the lr every 100k episodes).
        meta_balancer: gradient aggregator of the per-episode outer gradients of a meta-batch (``pcgrad``, ``mgda``,
            ``upgrad``, ...; see :class:`~lightning_mtl.meta.EpisodicModule`); ``None``: their mean.
        diagnostics_every: with a ``meta_balancer``, log the episode-gradient conflict (``diag/*``) every this many
            steps.

    Raises:
        ValueError: the backbone does not return feature maps, or they are too small for the relation module.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        relation_channels: int = 64,
        relation_hidden: int = 8,
        relation_padding: int = 1,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        meta_balancer: str | BalancerCallable | None = None,
        diagnostics_every: int = 100,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, meta_balancer=meta_balancer,
                         diagnostics_every=diagnostics_every)
        save_hyperparameters(self, ["backbone", "optimizer", "lr_scheduler"])
        self.backbone = backbone if backbone is not None else RelationEmbedding(image_shape[0])
        maps = probe(self.backbone, torch.zeros(2, *image_shape))
        if maps.ndim != 4:
            raise ValueError(
                f"RelationNetwork needs a backbone returning feature maps (N, C, h, w), got shape {tuple(maps.shape)} "
                "for images of shape (2, *image_shape); drop the final flattening (e.g. pass Conv4(...).features)"
            )
        convs = nn.Sequential(
            conv_block(2 * maps.shape[1], relation_channels, relation_padding, pool=True),
            conv_block(relation_channels, relation_channels, relation_padding, pool=True),
            nn.Flatten(),
        )
        try:
            features = probe(convs, torch.cat([maps, maps], 1)).shape[1]
        except RuntimeError as err:
            raise ValueError(
                f"feature maps of shape {tuple(maps.shape[1:])} are too small for two relation blocks with padding "
                f"{relation_padding}; use relation_padding=1 or larger images"
            ) from err
        self.relation = nn.Sequential(
            convs, nn.Linear(features, relation_hidden), nn.ReLU(inplace=True), nn.Linear(relation_hidden, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Feature maps ``(N, C', h, w)`` of images ``(N, C, H, W)``."""
        return self.backbone(self.images(x))

    def relation_scores(self, classes: Tensor, query: Tensor) -> Tensor:
        """Scores ``(B, Q, W)`` in (0, 1) of ``query`` ``(B, Q, C, h, w)`` against ``classes`` ``(B, W, C, h, w)``."""
        b, q, ways = query.shape[0], query.shape[1], classes.shape[1]
        pairs = torch.cat(  # (B, Q, ways, 2C, h, w): class map first, then query map, as in the authors' code
            [classes.unsqueeze(1).expand(b, q, *classes.shape[1:]), query.unsqueeze(2).expand(b, q, ways, -1, -1, -1)],
            dim=3,
        )
        return self.relation(pairs.flatten(0, 2)).view(b, q, ways)

    def episode_logits(self, episode: Episode, stage: str) -> Tensor:
        """Relation scores ``(B, ways * queries, ways)`` in (0, 1) of the queries against the classes."""
        support, query = self.embed_episode(episode)  # (B, S, C, h, w), (B, Q, C, h, w)
        classes = class_features(support, episode.support_y, episode.ways)
        return self.relation_scores(classes, query).float()

    def episode_loss(self, logits: Tensor, query_y: Tensor) -> Tensor:
        """Mean squared error between the relation scores and the one-hot query labels (the paper's loss)."""
        onehot = class_one_hot(query_y, logits.shape[-1], torch.float32)
        return F.mse_loss(logits.float(), onehot)
