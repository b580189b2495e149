"""Resumable training data: streams and samplers restart at a position, and a fit resumed in-process from any
checkpoint (mid-epoch, at an epoch's end, after a validation; 0 or 2 workers) ends identical to an uninterrupted one."""

from __future__ import annotations

import itertools
import shutil
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_mtl.checkpointing import AtomicCheckpointIO, RecipeCheckpoint, RNGStates
from lightning_mtl.datamodules._episodic import STAGES, ClassBatches, EpisodeSettings, EpisodicImages
from lightning_mtl.datamodules.episodes import EpisodeSampler, EpisodeStream
from lightning_mtl.datamodules.multitask import EpochShuffle, MultiTargetDataset, MultiTaskDataModule, TaskSplits
from lightning_mtl.meta.reptile import Reptile
from lightning_mtl.mtl import MultiTaskModule


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: with 2 threads on a busy 2-core machine, OpenMP spin-waits would take most of the time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _same_batches(a, b) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True))


def test_episode_stream_start_continues_the_stream():
    images = np.random.default_rng(0).integers(0, 255, (9, 4, 1, 2, 2), dtype=np.uint8)
    sampler = EpisodeSampler(images, ways=3, shots=1, queries=2, meta_batch_size=2)
    whole = list(itertools.islice(EpisodeStream(sampler, seed=5, rank=1), 7))
    resumed = list(itertools.islice(EpisodeStream(sampler, seed=5, rank=1, start=4), 3))
    assert all(_same_batches(x, y) for x, y in zip(whole[4:], resumed, strict=True))


def test_class_batches_start_continues_the_stream():
    images = np.arange(5 * 3 * 4, dtype=np.uint8).reshape(5, 3, 1, 2, 2)
    whole = list(itertools.islice(ClassBatches(images, 4, seed=1, rank=1, world_size=2), 9))
    resumed = list(itertools.islice(ClassBatches(images, 4, seed=1, rank=1, world_size=2, start=6), 3))
    assert all(_same_batches(x, y) for x, y in zip(whole[6:], resumed, strict=True))


def test_epoch_shuffle_set_epoch_only_rewinds_on_a_new_epoch():
    s = EpochShuffle(10, seed=0)
    first, second = list(s), list(s)  # two passes of epoch 0: reshuffled
    assert first != second and sorted(first) == list(range(10))
    s.set_epoch(0)  # Lightning sets the epoch after the first iter(): no replay
    assert list(s) not in (first, second)
    s.set_epoch(1)
    epoch1 = list(s)
    assert list(EpochShuffle(10, seed=0, epoch=1)) == epoch1
    assert list(EpochShuffle(10, seed=0, epoch=0, passes=1)) == second


# ---------------------------------------------------------------- in-process resume from every kind of checkpoint
class _Snapshots(RecipeCheckpoint):
    """Keeps a copy of every last.ckpt written, named by its step."""

    def _save_last_checkpoint(self, trainer, monitor_candidates):
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if trainer.is_global_zero:
            shutil.copy(self.last_model_path, Path(self.dirpath) / f"step{trainer.global_step}.snap")


def _fit(make_model, make_data, tmp_path: Path, steps: int, val_every: int, ckpt: Path | None = None) -> dict:
    L.seed_everything(0)
    folder = tmp_path / ("full" if ckpt is None else f"from_{ckpt.stem}")
    trainer = L.Trainer(max_steps=steps, val_check_interval=val_every, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                        callbacks=[RNGStates(), _Snapshots(dirpath=folder, save_last=True, every_n_train_steps=1)])
    trainer.fit(make_model(), datamodule=make_data(), ckpt_path=ckpt)
    state = torch.load(folder / "last.ckpt", weights_only=True)
    assert state["global_step"] == steps
    state["callbacks"] = {k: v for k, v in state["callbacks"].items() if "dirpath" not in v}  # this run's paths
    return state


