"""Tiny float64 episodes and the MAML-family meta-loss, shared by the gradient-based meta-learner tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_mtl import Episode
from lightning_mtl.meta import MAML


def tiny_episode(ways=3, shots=2, queries=2, meta_batch=2, seed=0) -> Episode:
    """A meta-batch of 2x2 single-channel float64 episodes, labels in class-major order."""
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(meta_batch, ways * shots, 1, 2, 2, generator=g, dtype=torch.float64)
    qx = torch.randn(meta_batch, ways * queries, 1, 2, 2, generator=g, dtype=torch.float64)
    sy = torch.arange(ways).repeat_interleave(shots).expand(meta_batch, -1)
    qy = torch.arange(ways).repeat_interleave(queries).expand(meta_batch, -1)
    return Episode(sx, sy, qx, qy, ways)


def meta_loss(model: MAML, episode: Episode) -> torch.Tensor:
    """The query cross-entropy after adaptation, in the model's own dtype (float64 for finite differences)."""
    logits = model.episode_logits(episode, "train")
    return F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten())
