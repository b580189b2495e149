"""Multi-task datamodules: one labelled dataset per task, or one dataset with a target per task.

A subclass of :class:`MultiTaskDataModule` implements :meth:`~MultiTaskDataModule.build_splits`, returning a
:class:`TaskSplits` (train / val / test datasets and each task's class count) in one of two forms:

* **one dataset per task** (``{task: Dataset}``, samples ``(x, y)``; e.g. Omniglot alphabets): one DataLoader per
  task (``batch_size`` samples per task and step), combined by Lightning's
  :class:`~lightning.pytorch.utilities.combined_loader.CombinedLoader` into
  ``MultiTaskBatch(x={task: inputs}, targets={task: targets})``. Modes:
  ``max_size_cycle``: the epoch ends with the largest task, smaller ones restart reshuffled; every batch holds every
  task. ``min_size``: the epoch ends with the smallest task. ``sequential``: all batches of the first task, then of
  the second, ...; one task per batch. Lightning's fit loop refuses ``sequential`` for training; it is the default
  ``eval_mode`` (every sample counted once), where Lightning passes ``dataloader_idx`` to ``validation_step`` /
  ``test_step`` and suffixes logged names with it unless ``add_dataloader_idx=False``.
* **one dataset for all tasks** (a ``Dataset`` whose samples are ``(x, {task: y})``, e.g. :class:`MultiTargetDataset`;
  MultiMNIST), batched into ``MultiTaskBatch(x=inputs, targets={task: targets})``; the modes do not apply.

Training order is reproducible: each task's sampler draws a fresh permutation per pass from a ``torch.Generator``
seeded with ``(seed, task index, epoch, pass)``; Lightning sets the epoch through ``set_epoch``. It is also resumable:
the datamodule's ``state_dict`` (in every checkpoint) holds the epoch and the number of its batches the fit loop took
(:func:`~lightning_mtl.datamodules._resume.train_position`), from which each task's loader restarts at its pass and
batch.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from lightning_mtl.batches import MultiTaskBatch
from lightning_mtl.datamodules._resume import train_position

Mode = Literal["max_size_cycle", "min_size", "sequential"]
MODES = ("max_size_cycle", "min_size", "sequential")


@dataclass(frozen=True)
class TaskSplits:
    """What :meth:`MultiTaskDataModule.build_splits` returns.

    Attributes:
        num_classes: class count of each task, in task order.
        train: ``{task: Dataset}`` with ``(x, y)`` samples, or one Dataset with ``(x, {task: y})`` samples.
        val: same form as ``train``.
        test: same form as ``train``.
    """

    num_classes: dict[str, int]
    train: dict[str, Dataset] | Dataset
    val: dict[str, Dataset] | Dataset
    test: dict[str, Dataset] | Dataset


class MultiTargetDataset(Dataset):
    """Samples ``(x[i], {task: targets[task][i]})``: one input tensor shared by every task.

    Args:
        x: ``(N, ...)`` inputs.
        targets: ``(N,)`` targets of each task.
    """

    def __init__(self, x: Tensor, targets: dict[str, Tensor]) -> None:
        for task, y in targets.items():
            if len(y) != len(x):
                raise ValueError(f"task {task!r} has {len(y)} targets for {len(x)} inputs")
        self.x, self.targets = x, targets

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.x[i], {task: y[i] for task, y in self.targets.items()}


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` per pass, seeded with ``(seed, stream, epoch, pass)``.

    ``set_epoch`` (called by Lightning) with a new epoch starts its pass 0; every ``iter()`` within an epoch is a new
    pass, so a task that ``max_size_cycle`` restarts is reshuffled rather than replayed. ``epoch`` and ``passes`` set
    where the first ``iter()`` starts (to resume).
    """

    def __init__(self, n: int, seed: int, stream: int = 0, epoch: int = 0, passes: int = 0) -> None:
        self.n, self.seed, self.stream = n, seed, stream
        self.epoch, self._passes = epoch, passes

    def set_epoch(self, epoch: int) -> None:
        # Lightning calls it after the first iter() of a fit (workers start prefetching at iter()): the same epoch
        # must not rewind the passes
        if epoch != self.epoch:
            self.epoch, self._passes = epoch, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        state = np.random.SeedSequence([self.seed, self.stream, self.epoch, self._passes]).generate_state(1)[0]
        self._passes += 1
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(int(state))).tolist())


