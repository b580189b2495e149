"""Shared machinery of the image episodic datamodules: episode settings, class-major split arrays and dataloaders.

:class:`EpisodicImages` is the base of :class:`~lightning_mtl.datamodules.OmniglotEpisodes`,
:class:`~lightning_mtl.datamodules.image_folder.ImageFolderEpisodes` and
:class:`~lightning_mtl.datamodules.mini_imagenet.MiniImageNetEpisodes`: they serve the same
:class:`~lightning_mtl.Episode` batches, streams and fixed evaluation sets (see
:mod:`lightning_mtl.datamodules.episodes`). With ``train_mode="classes"`` they train on ordinary
:class:`~lightning_mtl.batches.LabelledBatch` batches of all the training images labelled by training class
(:class:`ClassBatches`; pre-training as in Tian et al., ECCV 2020, arXiv:2003.11539) while validation and test stay
the same fixed episodes.

Every one of them takes its episode settings as one typed group, :class:`EpisodeSettings` (``episodes=`` in Python,
``--data.episodes.*`` on the command line, ``episodes:`` under ``init_args`` in YAML), documented there only; their
own arguments are those of their dataset.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lightning_mtl.batches import LabelledBatch
from lightning_mtl.datamodules._resume import train_position
from lightning_mtl.datamodules.episodes import EpisodeSampler, EpisodeStream, FixedEpisodes

STAGES = ("train", "val", "test")
#: stream id of the shuffles of :class:`ClassBatches`, distinct from the episode streams (0, 1, 2 in episodes.STREAMS)
CLASS_STREAM = 3


@dataclass(frozen=True)
class EpisodeSettings:
    """Episode shapes, counts and seeds of an :class:`EpisodicImages` datamodule (every built-in one and a user's
    own): one typed group, ``episodes=EpisodeSettings(...)`` in Python, ``--data.episodes.train_ways 5`` on the
    command line, ``episodes: {train_ways: 5}`` under the datamodule's ``init_args`` in YAML (fields left out keep
    their defaults). This is the one place these settings are documented.

    ``train_mode="classes"`` replaces the training episodes by :class:`ClassBatches` of ``train_batch_size`` images
    (``train_ways``, ``train_shots``, ``train_queries`` and ``meta_batch_size`` are then unused, and training classes
    need only 2 images); ``seed`` seeds either training stream.

    Args:
        train_ways: classes per training episode.
        train_shots: support examples per class in training episodes.
        train_queries: query examples per class in training episodes.
        eval_ways: classes per validation / test episode.
        eval_shots: support examples per class in validation / test episodes.
        eval_queries: query examples per class in validation / test episodes.
        meta_batch_size: training episodes per step.
        eval_meta_batch_size: evaluation episodes per batch (affects speed only, never the episodes).
        val_episodes: size of the fixed validation set.
        test_episodes: size of the fixed test set.
        seed: seed of the training streams.
        eval_seed: seed of the fixed validation and test sets; keep it fixed to compare models.
        num_workers: dataloader worker processes.
        train_mode: ``"episodes"`` (meta-training) or ``"classes"`` (pre-training batches labelled by class).
        train_batch_size: images per training batch and process under ``train_mode="classes"``.
        on_device: keep the images on the accelerator and draw the episodes there
            (:attr:`EpisodicImages.episodes_on_device`).
    """

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
    train_mode: Literal["episodes", "classes"] = "episodes"
    train_batch_size: int = 64
    on_device: bool = False

    def __post_init__(self) -> None:
        if self.train_mode not in ("episodes", "classes"):
            raise ValueError(f"train_mode must be 'episodes' or 'classes', got {self.train_mode!r}")
        if self.train_batch_size < 1:
            raise ValueError(f"train_batch_size must be >= 1, got {self.train_batch_size}")

    @classmethod
    def of(cls, value: EpisodeSettings | Mapping | None) -> EpisodeSettings:
        """``value`` as settings: ``None`` gives the defaults, a mapping (the ``episodes`` entry of saved
        hyper-parameters, a YAML group) its fields over the defaults.

        Raises:
            TypeError: ``value`` is none of these, or a mapping names a field that does not exist.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise TypeError(f"episodes: unknown setting(s) {', '.join(unknown)}; the settings are "
                                f"{', '.join(f.name for f in fields(cls))}.")
            return cls(**value)
        raise TypeError(f"episodes must be an EpisodeSettings (or a mapping of its fields), got {type(value).__name__}")

    def shape(self, stage: str) -> tuple[int, int, int, int]:
        """``(ways, shots, queries, meta_batch_size)`` of ``stage``."""
        if stage == "train":
            if self.train_mode == "classes":
                # only the class array of the train sampler is used: require no more than 2 images per class
                return 1, 1, 1, 1
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
            f"{per_class} of each.", stacklevel=1
        )
    images = payload["images"].numpy()
    out = np.empty((len(classes), per_class, *images.shape[1:]), dtype=np.uint8)
    for i, c in enumerate(classes):
        out[i] = images[starts[c] : starts[c] + per_class]
    return out  # (classes, per_class, C, H, W)


