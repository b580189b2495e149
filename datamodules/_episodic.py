"""Shared machinery of the image episodic datamodules: episode settings, class-major split arrays and dataloaders.

:class:`EpisodicImages` is the base of :class:`~lightning_mtl.datamodules.OmniglotEpisodes`,
:class:`~lightning_mtl.datamodules.image_folder.ImageFolderEpisodes` and
:class:`~lightning_mtl.datamodules.mini_imagenet.MiniImageNetEpisodes`: they serve the same
:class:`~lightning_mtl.Episode` batches, streams and fixed evaluation sets (see
:mod:`lightning_mtl.datamodules.episodes`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from lightning_mtl.datamodules.episodes import EpisodeSampler, EpisodeStream, FixedEpisodes

STAGES = ("train", "val", "test")


@dataclass(frozen=True)
class EpisodeSettings:
    """Episode shapes, counts and seeds; the arguments are those of the datamodule constructors."""

    train_ways: int = 5
    train_shots: int = 1
    train_queries: int = 15
    eval_ways: int = 5
    eval_shots: int = 1
    eval_queries: int = 15
    meta_batch_size: int = 1
    eval_meta_batch_size: int = 16
    val_episodes: int = 600
    test_episodes: int = 1000
    seed: int = 0
    eval_seed: int = 0
    num_workers: int = 0

    def shape(self, stage: str) -> tuple[int, int, int, int]:
        """``(ways, shots, queries, meta_batch_size)`` of ``stage``."""
        if stage == "train":
            return self.train_ways, self.train_shots, self.train_queries, self.meta_batch_size
        return self.eval_ways, self.eval_shots, self.eval_queries, self.eval_meta_batch_size


def class_major(payload: dict, classes: list[str], shots: int, queries: int, name: str) -> np.ndarray:
    """``(classes, samples, C, H, W)`` uint8 array of ``classes`` from a flat image cache.

    ``payload`` holds ``images`` ``(N, C, H, W)`` (uint8 tensor, class-major), ``classes`` and ``counts`` (images
    per class). Classes of unequal size are cut to the smallest one of the split (first images by file order), since
    :class:`EpisodeSampler` draws from a rectangular array.

    Raises:
        ValueError: a class has fewer than ``shots + queries`` images.
    """
    counts = dict(zip(payload["classes"], payload["counts"], strict=True))
    starts = dict(zip(payload["classes"], np.cumsum([0, *payload["counts"]]).tolist(), strict=False))
    needed = shots + queries
    for c in classes:
        if counts[c] < needed:
            raise ValueError(
                f"{name}: class {c} has {counts[c]} images but episodes need shots + queries = {shots} + {queries} = "
                f"{needed}; add images to {c}, move it out of this split, or lower shots / queries."
            )
    per_class = min(counts[c] for c in classes) if classes else 0
    if classes and max(counts[c] for c in classes) != per_class:
        warnings.warn(
            f"{name}: classes hold {per_class} to {max(counts[c] for c in classes)} images; episodes use the first "
            f"{per_class} of each.", stacklevel=3
        )
    images = payload["images"].numpy()
    out = np.empty((len(classes), per_class, *images.shape[1:]), dtype=np.uint8)
    for i, c in enumerate(classes):
        out[i] = images[starts[c] : starts[c] + per_class]
    return out  # (classes, per_class, C, H, W)


class EpisodicImages(L.LightningDataModule):
    """Base of datamodules serving N-way K-shot Q-query episodes from in-memory class-major uint8 arrays.

    Subclasses build their class arrays in ``setup`` and hand them to :meth:`set_splits`.

    Args:
        episodes: episode shapes, counts and seeds.
    """

    def __init__(self, episodes: EpisodeSettings) -> None:
        super().__init__()
        self.episodes = episodes
        self.samplers: dict[str, EpisodeSampler] = {}

    def split_array(self, payload: dict, classes: list[str], stage: str, name: str) -> np.ndarray:
        """The class-major array of ``classes`` checked against the episode shape of ``stage``."""
        _, shots, queries, _ = self.episodes.shape(stage)
        return class_major(payload, classes, shots, queries, name)

    def set_splits(self, arrays: dict[str, np.ndarray], name: str) -> None:
        """One :class:`EpisodeSampler` per stage from ``(classes, samples, C, H, W)`` arrays keyed by stage."""
        for stage in STAGES:
            ways, shots, queries, batch = self.episodes.shape(stage)
            self.samplers[stage] = EpisodeSampler(arrays[stage], ways, shots, queries, batch, name=f"{name}/{stage}")

    def num_classes(self, stage: str) -> int:
        """Number of classes of ``stage`` (``"train"``, ``"val"`` or ``"test"``) after :meth:`setup`."""
        return self.samplers[stage].num_classes

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)

    def _loader(self, dataset) -> DataLoader:
        workers = self.episodes.num_workers
        # batch_size=None: the datasets yield whole meta-batches, so no collation happens.
        return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        rank, _ = self._rank()
        return self._loader(EpisodeStream(self.samplers["train"], self.episodes.seed, rank=rank))

    def _eval_dataloader(self, stage: str) -> DataLoader:
        rank, world = self._rank()
        e = self.episodes
        count = e.val_episodes if stage == "val" else e.test_episodes
        return self._loader(FixedEpisodes(self.samplers[stage], count, e.eval_seed, stage, rank, world))

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")