def collate_shared(samples: list) -> MultiTaskBatch:
    """Collate ``(x, {task: y})`` samples into ``MultiTaskBatch(x, {task: y})``."""
    x, targets = default_collate(samples)
    return MultiTaskBatch(x, targets)


_MID_EPOCH_RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch"


class ResumedLoader(DataLoader):
    """A DataLoader whose first iteration skips its first ``skip`` batches (those taken before a checkpoint).

    The skipped batches are loaded and dropped, after any sharding of the indices (Lightning's distributed sampler),
    so the skip is right on every rank; the datasets here are in memory, which makes it cheap.
    """

    def __init__(self, *args, skip: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip = skip

    def __iter__(self):
        iterator = super().__iter__()
        skip, self.skip = self.skip, 0
        for _ in range(skip):
            next(iterator)
        return iterator


class MultiTaskLoader(CombinedLoader):
    """A :class:`CombinedLoader` over per-task loaders of ``(x, y)`` batches that yields
    ``(MultiTaskBatch, batch_idx, dataloader_idx)``."""

    def __init__(self, loaders: dict[str, DataLoader], mode: Mode) -> None:
        super().__init__(loaders, mode)
        self.tasks, self.sequential = list(loaders), mode == "sequential"

    def __next__(self) -> tuple[MultiTaskBatch, int, int]:
        batch, batch_idx, dataloader_idx = super().__next__()
        if self.sequential:  # one task's (x, y)
            batch = {self.tasks[dataloader_idx]: batch}
        x = {task: xy[0] for task, xy in batch.items()}
        return MultiTaskBatch(x, {task: xy[1] for task, xy in batch.items()}), batch_idx, dataloader_idx


class MultiTaskDataModule(L.LightningDataModule, ABC):
    """Base datamodule of multi-task problems; subclasses implement :meth:`build_splits` and call
    ``save_hyperparameters()`` in their ``__init__``.

    Args:
        batch_size: training samples per task and step (one dataset per task), or per step (one shared dataset).
        eval_batch_size: validation / test batch size; ``None`` → ``batch_size``.
        mode: how per-task training loaders combine: ``"max_size_cycle"`` or ``"min_size"`` (``"sequential"`` only
            outside ``Trainer.fit``, which refuses it).
        eval_mode: how per-task validation / test loaders combine; ``"sequential"`` counts every sample once.
        num_workers: worker processes of each loader (one loader per task, so keep it small; data are in memory).
        seed: seed of the training shuffles.

    Raises:
        ValueError: an unknown mode or a non-positive size.
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        mode: Mode = "max_size_cycle",
        eval_mode: Mode = "sequential",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("mode", mode), ("eval_mode", eval_mode)):
            if value not in MODES:
                raise ValueError(f"unknown {name} {value!r}; valid modes: {', '.join(MODES)}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        if num_workers < 0 or seed < 0:
            raise ValueError(f"num_workers and seed must be >= 0, got {num_workers} and {seed}")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.mode, self.eval_mode, self.num_workers, self.seed = mode, eval_mode, num_workers, seed
        self.splits: TaskSplits | None = None
        self._resume_at: dict[str, int] = {}
        self._resume_filter: tuple | None = None  # the warnings filter installed by load_state_dict, until teardown

    @abstractmethod
    def build_splits(self) -> TaskSplits:
        """Build the train / val / test datasets and class counts; called once, from :meth:`setup`."""

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.mode == "sequential":
            raise ValueError(
                'mode="sequential" cannot train: Lightning\'s fit loop refuses CombinedLoader(mode="sequential"). '
                'Use mode="max_size_cycle" or "min_size"; "sequential" is for eval_mode.'
            )
        if self.splits is None:
            self.splits = self._checked(self.build_splits())

    def _checked(self, splits: TaskSplits) -> TaskSplits:
        name, tasks = type(self).__name__, list(splits.num_classes)
        for split in ("train", "val", "test"):
            data = getattr(splits, split)
            per_task = data if isinstance(data, dict) else {"all tasks": data}
            if not tasks or (isinstance(data, dict) and list(data) != tasks):
                raise ValueError(f"{name}: {split} tasks {list(per_task)} differ from num_classes tasks {tasks}")
            for task, ds in per_task.items():
                if len(ds) == 0:
                    raise ValueError(f"{name}: the {split} dataset of {task!r} has zero samples; check the split.")
        return splits

    def _require_setup(self) -> TaskSplits:
        if self.splits is None:
            raise RuntimeError(f"{type(self).__name__}: call prepare_data() and setup() before using the tasks.")
        return self.splits

    @property
    def tasks(self) -> list[str]:
        """Task names, in order (after :meth:`setup`)."""
        return list(self._require_setup().num_classes)

    @property
    def num_classes(self) -> dict[str, int]:
        """Class count of each task (after :meth:`setup`)."""
        return dict(self._require_setup().num_classes)

    def state_dict(self) -> dict[str, int]:
        """The position of the training data (see :func:`~lightning_mtl.datamodules._resume.train_position`)."""
        return train_position(self.trainer)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next :meth:`train_dataloader` continue where the checkpoint left the training data."""
        self._resume_at = dict(state_dict)
        # Lightning warns that a mid-epoch resume is unreliable unless every loader has its own state_dict; here the
        # datamodule holds the position. The filter lasts until this fit's teardown, not for the whole process.
        if self._resume_filter is None:
            warnings.filterwarnings("ignore", message=_MID_EPOCH_RESUME_WARNING)
            self._resume_filter = warnings.filters[0]

    def teardown(self, stage: str) -> None:
        if self._resume_filter is not None and self._resume_filter in warnings.filters:
            warnings.filters.remove(self._resume_filter)  # an "ignore" filter leaves no registry entry to reset
        self._resume_filter = None

    def _loader(
        self, ds: Dataset, train: bool, stream: int, shared: bool, position: tuple[int, int, int] = (0, 0, 0)
    ) -> ResumedLoader:
        epoch, passes, batches = position  # where the sampler starts, and the batches of that pass already taken
        return ResumedLoader(
            ds,
            skip=batches,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=self.train_sampler(ds, stream, epoch, passes) if train else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_shared if shared else None,
            # seeds the workers: starting an iterator never draws from torch's global generator
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_sampler(self, ds: Dataset, stream: int, epoch: int, passes: int) -> Sampler:
        """The training order of ``ds``: an :class:`EpochShuffle` seeded with ``(seed, stream, epoch, pass)``, starting
        at ``epoch`` and ``passes`` (a resumed fit). Override it to change what the sampler hands the dataset, e.g.
        to pass the epoch along with each index (:class:`~lightning_mtl.datamodules.nyuv2.EpochTagged`); keep
        ``set_epoch`` and the order, which resuming relies on."""
        return EpochShuffle(len(ds), self.seed, stream, epoch, passes)

    def _positions(self, datasets: list[Dataset], train: bool) -> list[tuple[int, int, int]]:
        """``(epoch, pass, batches into the pass)`` of each loader: where the training data of a restored checkpoint
        stands (``max_size_cycle`` restarts a task each time it runs out), else the start."""
        at: dict[str, int] = {}
        if train:
            at, self._resume_at = self._resume_at, {}
        epoch, taken = at.get("epoch", 0), at.get("batches", 0)
        if self.mode == "max_size_cycle":
            world = 1 if self.trainer is None else self.trainer.world_size  # Lightning shards each pass over ranks
            per_pass = [math.ceil(math.ceil(len(ds) / world) / self.batch_size) for ds in datasets]  # batches
            return [(epoch, *divmod(taken, n)) for n in per_pass]
        return [(epoch, 0, taken)] * len(datasets)

    def _dataloader(self, split: str) -> DataLoader | MultiTaskLoader:
        data, train = getattr(self._require_setup(), split), split == "train"
        if not isinstance(data, dict):
            return self._loader(data, train, 0, shared=True, position=self._positions([data], train)[0])
        positions = self._positions(list(data.values()), train)
        loaders = {task: self._loader(ds, train, i, shared=False, position=positions[i])
                   for i, (task, ds) in enumerate(data.items())}
        return MultiTaskLoader(loaders, self.mode if train else self.eval_mode)

    def train_dataloader(self) -> DataLoader | MultiTaskLoader:
        return self._dataloader("train")

    def val_dataloader(self) -> DataLoader | MultiTaskLoader:
        return self._dataloader("val")

    def test_dataloader(self) -> DataLoader | MultiTaskLoader:
        return self._dataloader("test")