class ClassBatches(IterableDataset):
    """Infinite, seeded batches of all the images of a class-major array, labelled by class.

    Epoch ``e`` is a permutation of all ``classes * samples`` images drawn from ``(seed, e)`` alone, and the epochs
    are concatenated into one stream; global batch ``g`` holds stream positions ``g * B .. g * B + B - 1`` (a batch may
    straddle two epochs, so none is short). Rank ``r`` of ``R`` takes global batches ``r, r + R, ...``, the split of a
    ``DistributedSampler`` made per batch: each image is seen once per epoch across all ranks. Worker ``w`` of ``W``
    takes every ``W``-th batch of its rank, in the round-robin order in which the DataLoader interleaves workers, so
    the batches depend on the seed and the world size only, never on the number of workers.

    Args:
        images: uint8 array ``(classes, samples, C, H, W)``; ``images[c, i]`` has label ``c``.
        batch_size: images per batch of this process.
        seed: seed of the shuffles.
        rank: global rank of this process.
        world_size: number of processes.
        start: index of the first batch of this rank (to continue a stream, e.g. on resume).
    """

    def __init__(
        self, images: np.ndarray, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> None:
        if images.ndim != 5 or images.shape[0] * images.shape[1] == 0:
            raise ValueError(f"images must be a non-empty (classes, samples, C, H, W) array, got {images.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0 .. world_size - 1 = {world_size - 1}, got {rank}")
        self.flat = images.reshape(-1, *images.shape[2:])  # (classes * samples, C, H, W), a view
        self.samples = images.shape[1]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.start = start
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            # batches straddle at most a few epochs: keep only the newest permutations
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            rng = np.random.default_rng([self.seed, CLASS_STREAM, epoch])
            self._orders[epoch] = rng.permutation(len(self.flat))
        return self._orders[epoch]

    def batch(self, index: int) -> LabelledBatch:
        """Global batch ``index`` (of all ranks together)."""
        positions = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
        epochs, within = np.divmod(positions, len(self.flat))
        idx = np.concatenate([self._order(e)[within[epochs == e]] for e in np.unique(epochs)])  # (B,) image indices
        return LabelledBatch(torch.from_numpy(self.flat[idx]), torch.from_numpy(idx // self.samples))

    def __iter__(self) -> Iterator[LabelledBatch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        j = self.start + worker
        while True:
            yield self.batch(j * self.world_size + self.rank)
            j += workers


class EpisodicImages(L.LightningDataModule):
    """Base of datamodules serving N-way K-shot Q-query episodes from in-memory class-major uint8 arrays: subclass
    it for your own dataset.

    A subclass builds one ``(classes, samples, C, H, W)`` uint8 array per stage in ``setup`` and hands them to
    :meth:`set_splits`; everything else is here: the seeded training stream (exact under workers, DDP and resumption),
    the fixed validation and test sets, ``train_mode="classes"`` batches for pre-training, the datamodule state that
    resumes the stream. Its episode settings are one typed group, :class:`EpisodeSettings` (``--data.episodes.*`` on
    the command line, ``episodes:`` in YAML)::

        class MyGlyphs(EpisodicImages):
            def __init__(self, root: str, episodes: EpisodeSettings | None = None) -> None:
                super().__init__(episodes or EpisodeSettings())
                self.root = root

            def setup(self, stage: str | None = None) -> None:
                if not self.samplers:  # arrays: {"train": (classes, samples, C, H, W) uint8, "val": ..., "test": ...}
                    self.set_splits(load_my_arrays(self.root), name="MyGlyphs")

    ``recipes/fewshot.py`` runs it like ours (``data: {class_path: my_module.MyGlyphs, init_args: {root: ...,
    episodes: {train_ways: 5, eval_ways: 5}}}``).

    A subclass that calls ``self.save_hyperparameters()`` records ``episodes`` as a plain dict of every field (see
    :meth:`save_hyperparameters`).

    Args:
        episodes: episode shapes, counts and seeds (:class:`EpisodeSettings`; ``None``: its defaults).
    """

    def __init__(self, episodes: EpisodeSettings | None = None) -> None:
        super().__init__()
        self.episodes = episodes = EpisodeSettings.of(episodes)
        self.episodes_on_device = episodes.on_device
        self.samplers: dict[str, EpisodeSampler] = {}
        self._resume_at: dict[str, int] = {}

    def save_hyperparameters(self, *args, ignore=None, frame=None, logger: bool = True) -> None:
        """Lightning's ``save_hyperparameters``, with the ``episodes`` group recorded as a plain dict of all its
        fields, the settings in use (also where ``episodes`` was left ``None``): checkpoints hold only plain values,
        loadable with ``weights_only=True``, loggers see every setting, and ``load_from_checkpoint`` rebuilds the
        same settings (:meth:`EpisodeSettings.of`)."""
        frame = frame or inspect.currentframe().f_back
        super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)
        for hparams in (self._hparams, getattr(self, "_hparams_initial", None)):
            if hparams is not None and "episodes" in hparams and not isinstance(hparams["episodes"], dict):
                hparams["episodes"] = asdict(self.episodes)

    @classmethod
    def image_shape_for(cls, init_args: dict) -> tuple[int, int, int] | None:
        """The ``(C, H, W)`` of the images this datamodule will serve with the constructor arguments ``init_args``
        (defaults where absent), known before any data is read, so that a model sized for it takes it from the data
        (the recipes' link; see :meth:`lightning_mtl.cli.RecipeCLI.link_episode_shape`). ``None``: not known before
        setup (the base's answer; a subclass whose arguments fix it says so)."""
        return None

    @classmethod
    def _square(cls, init_args: dict, channels: int) -> tuple[int, int, int]:
        size = init_args.get("image_size", inspect.signature(cls.__init__).parameters["image_size"].default)
        return channels, int(size), int(size)

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

    @property
    def num_train_classes(self) -> int:
        """Number of training classes (the labels of ``train_mode="classes"`` batches are ``0 .. n - 1``).

        Raises:
            RuntimeError: called before :meth:`setup`.
        """
        if "train" not in self.samplers:
            raise RuntimeError(f"{type(self).__name__}.num_train_classes is known after setup(); call setup() first.")
        return self.num_classes("train")

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)

    def _loader(self, dataset) -> DataLoader:
        workers = self.episodes.num_workers
        # batch_size=None: the datasets yield whole meta-batches, so no collation happens. The generator seeds the
        # workers, so that starting an iterator never draws from torch's global generator (a resumed run starts its
        # iterators at other times than an uninterrupted one).
        return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                          generator=torch.Generator().manual_seed(self.episodes.seed))

    def state_dict(self) -> dict[str, int]:
        """The position of the training stream (see :func:`~lightning_mtl.datamodules._resume.train_position`)."""
        return train_position(self.trainer)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next :meth:`train_dataloader` continue the stream where the checkpoint left it."""
        self._resume_at = dict(state_dict)

    #: keep the decoded images on the accelerator and draw episodes there (:meth:`EpisodeSampler.to_device`): no
    #: host-to-device copy of images per step; the episodes are exactly those of the host sampler. Needs
    #: ``num_workers=0`` (CUDA tensors do not cross to worker processes).
    episodes_on_device: bool = False

    def _place_samplers(self) -> None:
        if not self.episodes_on_device or self.trainer is None:
            return
        if self.episodes.num_workers:
            raise ValueError("episodes_on_device draws the episodes in the main process: set num_workers 0.")
        device = self.trainer.strategy.root_device
        for sampler in self.samplers.values():
            if not hasattr(sampler, "to_device"):
                raise ValueError(f"{type(self).__name__} cannot draw its episodes on the device; set "
                                 f"episodes.on_device false.")
            if getattr(sampler, "device_images", None) is None or sampler.device_images.device != device:
                sampler.to_device(device)

    def train_dataloader(self) -> DataLoader:
        self._place_samplers()
        rank, world = self._rank()
        e = self.episodes
        # every meta-batch is a pure function of its index: a resumed stream just starts at the next one. (A stream
        # restarts at `start` whenever the loader is iterated again, i.e. at each epoch of `limit_train_batches` runs.)
        start, self._resume_at = self._resume_at.get("batches", 0), {}
        if e.train_mode == "classes":
            # an IterableDataset: Lightning injects no DistributedSampler, ClassBatches splits by rank itself
            images = self.samplers["train"].images
            return self._loader(ClassBatches(images, e.train_batch_size, e.seed, rank, world, start=start))
        return self._loader(EpisodeStream(self.samplers["train"], e.seed, rank=rank, start=start))

    def _eval_dataloader(self, stage: str) -> DataLoader:
        self._place_samplers()
        rank, world = self._rank()
        e = self.episodes
        count = e.val_episodes if stage == "val" else e.test_episodes
        return self._loader(FixedEpisodes(self.samplers[stage], count, e.eval_seed, stage, rank, world))

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")
