"""Multi-domain episodes: every episode drawn from one of several episodic datasets (Meta-Dataset style).

Triantafillou et al., "Meta-Dataset: A Dataset of Datasets for Learning to Learn from Few Examples", ICLR 2020.

Each domain is an episodic datamodule of ours (:class:`~lightning_mtl.datamodules.EpisodicImages`: Omniglot, an
image folder such as the Tiny-ImageNet subset, a user's own). Its class arrays are read once, brought to one image
format, and each episode picks its domain uniformly at random, then its classes within that domain, so an episode
never mixes domains; ``Episode.family`` is the domain's index, so every learner logs each domain's accuracy ± 95% CI
and the worst domain's (``val/<domain>/acc``, ``val/worst_family_acc``). The validation and test sets are fixed
episodes like every datamodule's (seeded by ``eval_seed``), each from one domain's own val / test classes.

Image policy (mixing grey and colour): every image becomes ``channels`` channels of ``image_size`` squared.
Grey to colour repeats the grey channel; colour to grey takes the ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B``;
resizing is area-averaging when shrinking and bilinear (antialiased) when enlarging, rounded back to uint8. Nothing
else changes: Omniglot keeps its white strokes on black, natural images their colours.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from lightning_mtl.batches import Episode
from lightning_mtl.datamodules._episodic import STAGES, EpisodeSettings, EpisodicImages
from lightning_mtl.datamodules.episodes import EpisodeSampler


def convert_images(images: np.ndarray, channels: int, size: int) -> np.ndarray:
    """``(classes, samples, C, H, W)`` uint8 images as ``channels`` channels of ``size`` x ``size`` (the policy of the
    module docstring)."""
    classes, samples, c, h, w = images.shape
    x = torch.from_numpy(np.ascontiguousarray(images)).reshape(classes * samples, c, h, w).float()
    if c != channels:
        if c == 1:
            x = x.expand(-1, channels, -1, -1)
        elif c == 3 and channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {c}-channel images to {channels} channels; use 1 or 3")
    if (h, w) != (size, size):
        shrink = h >= size and w >= size
        x = F.interpolate(x, size=(size, size), mode="area") if shrink else \
            F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    out = x.round().clamp(0, 255).to(torch.uint8)
    return out.reshape(classes, samples, channels, size, size).numpy()


class MixedSampler:
    """Episodes from one of several :class:`~lightning_mtl.datamodules.episodes.EpisodeSampler` s (same episode
    shape and image format), the domain drawn uniformly per episode from the episode's own generator; each episode
    carries its domain index (``Episode.family``)."""

    def __init__(self, samplers: list[EpisodeSampler], name: str) -> None:
        self.samplers, self.name = samplers, name
        first = samplers[0]
        self.ways, self.shots, self.queries = first.ways, first.shots, first.queries
        self.meta_batch_size = first.meta_batch_size
        self._support_y, self._query_y = first._support_y, first._query_y

    @property
    def num_classes(self) -> int:
        return sum(s.num_classes for s in self.samplers)

    @property
    def num_families(self) -> int:
        return len(self.samplers)

    def episode(self, rngs: list[np.random.Generator]) -> Episode:
        domains = [int(rng.integers(len(self.samplers))) for rng in rngs]
        x = np.stack([self.samplers[d]._draw(rng)[0] for d, rng in zip(domains, rngs, strict=True)])
        b, k = len(rngs), self.shots
        shape = x.shape[3:]
        support = torch.from_numpy(np.ascontiguousarray(x[:, :, :k]).reshape(b, -1, *shape))
        query = torch.from_numpy(np.ascontiguousarray(x[:, :, k:]).reshape(b, -1, *shape))
        return Episode(support, self._support_y[:b], query, self._query_y[:b], self.ways, torch.tensor(domains))


class MultiDomainEpisodes(EpisodicImages):
    """N-way K-shot episodes, each from one of ``domains`` (see the module docstring for the sampling and the image
    policy).

    Args:
        domains: the episodic datamodules to draw from (in YAML a list of ``class_path`` / ``init_args``); only
            their data and splits are used: the episode settings are this datamodule's.
        names: one name per domain, for the logged metrics (``val/<name>/acc``); default ``domain0``, ``domain1``...
        image_size: side of the square images every domain is brought to.
        channels: 1 (grey) or 3 (colour) channels for every domain.
        episodes: shapes, counts and seeds of the episodes: see :class:`~lightning_mtl.datamodules.EpisodeSettings`.

    Raises:
        ValueError: no domain, names that do not match the domains, a domain that is not an ``EpisodicImages``
            datamodule, or ``train_mode="classes"`` (class batches over several domains are not defined here).
    """

    def __init__(
        self,
        domains: list[EpisodicImages],
        names: list[str] | None = None,
        image_size: int = 28,
        channels: Literal[1, 3] = 1,
        episodes: EpisodeSettings | None = None,
    ) -> None:
        super().__init__(episodes)
        if not domains:
            raise ValueError("MultiDomainEpisodes needs at least one domain")
        if not all(isinstance(d, EpisodicImages) for d in domains):
            raise ValueError(f"every domain must be an episodic datamodule (EpisodicImages), got "
                             f"{[type(d).__name__ for d in domains]}")
        if names is not None and (len(names) != len(domains) or len(set(names)) != len(names)):
            raise ValueError(f"names must give {len(domains)} distinct names, one per domain, got {names}")
        if self.episodes.train_mode != "episodes":
            raise ValueError("MultiDomainEpisodes serves episodes; train_mode='classes' is not supported")
        if channels not in (1, 3) or image_size < 1:
            raise ValueError(f"need channels 1 or 3 and image_size >= 1, got {channels} and {image_size}")
        self.domains = list(domains)
        self.names = list(names) if names is not None else [f"domain{i}" for i in range(len(domains))]
        self.image_size, self.channels = image_size, channels

    @classmethod
    def image_shape_for(cls, init_args: dict) -> tuple[int, int, int]:
        return int(init_args.get("channels", 1)), int(init_args.get("image_size", 28)), int(
            init_args.get("image_size", 28))

    def family_names(self, stage: str) -> list[str]:
        """The domain names, in the order of ``Episode.family``."""
        return list(self.names)

    def prepare_data(self) -> None:
        for domain in self.domains:
            domain.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.samplers:
            return
        arrays: dict[str, list[np.ndarray]] = {s: [] for s in STAGES}
        for domain in self.domains:
            domain.setup("fit")
            for s in STAGES:
                arrays[s].append(convert_images(domain.samplers[s].images, self.channels, self.image_size))
        for s in STAGES:
            ways, shots, queries, batch = self.episodes.shape(s)
            samplers = [EpisodeSampler(a, ways, shots, queries, batch, name=f"{name}/{s}")
                        for a, name in zip(arrays[s], self.names, strict=True)]
            self.samplers[s] = MixedSampler(samplers, name=f"multi-domain/{s}")
