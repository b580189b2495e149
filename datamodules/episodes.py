"""N-way K-shot episode sampling from an in-memory class-major image array.

Every episode is a pure function of ``(seed, stream, rank, index)``: its random generator is seeded from those four
numbers (numpy ``SeedSequence``), so the episodes a run sees do not depend on the number of dataloader workers, and
ranks, workers and splits never share a stream. Training streams are infinite; evaluation sets are a fixed, finite
list of episodes, split across ranks and workers without padding so that every episode is evaluated exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lightning_mtl.batches import Episode

#: stream ids mixed into the episode seeds so that splits never share random numbers.
STREAMS = {"train": 0, "val": 1, "test": 2}


class EpisodeSampler:
    """Draws N-way K-shot Q-query episodes from ``images`` of shape ``(classes, samples, C, H, W)``.

    Args:
        images: uint8 array, class-major: ``images[c, i]`` is sample ``i`` of class ``c``.
        ways: classes per episode (N).
        shots: support examples per class (K).
        queries: query examples per class (Q); support and query examples of a class are distinct samples.
        meta_batch_size: episodes stacked into one :class:`~lightning_mtl.batches.Episode`.
        name: what the classes are, used in error messages (e.g. ``"Omniglot vinyals/train"``).
        families: ``(classes,)`` family index of every class (e.g. its alphabet): each episode then draws a family
            uniformly among those with at least ``ways`` classes, takes its classes from it, and carries the family
            index (``Episode.family``). ``None``: classes from the whole split (and no extra random draw).

    Raises:
        ValueError: an episode cannot be drawn from ``images`` with these settings.
    """

    def __init__(
        self, images: np.ndarray, ways: int, shots: int, queries: int, meta_batch_size: int = 1, name: str = "dataset",
        families: np.ndarray | None = None,
    ) -> None:
        if images.ndim != 5:
            raise ValueError(f"{name}: images must have shape (classes, samples, C, H, W), got {images.shape}")
        n_classes, n_samples = images.shape[:2]
        counts = {"ways": ways, "shots": shots, "queries": queries, "meta_batch_size": meta_batch_size}
        for arg, value in counts.items():
            if value < 1:
                raise ValueError(f"{name}: {arg} must be >= 1, got {value}")
        if ways > n_classes:
            raise ValueError(
                f"{name}: {ways}-way episodes need {ways} classes but the split has only {n_classes}; "
                f"lower the ways to at most {n_classes}."
            )
        if shots + queries > n_samples:
            raise ValueError(
                f"{name}: shots + queries = {shots} + {queries} = {shots + queries} exceeds the {n_samples} examples "
                f"per class; lower shots or queries so that shots + queries <= {n_samples}."
            )
        self.images = images
        self.ways, self.shots, self.queries, self.meta_batch_size = ways, shots, queries, meta_batch_size
        self.families = None if families is None else np.asarray(families, dtype=np.int64)
        if self.families is not None:
            if self.families.shape != (n_classes,):
                raise ValueError(f"{name}: families must give one family per class ({n_classes}), got shape "
                                 f"{self.families.shape}")
            self.members = [np.flatnonzero(self.families == f) for f in np.unique(self.families)]
            self.family_ids = np.unique(self.families)
            usable = [len(m) >= ways for m in self.members]
            if not any(usable):
                raise ValueError(f"{name}: no family has {ways} classes for {ways}-way episodes drawn within a "
                                 f"family; lower the ways.")
            self.members = [m for m, ok in zip(self.members, usable, strict=True) if ok]
            self.family_ids = self.family_ids[np.asarray(usable)]
        self.name = name
        self._support_y = torch.arange(ways).repeat_interleave(shots).expand(meta_batch_size, -1).contiguous()
        self._query_y = torch.arange(ways).repeat_interleave(queries).expand(meta_batch_size, -1).contiguous()

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def num_families(self) -> int:
        """Number of families episodes are drawn from (0 without families)."""
        return 0 if self.families is None else int(self.families.max()) + 1

    def to_device(self, device: torch.device | str) -> EpisodeSampler:
        """Keep a copy of the images on ``device`` and gather every episode there: the random draws stay on the host
        (the same generators, so exactly the episodes of the host sampler), only the few indices of an episode cross
        to the device, never its images. Returns ``self``."""
        self.device_images = torch.from_numpy(np.ascontiguousarray(self.images)).to(device)
        return self

    def _indices(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """The classes ``(ways,)``, the sample order ``(ways, shots + queries)`` and the family of one episode."""
        family = -1
        if self.families is None:
            classes = rng.choice(self.num_classes, self.ways, replace=False)  # (ways,)
        else:
            pick = int(rng.integers(len(self.members)))
            family, classes = int(self.family_ids[pick]), rng.choice(self.members[pick], self.ways, replace=False)
        # an independent permutation of the samples of each chosen class; first K support, next Q query
        order = rng.random((self.ways, self.images.shape[1])).argsort(axis=1)[:, : self.shots + self.queries]
        return classes, order, family

    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        classes, order, family = self._indices(rng)
        return self.images[classes[:, None], order], family  # (ways, shots + queries, C, H, W), family index

    def episode(self, rngs: list[np.random.Generator]) -> Episode:
        """One meta-batch; ``rngs[b]`` draws episode ``b`` (gathered on the device after :meth:`to_device`)."""
        if getattr(self, "device_images", None) is not None:
            return self._device_episode(rngs)
        draws = [self._draw(rng) for rng in rngs]
        x = np.stack([d[0] for d in draws])  # (B, ways, K + Q, C, H, W)
        b, k = len(rngs), self.shots
        shape = x.shape[3:]
        support = torch.from_numpy(np.ascontiguousarray(x[:, :, :k]).reshape(b, -1, *shape))
        query = torch.from_numpy(np.ascontiguousarray(x[:, :, k:]).reshape(b, -1, *shape))
        family = None if self.families is None else torch.tensor([d[1] for d in draws])
        return Episode(support, self._support_y[:b], query, self._query_y[:b], self.ways, family)

    def _device_episode(self, rngs: list[np.random.Generator]) -> Episode:
        draws = [self._indices(rng) for rng in rngs]
        device = self.device_images.device
        classes = torch.from_numpy(np.stack([d[0] for d in draws])).to(device)  # (B, ways)
        order = torch.from_numpy(np.stack([d[1] for d in draws])).to(device)  # (B, ways, K + Q)
        x = self.device_images[classes[:, :, None], order]  # (B, ways, K + Q, C, H, W)
        b, k = len(rngs), self.shots
        shape = x.shape[3:]
        support, query = x[:, :, :k].reshape(b, -1, *shape), x[:, :, k:].reshape(b, -1, *shape)
        family = None if self.families is None else torch.tensor([d[2] for d in draws], device=device)
        return Episode(support, self._support_y[:b].to(device), query, self._query_y[:b].to(device), self.ways,
                       family)


def episode_rng(seed: int, stream: str, rank: int, index: int) -> np.random.Generator:
    """The generator of episode ``index`` of ``stream`` on ``rank``."""
    return np.random.default_rng([seed, STREAMS[stream], rank, index])


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class EpisodeStream(IterableDataset):
    """Infinite, seeded training episodes for one rank.

    Meta-batch ``j`` of rank ``r`` holds episodes ``j * B .. j * B + B - 1`` of stream ``(seed, "train", r)``.
    Worker ``w`` of ``W`` yields the meta-batches ``j ≡ w (mod W)`` and the DataLoader interleaves workers in that same
    round-robin order, so the sequence is identical for any number of workers.

    Args:
        sampler: draws the episodes.
        seed: base seed of the run.
        rank: global rank of this process; each rank draws its own episodes.
        start: index of the first meta-batch (to continue a stream).
    """

    def __init__(self, sampler: EpisodeSampler, seed: int, rank: int = 0, start: int = 0) -> None:
        self.sampler, self.seed, self.rank, self.start = sampler, seed, rank, start

    def __iter__(self) -> Iterator[Episode]:
        worker, workers = _worker()
        b = self.sampler.meta_batch_size
        j = self.start + worker
        while True:
            yield self.sampler.episode([episode_rng(self.seed, "train", self.rank, j * b + i) for i in range(b)])
            j += workers


class FixedEpisodes(IterableDataset):
    """A fixed evaluation set of ``num_episodes`` episodes, identical for every run, model and world size.

    Episode ``i`` depends only on ``(seed, stream, i)``. The set is cut into meta-batches of ``sampler.meta_batch_size``
    consecutive episodes (the last may be smaller); rank ``r`` of ``R`` takes meta-batches ``r, r + R, ...`` and its
    workers split those further, so each episode is evaluated exactly once across all processes, with no padding.
    """

    def __init__(
        self, sampler: EpisodeSampler, num_episodes: int, seed: int, stream: str, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_episodes < 1:
            raise ValueError(f"{sampler.name}: the number of {stream} episodes must be >= 1, got {num_episodes}")
        self.sampler, self.num_episodes, self.seed, self.stream = sampler, num_episodes, seed, stream
        self.rank, self.world_size = rank, world_size

    def _batches(self) -> range:
        n_batches = math.ceil(self.num_episodes / self.sampler.meta_batch_size)
        return range(self.rank, n_batches, self.world_size)

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self) -> Iterator[Episode]:
        worker, workers = _worker()
        b = self.sampler.meta_batch_size
        for j in self._batches()[worker::workers]:
            indices = range(j * b, min((j + 1) * b, self.num_episodes))
            # the eval stream ignores the rank: episode i is the same whichever process draws it
            yield self.sampler.episode([episode_rng(self.seed, self.stream, 0, i) for i in indices])
