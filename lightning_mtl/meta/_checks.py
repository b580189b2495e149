"""Helpers shared by the meta-learners: episode shape checks (no device synchronisation) and class one-hots."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.batches import Episode


def class_one_hot(labels: Tensor, ways: int, dtype: torch.dtype) -> Tensor:
    """``(..., ways)`` one-hot encoding of episode labels in ``0 .. ways - 1``, in ``dtype``."""
    return (labels.unsqueeze(-1) == torch.arange(ways, device=labels.device)).to(dtype)


def check_episode(episode: Episode, method: str, min_ways: int = 2) -> None:
    """Raise a :class:`ValueError` naming what to fix when ``episode`` is not a well-formed N-way K-shot meta-batch.

    Only shapes are checked: label values would need a device synchronisation every step.

    Args:
        episode: the meta-batch to check.
        method: name of the calling method, used in the messages.
        min_ways: smallest number of classes per episode the method supports.

    Raises:
        ValueError: the images are not ``(B, N, C, H, W)``, labels and images disagree in shape, the support set is
            not ``ways * shots`` examples, or ``ways < min_ways``.
    """
    sx, sy, qx, qy, ways = episode[:5]
    if ways < min_ways:
        raise ValueError(f"{method} needs episodes of at least {min_ways} ways, got {ways}-way episodes")
    for name, x, y in (("support", sx, sy), ("query", qx, qy)):
        if x.ndim != 5:
            raise ValueError(f"{method}: {name}_x must be (B, N, C, H, W) images, got shape {tuple(x.shape)}")
        if tuple(y.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"{method}: {name}_y has shape {tuple(y.shape)} but {name}_x holds {tuple(x.shape[:2])} (B, N) "
                f"images; give one label per {name} image"
            )
    if sx.shape[0] != qx.shape[0] or sx.shape[2:] != qx.shape[2:]:
        raise ValueError(
            f"{method}: support images {tuple(sx.shape)} and query images {tuple(qx.shape)} must share the "
            "meta-batch size B and the image shape (C, H, W)"
        )
    if sx.shape[1] % ways != 0 or sx.shape[1] == 0:
        raise ValueError(
            f"{method}: the support set has {sx.shape[1]} examples, not a positive multiple of ways={ways}; "
            "set Episode.ways to the number of classes of the episode (ways * shots support examples)"
        )
