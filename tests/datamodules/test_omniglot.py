"""OmniglotEpisodes: real-data class counts and caching, and bad input on a small fake archive."""

from __future__ import annotations

import os
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from omniglot_fakes import make_fake_omniglot

from lightning_mtl.datamodules import EpisodeSettings, OmniglotEpisodes

# ------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def vinyals(omniglot_root, cache_dir) -> OmniglotEpisodes:
    dm = OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir), download=False)
    dm.prepare_data()
    dm.setup()
    return dm


def test_vinyals_class_counts(vinyals):
    assert [vinyals.num_classes(s) for s in ("train", "val", "test")] == [4112, 688, 1692]


def test_trainval_and_lake_class_counts(omniglot_root, cache_dir):
    trainval = OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir), train_split="trainval")
    trainval.prepare_data()
    trainval.setup()
    assert trainval.num_classes("train") == 4800
    lake = OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir), protocol="lake")
    lake.prepare_data()
    lake.setup()
    assert (lake.num_classes("train"), lake.num_classes("test")) == (964, 659)


def test_cache_lives_in_cache_dir_and_is_reused(vinyals, omniglot_root, cache_dir):
    path = vinyals.cache_path()
    assert path.parent == Path(cache_dir) and path.exists()
    assert str(omniglot_root.resolve()) not in str(path.resolve())
    mtime = path.stat().st_mtime_ns
    again = OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir))
    again.prepare_data()
    assert again.cache_path() == path and path.stat().st_mtime_ns == mtime, "cache was rebuilt"
    other_size = OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir), image_size=14)
    assert other_size.cache_path() != path, "settings must be part of the cache key"


def test_real_images_and_rotations(vinyals):
    images = vinyals.samplers["train"].images  # (4112, 20, 1, 28, 28): lines are char/rot000, rot090, ...
    assert images.shape == (4112, 20, 1, 28, 28) and images.dtype == np.uint8
    strokes = (images[:64] > 127).mean()
    assert 0.02 < strokes < 0.4, "strokes should be bright on a dark background"
    np.testing.assert_array_equal(images[1], np.rot90(images[0], 1, axes=(-2, -1)))
    np.testing.assert_array_equal(images[2], np.rot90(images[0], 2, axes=(-2, -1)))


def test_real_eval_episodes_fixed_and_disjoint(vinyals):
    loader = vinyals.test_dataloader()
    first = next(iter(loader))
    assert first.support_x.shape == (16, 5, 1, 28, 28) and first.query_x.shape == (16, 75, 1, 28, 28)
    again = next(iter(vinyals.test_dataloader()))
    assert (first.support_x == again.support_x).all() and (first.query_x == again.query_x).all()
    assert sum(ep.meta_batch_size for ep in loader) == 1000


# ------------------------------------------------------------------ fake archives for bad input


@pytest.fixture
def fake_root(tmp_path) -> Path:
    return make_fake_omniglot(tmp_path / "data")


EPISODES = EpisodeSettings(train_ways=3, eval_ways=2)


def dm(root, tmp_path, episodes: dict | None = None, **kw) -> OmniglotEpisodes:
    """The datamodule of ``root``; ``episodes`` overrides fields of :data:`EPISODES`."""
    kw = {"download": False, **kw}
    return OmniglotEpisodes(root=str(root), cache_dir=str(tmp_path / "cache"),
                            episodes=replace(EPISODES, **(episodes or {})), **kw)


def test_fake_archive_roundtrip(fake_root, tmp_path):
    d = dm(fake_root, tmp_path)
    d.prepare_data()
    d.setup()
    assert [d.num_classes(s) for s in ("train", "val", "test")] == [12, 4, 8]
    ep = next(iter(d.train_dataloader()))
    assert ep.support_x.shape == (1, 3, 1, 28, 28)


