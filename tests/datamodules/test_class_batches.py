"""``train_mode="classes"`` of the episodic datamodules: labelled batches of all training images (ClassBatches) on a
synthetic split whose pixels encode (split, class, sample), and on real Omniglot."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_mtl.batches import Episode, LabelledBatch
from lightning_mtl.datamodules import ImageFolderEpisodes, MiniImageNetEpisodes, OmniglotEpisodes
from lightning_mtl.datamodules._episodic import STAGES, ClassBatches, EpisodeSettings, EpisodicImages

SIZES = {"train": 7, "val": 3, "test": 4}  # classes per split
SAMPLES = 6  # images per class


class CodedImages(EpisodicImages):
    """2x2 one-channel images whose pixels are (split id, class, sample, 0)."""

    def __init__(self, **kw) -> None:
        kw = {"train_ways": 3, "train_queries": 2, **kw}
        super().__init__(EpisodeSettings(eval_ways=3, eval_queries=2, eval_meta_batch_size=2, val_episodes=4,
                                         test_episodes=4, **kw))

    def setup(self, stage: str | None = None) -> None:
        arrays = {}
        for split_id, stage_name in enumerate(STAGES):
            a = np.zeros((SIZES[stage_name], SAMPLES, 1, 2, 2), np.uint8)
            a[:, :, 0, 0, 0] = split_id
            a[:, :, 0, 0, 1] = np.arange(SIZES[stage_name])[:, None]
            a[:, :, 0, 1, 0] = np.arange(SAMPLES)[None, :]
            arrays[stage_name] = a
        self.set_splits(arrays, "coded")


def coded(**kw) -> CodedImages:
    dm = CodedImages(train_mode="classes", **kw)
    dm.setup()
    return dm


def take(loader, n: int) -> list[LabelledBatch]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def ids(batches: list[LabelledBatch]) -> np.ndarray:
    """``(N, 3)`` (split, class, sample) of the images of ``batches``, in order."""
    x = torch.cat([b.x for b in batches]).flatten(1).numpy()
    return x[:, :3]


def test_default_mode_is_episodes():
    assert EpisodeSettings().train_mode == "episodes"
    dm = CodedImages()
    dm.setup()
    assert isinstance(next(iter(dm.train_dataloader())), Episode)


def test_one_epoch_covers_every_training_image_once_with_its_class():
    dm = coded(train_batch_size=6)
    assert dm.num_train_classes == SIZES["train"]
    batches = take(dm.train_dataloader(), SIZES["train"] * SAMPLES // 6)
    assert all(isinstance(b, LabelledBatch) and b.x.shape == (6, 1, 2, 2) for b in batches)
    assert all(b.x.dtype == torch.uint8 and b.y.dtype == torch.int64 for b in batches)
    seen = ids(batches)
    assert (seen[:, 0] == 0).all(), "validation or test images leaked into training"
    np.testing.assert_array_equal(seen[:, 1], torch.cat([b.y for b in batches]).numpy())
    assert sorted(map(tuple, seen[:, 1:].tolist())) == [(c, s) for c in range(SIZES["train"]) for s in range(SAMPLES)]


def test_batches_straddle_epochs_and_each_epoch_is_a_permutation():
    n = SIZES["train"] * SAMPLES  # 42 images, batches of 5: batch 8 holds the last 2 of epoch 0 and 3 of epoch 1
    seen = ids(take(coded(train_batch_size=5).train_dataloader(), 17))
    codes = seen[:, 1] * SAMPLES + seen[:, 2]
    for epoch in (codes[:n], codes[n : 2 * n]):
        assert sorted(epoch.tolist()) == list(range(n))
    assert (codes[:n] != codes[n : 2 * n]).any(), "each epoch draws a new order"


def test_deterministic_per_seed_and_independent_of_workers():
    first = ids(take(coded(train_batch_size=4, seed=3).train_dataloader(), 5))
    np.testing.assert_array_equal(first, ids(take(coded(train_batch_size=4, seed=3).train_dataloader(), 5)))
    workers = ids(take(coded(train_batch_size=4, seed=3, num_workers=2).train_dataloader(), 5))
    np.testing.assert_array_equal(first, workers)
    assert (first != ids(take(coded(train_batch_size=4, seed=4).train_dataloader(), 5))).any()


def test_two_ranks_split_each_epoch_into_disjoint_halves():
    per_rank = []
    for rank in (0, 1):
        dm = coded(train_batch_size=3)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        per_rank.append(ids(take(dm.train_dataloader(), 7)))  # 2 ranks x 7 batches x 3 images = one epoch of 42
    codes = [set((r[:, 1] * SAMPLES + r[:, 2]).tolist()) for r in per_rank]
    assert len(codes[0]) == len(codes[1]) == 21 and not codes[0] & codes[1]
    # rank r holds global batches r, r + 2, ... of the one-process stream
    single = ids(take(coded(train_batch_size=3).train_dataloader(), 14)).reshape(14, 3, 3)
    np.testing.assert_array_equal(per_rank[1], single[1::2].reshape(-1, 3))


def test_evaluation_episodes_do_not_depend_on_the_train_mode():
    episodes, classes = CodedImages(), coded()
    episodes.setup()
    for stage in ("val", "test"):
        a = next(iter(getattr(episodes, f"{stage}_dataloader")()))
        b = next(iter(getattr(classes, f"{stage}_dataloader")()))
        assert isinstance(b, Episode) and all(torch.equal(u, v) for u, v in zip(a[:4], b[:4], strict=True))


def test_training_episode_shape_is_not_required_in_classes_mode():
    with pytest.raises(ValueError, match="shots \\+ queries = 1 \\+ 15 = 16 exceeds the 6 examples"):
        CodedImages(train_queries=15).setup()
    assert coded(train_queries=15).num_train_classes == SIZES["train"]


def test_bad_settings_and_early_class_count():
    with pytest.raises(ValueError, match="train_mode must be 'episodes' or 'classes'"):
        EpisodeSettings(train_mode="batches")
    with pytest.raises(ValueError, match="train_batch_size must be >= 1"):
        EpisodeSettings(train_batch_size=0)
    with pytest.raises(ValueError, match="rank must be in 0 .. world_size - 1"):
        ClassBatches(np.zeros((2, 2, 1, 1, 1), np.uint8), 2, 0, rank=2, world_size=2)
    with pytest.raises(RuntimeError, match="after setup"):
        _ = CodedImages().num_train_classes


def test_settings_from_none_a_mapping_or_settings():
    """`EpisodeSettings.of`: what the datamodules accept as `episodes` (None, the group, or the plain dict their saved
    hyper-parameters hold)."""
    settings = EpisodeSettings(train_ways=7, seed=3)
    assert EpisodeSettings.of(None) == EpisodeSettings() and EpisodeSettings.of(settings) is settings
    assert EpisodeSettings.of({"train_ways": 7, "seed": 3}) == settings
    with pytest.raises(TypeError, match="episodes: unknown setting.s. wayz; the settings are train_ways, "):
        EpisodeSettings.of({"wayz": 7})
    with pytest.raises(TypeError, match="episodes must be an EpisodeSettings .or a mapping of its fields., got int"):
        EpisodeSettings.of(5)


def test_every_episodic_datamodule_takes_the_mode():
    for cls in (OmniglotEpisodes, MiniImageNetEpisodes, ImageFolderEpisodes):
        dm = cls(episodes=EpisodeSettings(train_mode="classes", train_batch_size=32))
        assert (dm.episodes.train_mode, dm.episodes.train_batch_size) == ("classes", 32)
        assert cls().episodes.train_mode == "episodes"


# ------------------------------------------------------------------ real data


def test_real_omniglot_class_batches(omniglot_root, cache_dir):
    dm = OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir), download=False,
                          episodes=EpisodeSettings(train_mode="classes", train_batch_size=360))
    dm.prepare_data()
    dm.setup()
    assert dm.num_train_classes == 4112
    train = dm.samplers["train"].images  # (4112, 20, 1, 28, 28)
    batch = next(iter(dm.train_dataloader()))
    assert batch.x.shape == (360, 1, 28, 28) and batch.y.shape == (360,)
    assert 0 <= batch.y.min() and batch.y.max() < 4112 and len(batch.y.unique()) > 300
    # every image is one of the 20 drawings of its labelled training class
    x, classes = batch.x.numpy(), train[batch.y.numpy()]  # (360, 1, 28, 28), (360, 20, 1, 28, 28)
    assert (classes == x[:, None]).all(axis=(2, 3, 4)).any(axis=1).all()
    assert isinstance(next(iter(dm.test_dataloader())), Episode)
