"""Siamese networks for one-shot image recognition.

Koch, Zemel & Salakhutdinov, "Siamese Neural Networks for One-shot Image Recognition", ICML 2015 Deep Learning
Workshop.

Twin networks with shared weights embed two images, h_1 = f(x_1) and h_2 = f(x_2); a weighted L1 distance gives the
probability that both show the same class,

    p(x_1, x_2) = σ(s),    s = sum_j α_j |h_1j - h_2j| + b,

symmetric in its arguments (α and the bias b are learned). Training is pairwise verification with binary
cross-entropy, the paper's loss (its per-layer L2 penalty is the optimizer's weight decay here). The pairs come from
each training episode, between its queries and its support examples:

* ``pairs="balanced"`` (default): for every query, its K same-class support examples and K support examples drawn
  uniformly from the other classes, so that, as in the paper's training set, half the pairs match;
* ``pairs="all"``: every query x support pair (K matching pairs for (ways - 1) K non-matching ones per query).

Classification (val / test, and ``train/acc``): a query takes the class of its most similar support example; the
logits are the per-class maxima of s. Logged: ``train/loss``, the pair BCE; ``train/acc``, the N-way accuracy of the
training episode's queries by that rule (comparable with the other meta-learners); ``train/pair_acc``, the
verification accuracy (p > 0.5) on the training pairs (chance 0.5 when balanced). ``val/loss`` and ``test/loss`` are
the BCE of the per-class maximal scores against one-hot labels: in one-shot, the BCE over all query x support pairs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl.batches import Episode
from lightning_mtl.checkpointing import save_hyperparameters
from lightning_mtl.meta._checks import class_one_hot
from lightning_mtl.meta.base import EpisodicModule
from lightning_mtl.mtl.balancing import BalancerCallable
from lightning_mtl.nn import Conv4
from lightning_mtl.nn.probe import feature_dim


class KochEmbedding(nn.Sequential):
    """The paper's twin network: conv 64@10x10, 128@7x7, 128@4x4 (each ReLU and 2x2 max-pooling), 256@4x4 (ReLU),
    then FC to ``features`` units with a sigmoid; weights drawn as in the paper (conv N(0, 1e-2), FC N(0, 0.2), biases
    N(0.5, 1e-2)).

    Args:
        in_channels: image channels.
        image_size: side of the square inputs (105 in the paper; at least 65).
        features: embedding size (4096 in the paper).

    Raises:
        ValueError: ``image_size`` leaves no pixel after the last convolution.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 105, features: int = 4096) -> None:
        if image_size < 65:
            raise ValueError(f"KochEmbedding needs images of side >= 65 (105 in the paper), got {image_size}")
        side = ((((image_size - 9) // 2 - 6) // 2 - 3) // 2) - 3  # spatial side after the last convolution
        super().__init__(
            nn.Conv2d(in_channels, 64, 10), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 7), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(128, 128, 4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 4), nn.ReLU(inplace=True), nn.Flatten(),
            nn.Linear(256 * side * side, features), nn.Sigmoid(),
        )
        for layer in self:
            if isinstance(layer, nn.Conv2d | nn.Linear):
                nn.init.normal_(layer.weight, 0.0, 1e-2 if isinstance(layer, nn.Conv2d) else 0.2)
                nn.init.normal_(layer.bias, 0.5, 1e-2)


def nearest_support_logits(scores: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """Per-class maxima ``(B, Q, ways)`` of pair scores ``(B, Q, S)`` with support labels ``(B, S)``."""
    member = support_y.unsqueeze(1) == torch.arange(ways, device=support_y.device).unsqueeze(-1)  # (B, ways, S)
    masked = scores.unsqueeze(2).masked_fill(~member.unsqueeze(1), torch.finfo(scores.dtype).min)  # (B, Q, ways, S)
    return masked.amax(-1)


class SiameseNetwork(EpisodicModule):
    """Siamese network: weighted-L1 verification trained on episode pairs, nearest-support one-shot classification.

    Args:
        backbone: twin embedding network mapping ``(N, C, H, W)`` images to ``(N, D)``; default :class:`Conv4` for
            28x28 images, :class:`KochEmbedding` is the paper's for 105x105 images.
        image_shape: ``(C, H, W)`` of the inputs, used once to size the weighted L1 layer.
        pairs: training pairs of each episode: ``"balanced"`` or ``"all"`` (see the module docstring).
        optimizer: optimizer factory; default Adam, lr 1e-3 (the paper uses SGD with momentum).
        lr_scheduler: scheduler factory, stepped every episode batch.
        meta_balancer: gradient aggregator of the per-episode outer gradients of a meta-batch (``pcgrad``, ``mgda``,
            ``upgrad``, ...; see :class:`~lightning_mtl.meta.EpisodicModule`); ``None``: their mean.
        diagnostics_every: with a ``meta_balancer``, log the episode-gradient conflict (``diag/*``) every this many
            steps.

    Raises:
        ValueError: ``pairs`` is not ``"balanced"`` or ``"all"``.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        pairs: Literal["balanced", "all"] = "balanced",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        meta_balancer: str | BalancerCallable | None = None,
        diagnostics_every: int = 100,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, meta_balancer=meta_balancer,
                         diagnostics_every=diagnostics_every)
        if pairs not in ("balanced", "all"):
            raise ValueError(f"pairs must be 'balanced' or 'all', got {pairs!r}")
        save_hyperparameters(self, ["backbone", "optimizer", "lr_scheduler"])
        self.backbone = backbone if backbone is not None else Conv4(in_channels=image_shape[0])
        # the weights α_j and the bias b of the weighted L1 distance
        self.head = nn.Linear(feature_dim(self.backbone, image_shape), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings ``(N, D)`` of images ``(N, C, H, W)``."""
        return self.backbone(self.images(x)).flatten(1)

    def similarity(self, h1: Tensor, h2: Tensor) -> Tensor:
        """Pre-sigmoid same-class scores s of embeddings ``h1``, ``h2`` broadcastable to ``(..., D)`` → ``(...)``."""
        return self.head((h1 - h2).abs()).squeeze(-1)

    def pair_scores(self, episode: Episode) -> Tensor:
        """Scores s ``(B, Q, S)`` of every query x support pair of the meta-batch."""
        support, query = self.embed_episode(episode)
        dtype = self.head.weight.dtype  # float32, but the model's dtype under Lightning's "*-true" precisions
        return self.similarity(query.unsqueeze(2).to(dtype), support.unsqueeze(1).to(dtype))

    def pair_weights(self, same: Tensor, shots: int) -> Tensor:
        """Float weights ``(B, Q, S)``: 1 on the training pairs, 0 elsewhere; ``same`` marks the matching pairs."""
        if self.hparams.pairs == "all":
            return torch.ones_like(same, dtype=torch.float32)
        # K random negatives per query: the top-K of uniform noise among the non-matching support examples
        noise = torch.rand(same.shape, device=same.device).masked_fill_(same, -1.0)
        negatives = torch.zeros_like(noise).scatter_(-1, noise.topk(shots, dim=-1).indices, 1.0)
        return same.float() + negatives

    def episode_logits(self, episode: Episode, stage: str) -> Tensor:
        """Per-class maximal scores ``(B, ways * queries, ways)``: the nearest support example decides."""
        return nearest_support_logits(self.pair_scores(episode), episode.support_y, episode.ways)

    def episode_loss(self, logits: Tensor, query_y: Tensor) -> Tensor:
        """BCE of the per-class maximal scores against the one-hot labels (evaluation loss)."""
        onehot = class_one_hot(query_y, logits.shape[-1], torch.float32)
        return F.binary_cross_entropy_with_logits(logits.float(), onehot)

    def episode_losses(self, episode: Episode, stage: str) -> tuple[Tensor, Tensor]:
        """Per-episode pair losses (the weighted BCE of the training step, episode by episode) and accuracies, for
        outer-loop balancing."""
        scores = self.pair_scores(episode)  # (B, Q, S)
        same = episode.query_y.unsqueeze(2) == episode.support_y.unsqueeze(1)
        weights = self.pair_weights(same, episode.shots)
        bce = F.binary_cross_entropy_with_logits(scores, same.float(), reduction="none")
        losses = (bce * weights).sum((1, 2)) / weights.sum((1, 2))
        logits = nearest_support_logits(scores.detach(), episode.support_y, episode.ways)
        return losses, (logits.argmax(-1) == episode.query_y).float().mean(1)

    def training_step(self, episode: Episode, batch_idx: int) -> Tensor:
        if self.meta_balancer_spec is not None:
            return super().training_step(episode, batch_idx)
        self.validate_episode(episode)
        scores = self.pair_scores(episode)  # (B, Q, S)
        same = episode.query_y.unsqueeze(2) == episode.support_y.unsqueeze(1)
        weights = self.pair_weights(same, episode.shots)
        bce = F.binary_cross_entropy_with_logits(scores, same.float(), reduction="none")
        loss = (bce * weights).sum() / weights.sum()
        if self.logs_this_step():
            logits = nearest_support_logits(scores.detach(), episode.support_y, episode.ways)
            pair_acc = (((scores.detach() > 0) == same).float() * weights).sum() / weights.sum()
            b = episode.meta_batch_size
            self.log("train/loss", loss, prog_bar=True, batch_size=b)
            self.log("train/acc", (logits.argmax(-1) == episode.query_y).float().mean(), prog_bar=True, batch_size=b)
            self.log("train/pair_acc", pair_acc, batch_size=b)
        return loss