def test_root_resolution_order(fake_root, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MTL_DATA", str(fake_root))
    monkeypatch.setenv("LIGHTNING_MTL_CACHE", str(tmp_path / "envcache"))
    d = OmniglotEpisodes(download=False)
    assert d.root == fake_root and d.cache_dir == tmp_path / "envcache"
    assert OmniglotEpisodes(root=str(tmp_path / "x")).root == tmp_path / "x"
    monkeypatch.delenv("LIGHTNING_MTL_DATA")
    assert OmniglotEpisodes().root == Path("data")


def test_missing_root_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Omniglot data root .*nowhere does not exist\. Pass --data\.root"):
        dm(tmp_path / "nowhere", tmp_path).prepare_data()


def test_empty_root_lists_files_to_place(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)download=False\. Place them here:.*images_background\.zip"):
        dm(tmp_path / "empty", tmp_path).prepare_data()


def test_offline_download_failure_names_files(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    import urllib.request

    def refuse(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(FileNotFoundError, match=r"(?s)could not be downloaded.*images_evaluation\.zip"):
        dm(tmp_path / "empty", tmp_path, download=True).prepare_data()


def test_missing_split_list(fake_root, tmp_path):
    (fake_root / "omniglot" / "splits" / "vinyals" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)Place them here:.*splits/vinyals/val\.txt"):
        dm(fake_root, tmp_path).prepare_data()


def test_split_naming_missing_character(fake_root, tmp_path):
    split = fake_root / "omniglot" / "splits" / "vinyals" / "test.txt"
    split.write_text(split.read_text() + "Gamma/character07/rot000\n")
    d = dm(fake_root, tmp_path)
    d.prepare_data()
    with pytest.raises(ValueError, match=r"test\.txt:9: character Gamma/character07 is not in the Omniglot archives"):
        d.setup()


def test_ways_larger_than_classes(fake_root, tmp_path):
    d = dm(fake_root, tmp_path, episodes={"eval_ways": 5})
    d.prepare_data()
    with pytest.raises(ValueError, match=r"vinyals/val: 5-way episodes need 5 classes but the split has only 4"):
        d.setup()


def test_shots_plus_queries_larger_than_drawings(tmp_path):
    with pytest.raises(ValueError, match=r"episodes\.train_shots \+ episodes\.train_queries = 5 \+ 16 = 21 exceeds "
                                         r"the 20 drawings"):
        OmniglotEpisodes(root=str(tmp_path), episodes=EpisodeSettings(train_shots=5, train_queries=16))


@pytest.mark.parametrize("size", [0, -3])
def test_nonpositive_image_size(tmp_path, size):
    with pytest.raises(ValueError, match=f"image_size must be a positive number of pixels, got {size}"):
        OmniglotEpisodes(root=str(tmp_path), image_size=size)


def test_episode_settings_are_saved_as_plain_hyper_parameters_and_load_back(fake_root, tmp_path):
    """The typed group is recorded whole (the settings in use, also when left None) as a plain dict: a checkpoint
    loads with weights_only=True, and load_from_checkpoint rebuilds the same settings."""
    import lightning as L
    import torch
    from torch import nn

    from lightning_mtl.meta import ProtoNet

    assert OmniglotEpisodes(root=str(fake_root)).hparams["episodes"] == vars(EpisodeSettings())
    d = dm(fake_root, tmp_path, episodes={"meta_batch_size": 2, "val_episodes": 4, "eval_meta_batch_size": 2,
                                          "seed": 3})
    assert d.hparams["episodes"] == {**vars(EPISODES), "meta_batch_size": 2, "val_episodes": 4,
                                     "eval_meta_batch_size": 2, "seed": 3}
    assert d.hparams_initial["episodes"] == d.hparams["episodes"]
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(ProtoNet(backbone=nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.Flatten())), datamodule=d)
    path = tmp_path / "one_step.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["datamodule_hyper_parameters"]
    assert saved["episodes"] == d.hparams["episodes"] and saved["download"] is False
    again = OmniglotEpisodes.load_from_checkpoint(path, weights_only=True)
    assert again.episodes == d.episodes and again.hparams["episodes"] == d.hparams["episodes"]
    assert EpisodeSettings.of(saved["episodes"]) == d.episodes


def test_corrupt_png_named(fake_root, tmp_path):
    archive = fake_root / "omniglot" / "images_evaluation.zip"
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("images_evaluation/Beta/character04/0004_01.png", b"not a png")
    with pytest.raises(ValueError, match=r"corrupt or unreadable image .*character04/0004_01\.png"):
        dm(fake_root, tmp_path).prepare_data()


def test_corrupt_cache_is_rebuilt_with_warning(fake_root, tmp_path):
    d = dm(fake_root, tmp_path)
    d.prepare_data()
    d.cache_path().write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable .* rebuilding it"):
        d.prepare_data()
    d.setup()
    assert d.num_classes("train") == 12


def test_read_only_root_is_never_written(fake_root, tmp_path):
    for p in [fake_root, *fake_root.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    try:
        d = dm(fake_root, tmp_path)
        d.prepare_data()
        d.setup()
    finally:
        for p in [fake_root, *fake_root.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    assert not list(fake_root.rglob("*.pt"))


def test_extracted_folders_match_archives(fake_root, tmp_path):
    from_zip = dm(fake_root, tmp_path / "a")
    from_zip.prepare_data()
    from_zip.setup()
    folder = fake_root / "omniglot"
    for name in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(folder / f"{name}.zip") as zf:
            zf.extractall(folder)
        (folder / f"{name}.zip").unlink()
    from_dirs = dm(fake_root, tmp_path / "b")
    from_dirs.prepare_data()
    from_dirs.setup()
    for stage in ("train", "val", "test"):
        np.testing.assert_array_equal(from_zip.samplers[stage].images, from_dirs.samplers[stage].images)


def test_episodes_on_the_device_train_and_equal_the_host_stream(omniglot_root, cache_dir):
    """`episodes_on_device` through a Trainer (the CPU is the device here): the training and validation episodes are
    those of the host stream, and a model trains on them."""
    import lightning as L
    import torch
    from torch import nn

    from lightning_mtl.meta import ProtoNet

    def data(on_device: bool) -> OmniglotEpisodes:
        dm = OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir), download=False,
                              episodes=EpisodeSettings(meta_batch_size=2, val_episodes=4, eval_meta_batch_size=2))
        dm.episodes_on_device = on_device
        return dm

    host, device = data(False), data(True)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, val_check_interval=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(ProtoNet(backbone=nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.Flatten())), datamodule=device)
    assert all(getattr(s, "device_images", None) is not None for s in device.samplers.values())
    host.prepare_data()
    host.setup("fit")
    for a, b in zip(host.train_dataloader(), device.train_dataloader(), strict=False):
        assert all(torch.equal(x, y) for x, y in zip(a[:4], b[:4], strict=True))
        break
    for a, b in zip(host.val_dataloader(), device.val_dataloader(), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a[:4], b[:4], strict=True))
