"""DenseImageTasks: targets by hand on tiny images (Sobel on a step edge, BT.601 greyscale, RGB colour), seeded noise
(identical for the same seed and image, across loaders and workers; fresh per training draw), a disjoint stratified
split, the cache (outside the data root, reused), clear errors, the tasks, the real Tiny-ImageNet subset, and one
training step of every config in recipes/configs/dense_tiny_imagenet."""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_mtl.datamodules import dense_tasks
from lightning_mtl.datamodules.dense_tasks import (
    DenseImageTasks,
    gaussian_noise,
    greyscale,
    sobel_magnitude,
    stratified_split,
)
from lightning_mtl.mtl.tasks import ClassificationTask, PixelRegressionTask

REPO = Path(__file__).resolve().parents[2]
TINY_ZIP = Path("tiny-imagenet") / "tiny-imagenet-200-subset.zip"
CONFIGS = sorted((REPO / "recipes" / "configs" / "dense_tiny_imagenet").glob("*.yaml"))


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def step_edge(size: int = 8) -> np.ndarray:
    """A black left half and a white right half, ``(size, size, 3)`` uint8."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:, size // 2:] = 255
    return pixels


def make_folders(root: Path, classes: int = 3, per_class: int = 10, size: int = 8) -> Path:
    """Class folders of random RGB PNGs; image 0 of class 0 is a step edge, image 0 of class 1 is pure red."""
    for c in range(classes):
        for i in range(per_class):
            pixels = np.random.default_rng([c, i]).integers(0, 256, (size, size, 3), dtype=np.uint8)
            if (c, i) == (0, 0):
                pixels = step_edge(size)
            if (c, i) == (1, 0):
                pixels = np.zeros((size, size, 3), np.uint8)
                pixels[..., 0] = 255
            write_png(root / f"class{c}" / f"{i:03d}.png", pixels)
    return root


@pytest.fixture
def folders(tmp_path) -> Path:
    return make_folders(tmp_path / "data" / "toy")


def ready(path: Path, tmp_path: Path, **kw) -> DenseImageTasks:
    kw = {"image_size": 8, "val_fraction": 0.2, "test_fraction": 0.2, "noise_draws": 3, "batch_size": 4, **kw}
    d = DenseImageTasks(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)
    d.prepare_data()
    d.setup("fit")
    return d


# ------------------------------------------------------------------ targets by hand


def test_sobel_of_a_step_edge_and_of_a_flat_image():
    grey = torch.zeros(1, 1, 6, 6)
    grey[..., 3:] = 1.0  # a unit step between columns 2 and 3
    expected = torch.zeros(1, 1, 6, 6)
    expected[..., 2:4] = 1.0  # |gx| = 4 on the two columns beside the step, / 4
    torch.testing.assert_close(sobel_magnitude(grey), expected)
    torch.testing.assert_close(sobel_magnitude(torch.full((2, 1, 5, 5), 0.7)), torch.zeros(2, 1, 5, 5))
    diagonal = torch.zeros(1, 1, 5, 5)
    diagonal[0, 0, 2, 2] = 1.0  # one bright pixel: its corner neighbours see gx = gy = +-1 (before / 4)
    assert torch.isclose(sobel_magnitude(diagonal)[0, 0, 1, 1], torch.tensor(2**0.5 / 4))


def test_greyscale_is_bt601():
    rgb = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [10, 20, 30]], dtype=torch.uint8)
    rgb = rgb.T.reshape(1, 3, 5, 1)  # five pixels
    expected = torch.tensor([0.299, 0.587, 0.114, 1.0, (0.299 * 10 + 0.587 * 20 + 0.114 * 30) / 255])
    torch.testing.assert_close(greyscale(rgb).flatten(), expected)
    torch.testing.assert_close(greyscale(rgb.float() / 255), greyscale(rgb))


def test_cached_targets_of_hand_made_images(folders, tmp_path):
    d = ready(folders, tmp_path, noise_sigma=0.0)
    payload = torch.load(d.cache_path(), weights_only=True)
    assert payload["classes"] == ["class0", "class1", "class2"] and payload["counts"] == [10, 10, 10]
    step = payload["edges"][0, 0]  # image 0 of class 0: the step edge between columns 3 and 4
    expected = torch.zeros(8, 8)
    expected[:, 3:5] = 1.0
    torch.testing.assert_close(step, expected)
    torch.testing.assert_close(payload["grey"][10], torch.full((1, 8, 8), 0.299))  # pure red
    ds = next(s for s in (d.splits.train, d.splits.val, d.splits.test) if 10 in ds_images(s))
    x, y = ds[ds_images(ds).index(10)]
    torch.testing.assert_close(y["colour"], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 8, 8))
    torch.testing.assert_close(y["denoise"], torch.full((1, 8, 8), 0.299))
    torch.testing.assert_close(x, y["denoise"])  # sigma 0: the input is the clean greyscale image
    assert y["class"] == 1 and y["class"].dtype == torch.int64
    assert x.dtype == y["edges"].dtype == torch.float32


def ds_images(ds) -> list[int]:
    return ds.indices.tolist()


# ------------------------------------------------------------------ noise


def test_noise_is_seeded_per_image_and_fresh_per_training_draw(folders, tmp_path):
    a = ready(folders, tmp_path, noise_sigma=0.1)
    b = ready(folders, tmp_path, noise_sigma=0.1, batch_size=2, seed=7)  # another loader order: same samples
    for split in ("train", "val", "test"):
        sa, sb = getattr(a.splits, split), getattr(b.splits, split)
        for i in range(len(sa)):
            torch.testing.assert_close(sa[i][0], sb[i][0], rtol=0, atol=0)
    val = a.splits.val
    image = int(val.indices[0])
    x, y = val[0]
    torch.testing.assert_close(x - y["denoise"], 0.1 * gaussian_noise((1, 8, 8), 0, 1, image))
    train, n = a.splits.train, len(a.splits.train.indices)
    assert len(train) == 3 * n  # noise_draws=3
    draws = [train[d * n][0] for d in range(3)]  # the same image, three draws
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    torch.testing.assert_close(draws[2] - train[2 * n][1]["denoise"],
                               0.1 * gaussian_noise((1, 8, 8), 0, 0, int(train.indices[0]), 2))
    noise = draws[0] - train[0][1]["denoise"]
    assert 0.03 < float(noise.std()) < 0.2
    c = ready(folders, tmp_path, noise_sigma=0.1, noise_seed=1)
    assert not torch.equal(c.splits.val[0][0], x)


def test_eval_batches_identical_across_epochs_and_workers(folders, tmp_path):
    d = ready(folders, tmp_path, eval_batch_size=3)
    first = [b.x for b in d.val_dataloader()]
    again = [b.x for b in d.val_dataloader()]
    workers = ready(folders, tmp_path, eval_batch_size=3, num_workers=2)
    with_workers = [b.x for b in workers.val_dataloader()]
    for a, b, c in zip(first, again, with_workers, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------ split


def test_split_is_disjoint_stratified_and_seeded(folders, tmp_path):
    d = ready(folders, tmp_path)
    parts = {s: set(ds_images(getattr(d.splits, s))) for s in ("train", "val", "test")}
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"])
    assert parts["train"] | parts["val"] | parts["test"] == set(range(30))
    for split, per_class in (("val", 2), ("test", 2), ("train", 6)):  # 10 images a class: 20% / 20% / the rest
        labels = [int(d.splits.train.labels[i]) for i in parts[split]]
        assert np.bincount(labels, minlength=3).tolist() == [per_class] * 3
    same = ready(folders, tmp_path)
    assert ds_images(same.splits.val) == ds_images(d.splits.val)
    other = ready(folders, tmp_path, split_seed=1)
    assert ds_images(other.splits.val) != ds_images(d.splits.val)
    labels = np.repeat(np.arange(4), 50)
    split = stratified_split(labels, 0.1, 0.2, seed=3)
    assert [len(split[s]) for s in ("train", "val", "test")] == [140, 20, 40]


# ------------------------------------------------------------------ cache


def test_cache_outside_the_read_only_root_and_reused(folders, tmp_path, monkeypatch):
    root = folders.parent
    os.chmod(folders / "class0", 0o555)
    os.chmod(folders, 0o555)
    try:
        before = sorted(p.relative_to(root) for p in root.rglob("*"))
        d = ready(folders, tmp_path)
        assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    finally:
        os.chmod(folders, 0o755)
        os.chmod(folders / "class0", 0o755)
    path = d.cache_path()
    assert path.parent == tmp_path / "cache" and path.exists()
    stamp = path.stat().st_mtime_ns

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(dense_tasks, "decode_image", no_decoding)
    again = ready(folders, tmp_path)
    assert path.stat().st_mtime_ns == stamp and again.cache_path() == path
    monkeypatch.undo()
    bigger = ready(folders, tmp_path, image_size=16)  # other settings: another cache
    assert bigger.cache_path() != path and bigger.splits.val[0][0].shape == (1, 16, 16)


def test_cache_env_var_is_the_default(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MTL_CACHE", str(tmp_path / "envcache"))
    d = DenseImageTasks(path=str(folders), image_size=8)
    d.prepare_data()
    assert d.cache_path().parent == tmp_path / "envcache" and d.cache_path().exists()


# ------------------------------------------------------------------ errors


def test_missing_empty_and_unprepared(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*--data.path"):
        DenseImageTasks(path=str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "c")).prepare_data()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        DenseImageTasks(path=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c")).prepare_data()
    make_folders(tmp_path / "holes", classes=2, per_class=3)
    (tmp_path / "holes" / "class9").mkdir()
    with pytest.raises(ValueError, match="class9 hold no images"):
        DenseImageTasks(path=str(tmp_path / "holes"), cache_dir=str(tmp_path / "c")).prepare_data()
    make_folders(tmp_path / "ok", classes=2, per_class=5)
    with pytest.raises(RuntimeError, match="call prepare_data"):
        DenseImageTasks(path=str(tmp_path / "ok"), cache_dir=str(tmp_path / "c2"), image_size=8).setup("fit")
    with pytest.raises(RuntimeError, match="prepare_data"):
        _ = DenseImageTasks(path=str(tmp_path / "ok")).num_classes


def test_tiny_splits_named(tmp_path):
    make_folders(tmp_path / "one", classes=2, per_class=1)  # 1 image a class: rounds to empty val and test
    with pytest.raises(ValueError, match="the val split is empty"):
        ready(tmp_path / "one", tmp_path)


@pytest.mark.parametrize("kw, match", [
    ({"val_fraction": 0.0}, "val_fraction"), ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction"),
    ({"noise_sigma": -0.1}, "noise_sigma"), ({"noise_draws": 0}, "noise_draws"), ({"image_size": 0}, "image_size"),
    ({"images_per_class": 0}, "images_per_class"), ({"pixel_loss": "mse"}, "pixel_loss"), ({"layout": "x"}, "layout"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        DenseImageTasks(**kw)


# ------------------------------------------------------------------ tasks


def test_tasks_built(folders, tmp_path):
    d = ready(folders, tmp_path, pixel_loss="l2")
    tasks = d.build_tasks()
    assert list(tasks) == ["edges", "colour", "denoise", "class"] == d.tasks
    assert [t.out_channels for t in list(tasks.values())[:3]] == [1, 3, 1]
    assert all(isinstance(t, PixelRegressionTask) and t.loss_name == "l2" for t in list(tasks.values())[:3])
    assert isinstance(tasks["class"], ClassificationTask) and tasks["class"].num_classes == 3
    batch = next(iter(d.train_dataloader()))
    assert batch.x.shape == (4, 1, 8, 8) and set(batch.targets) == set(tasks)
    for name, task in tasks.items():
        task.check_target(batch.targets[name])


# ------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def tiny_root() -> Path:
    for candidate in (os.environ.get("LIGHTNING_MTL_DATA"), REPO / ".." / "shared" / "data"):
        if candidate and (Path(candidate) / TINY_ZIP).exists():
            return Path(candidate)
    pytest.skip("real Tiny-ImageNet subset absent: set LIGHTNING_MTL_DATA to a folder holding " + str(TINY_ZIP))


def test_real_tiny_imagenet_subset(tiny_root, cache_dir):
    d = DenseImageTasks(path=str(TINY_ZIP), root=str(tiny_root), cache_dir=str(cache_dir), image_size=32,
                        images_per_class=5, val_fraction=0.2, test_fraction=0.2, batch_size=16)
    d.prepare_data()
    d.setup("fit")
    assert d.num_classes["class"] == 200
    assert [len(d.splits.train.indices), len(d.splits.val), len(d.splits.test)] == [600, 200, 200]
    images = d.splits.train.images
    assert images.shape == (1000, 3, 32, 32) and images.dtype == torch.uint8
    assert 60 < images.float().mean() < 190 and images[:, 0].float().mean() != images[:, 2].float().mean()
    x, y = d.splits.val[0]
    assert x.shape == (1, 32, 32) and y["colour"].shape == (3, 32, 32) and 0 <= int(y["class"]) < 200
    assert 0.01 < float(y["edges"].mean()) < 0.5, "photographs have edges"


# ------------------------------------------------------------------ configs


def load_recipe():
    spec = importlib.util.spec_from_file_location("multitask_recipe_dense", REPO / "recipes" / "multitask.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configs_exist():
    names = {c.stem for c in CONFIGS}
    assert names == {"single_task_quick", "hps_equal_quick", "cross_stitch_quick", "mtan_quick", "mmoe_quick",
                     "hps_uw_quick", "hps_pcgrad_quick", "hps_upgrad_quick", "hps_nash_mtl_quick", "hps_famo_quick"}
    for config in CONFIGS:
        assert config.read_text().startswith("# python recipes/multitask.py fit --config "
                                             f"recipes/configs/dense_tiny_imagenet/{config.name} && "), config


@pytest.fixture(scope="module")
def toy_images(tmp_path_factory) -> Path:
    """32x32 images in 3 classes, the size the configs' models are built for."""
    return make_folders(tmp_path_factory.mktemp("data") / "toy", classes=3, per_class=5, size=32)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_a_training_step(config, toy_images, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["multitask.py"])
    recipe = load_recipe()
    cli = recipe.main(["fit", "--config", str(config), "--trainer.fast_dev_run=true", "--trainer.max_time=null",
                       "--trainer.logger=false", f"--data.root={toy_images.parent}", "--data.path=toy",
                       f"--data.cache_dir={tmp_path}/cache", "--data.batch_size=4", "--data.eval_batch_size=6",
                       "--data.val_fraction=0.2", "--data.test_fraction=0.2", f"--checkpoint.dirpath={tmp_path}/ckpt"])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 1 and torch.isfinite(metrics["train/loss"])
    assert {"val/edges/mae", "val/colour/psnr", "val/denoise/mae", "val/class/acc", "val/metric_mean"} <= set(metrics)