def _assert_identical(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _check_resumes(make_model, make_data, tmp_path, steps, val_every, resume_at):
    full = _fit(make_model, make_data, tmp_path, steps, val_every)
    for step in resume_at:
        snap = tmp_path / "full" / f"step{step}.snap"
        resumed = _fit(make_model, make_data, tmp_path, steps, val_every, ckpt=snap)
        _assert_identical(full, resumed, f"resumed from step {step}")


class _Tasks(MultiTaskDataModule):
    """Three tasks of 21, 13 and 30 random samples (6, 4 and 8 batches of 4), or one shared input."""

    def __init__(self, shared: bool = False, **kw) -> None:
        super().__init__(batch_size=4, seed=3, **kw)
        self.shared = shared

    def build_splits(self) -> TaskSplits:
        g = torch.Generator().manual_seed(0)
        sizes = {"a": 21, "b": 13, "c": 30}

        def split(n: int):
            return TensorDataset(torch.randn(n, 1, 3, 3, generator=g), torch.randint(0, 3, (n,), generator=g))

        if self.shared:
            x = torch.randn(26, 1, 3, 3, generator=g)
            train = MultiTargetDataset(x, {t: torch.randint(0, 3, (26,), generator=g) for t in sizes})
            return TaskSplits(dict.fromkeys(sizes, 3), train, train, train)
        train = {t: split(n) for t, n in sizes.items()}
        val = {t: split(5) for t in sizes}
        return TaskSplits(dict.fromkeys(sizes, 3), train, val, val)


def _mtl(balancer: str):
    return lambda: MultiTaskModule(num_classes=None, backbone=nn.Sequential(nn.Flatten(), nn.Linear(9, 6), nn.ReLU()),
                                   input_shape=(1, 3, 3), balancer=balancer, diagnostics_every=0)


@pytest.mark.parametrize(("balancer", "data", "val_every", "resume_at"), [
    # 8 batches per epoch, task b restarts every 4 and a every 6: mid-pass (3, 13), after validations (4, 12),
    # after validations that end an epoch (8, 16)
    ("dwa", dict(), 4, [3, 4, 8, 13, 16]),
    # torch's global generator; epochs of 4 batches: last.ckpt due at an epoch's end (4, 8, 12) is written after the
    # next step (9, 13) or the validation after it (5)
    ("rlw", dict(mode="min_size", num_workers=1), 5, [5, 9]),
    ("uncertainty", dict(shared=True), 5, [6, 9]),  # one shared input: 7 batches per epoch
])
def test_multitask_fit_resumes_exactly(balancer, data, val_every, resume_at, tmp_path):
    _check_resumes(_mtl(balancer), lambda: _Tasks(**data), tmp_path, 18, val_every, resume_at)
    # the datamodule silences Lightning's "not resumable" warning during its own fits only
    assert not any(f[1] is not None and "resuming from a checkpoint" in f[1].pattern for f in warnings.filters)
    snapshots = {int(p.stem.removeprefix("step")) for p in (tmp_path / "full").glob("*.snap")}
    assert set(resume_at) <= snapshots
    if balancer == "rlw":
        assert not snapshots & {4, 8, 12, 16}  # never written at the end of an epoch


class _Coded(EpisodicImages):
    """2x2 images, 9 train classes of 4 samples."""

    def __init__(self, num_workers: int) -> None:
        super().__init__(EpisodeSettings(train_ways=3, train_queries=2, eval_ways=3, eval_queries=2,
                                         meta_batch_size=2, eval_meta_batch_size=2, val_episodes=4, test_episodes=4,
                                         seed=7, num_workers=num_workers))

    def setup(self, stage: str | None = None) -> None:
        rng = np.random.default_rng(1)
        self.set_splits({s: rng.integers(0, 255, (9, 4, 1, 2, 2), dtype=np.uint8) for s in STAGES}, "coded")


def _reptile():
    return Reptile(ways=3, backbone=nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU()), image_shape=(1, 2, 2),
                   inner_steps=2, inner_batch_size=2, eval_inner_steps=2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_episodic_fit_resumes_exactly(num_workers, tmp_path):
    """Reptile draws its inner batches from torch's global generator, in training and in validation."""
    _check_resumes(_reptile, lambda: _Coded(num_workers), tmp_path, steps=12, val_every=5, resume_at=[3, 5])
