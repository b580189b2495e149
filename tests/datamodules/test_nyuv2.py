"""NYUv2 / Cityscapes: layout validation, augmentation, splits, tasks, and one training step of every config, all on
small fixtures written in the exact preprocessed ``.npy`` layout (the real data are not on this machine)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_mtl.batches import MultiTaskBatch
from lightning_mtl.datamodules.nyuv2 import (
    Augmentation,
    Cityscapes,
    DenseLayoutError,
    DenseSceneDataset,
    NYUv2,
    apply_augmentation,
    augmentation_generator,
    draw_augmentation,
)
from lightning_mtl.mtl.tasks import DepthTask, NormalTask, SegmentationTask

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "recipes" / "configs").glob("nyuv2/*.yaml")) + sorted(
    (REPO / "recipes" / "configs").glob("cityscapes/*.yaml"))
SIZE = (32, 32)  # SegNet's five levels need 32 pixels a side
FOLDERS = {"nyuv2": ("image", "label", "depth", "normal"), "cityscapes": ("image", "label_7", "depth")}
CLASSES = {"nyuv2": 13, "cityscapes": 7}
# the published data's warnings, expected on fixtures of other sizes
pytestmark = [pytest.mark.filterwarnings("ignore:.*published preprocessed data hold:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*validation runs on the test split:UserWarning")]


def write_dataset(root: Path, name: str = "nyuv2", counts: tuple[int, int] = (3, 2), size=SIZE, seed: int = 0) -> Path:
    """``<root>/<name>/{train,val}/<folder>/<i>.npy`` as preprocessed: float32 channels-last images, float32 labels
    with -1 holes, depth (H, W, 1) with 0 holes, unit normals (H, W, 3) with (0, 0, 0) holes."""
    rng = np.random.default_rng(seed)
    h, w = size
    for split, n in zip(("train", "val"), counts, strict=True):
        base = root / name / split
        for folder in FOLDERS[name]:
            (base / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            np.save(base / "image" / f"{i}.npy", rng.random((h, w, 3), dtype=np.float32))
            np.save(base / FOLDERS[name][1] / f"{i}.npy", rng.integers(-1, CLASSES[name], (h, w)).astype(np.float32))
            depth = rng.uniform(0.5, 10, (h, w, 1)).astype(np.float32)
            depth[0, :3] = 0
            np.save(base / "depth" / f"{i}.npy", depth)
            if name == "nyuv2":
                normal = rng.normal(size=(h, w, 3)).astype(np.float32)
                normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
                normal[-1, :2] = 0
                np.save(base / "normal" / f"{i}.npy", normal)
    return root


@pytest.fixture
def nyu_root(tmp_path) -> Path:
    return write_dataset(tmp_path / "data")


def nyu(root: Path, **kwargs) -> NYUv2:
    return NYUv2(root=str(root), size=SIZE, **kwargs)


def setup_error(dm, match: str) -> None:
    with pytest.raises(DenseLayoutError, match=match):
        dm.setup("fit")


# ------------------------------------------------------------------ layout validation


def test_missing_data_names_root_env_and_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("LIGHTNING_MTL_DATA", raising=False)
    dm = nyu(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"missing .*nowhere/nyuv2/train.*nyuv2/\{train,val\}/\{image, label, "
                       r"depth, normal\}/<i>\.npy, 32x32.*LIGHTNING_MTL_DATA"):
        dm.setup("fit")
    monkeypatch.setenv("LIGHTNING_MTL_DATA", str(tmp_path / "from_env"))
    assert NYUv2().data_dir == tmp_path / "from_env" / "nyuv2"


def test_missing_folder(nyu_root):
    for path in (nyu_root / "nyuv2/val/normal").iterdir():
        path.unlink()
    (nyu_root / "nyuv2/val/normal").rmdir()
    setup_error(nyu(nyu_root), r"nyuv2/val: missing folder\(s\) normal; it must hold .*normal/<i>\.npy \(a float "
                               r"array of shape \(32, 32, 3\)")


def test_empty_folder(nyu_root):
    for path in (nyu_root / "nyuv2/train/depth").iterdir():
        path.unlink()
    setup_error(nyu(nyu_root), r"train/depth: no <i>\.npy files; it must hold one a float array of shape \(32, 32, 1\)")


def test_mismatched_index_sets(nyu_root):
    (nyu_root / "nyuv2/train/depth/1.npy").unlink()
    setup_error(nyu(nyu_root), r"train/depth: lacks 1\.npy \(present in image/\); every folder .* same samples")
    np.save(nyu_root / "nyuv2/train/depth/1.npy", np.ones((*SIZE, 1), np.float32))
    np.save(nyu_root / "nyuv2/train/label/7.npy", np.ones(SIZE, np.float32))
    setup_error(nyu(nyu_root), r"train/label: has 7\.npy that image/ lacks")


def test_badly_named_file(nyu_root):
    np.save(nyu_root / "nyuv2/train/image/01.npy", np.ones((*SIZE, 3), np.float32))
    setup_error(nyu(nyu_root), r"image/01\.npy: files must be named <i>\.npy .*no leading zeros")


@pytest.mark.parametrize(("folder", "array", "match"), [
    ("depth", np.ones(SIZE, np.float32), r"depth/0\.npy: a float32 array of shape \(32, 32\); expected a float array "
                                         r"of shape \(32, 32, 1\) .*Add the channel axis"),
    ("normal", np.ones((3, *SIZE), np.float32), r"normal/0\.npy: .*shape \(3, 32, 32\).*channel axis is first"),
    ("image", np.ones((16, 32, 3), np.float32), r"image/0\.npy: .*shape \(16, 32, 3\).*spatial size is not "
                                                r"size=\(32, 32\)"),
    ("image", np.ones((*SIZE, 3), np.uint8), r"image/0\.npy: a uint8 array .*expected a float array.*Save it as "
                                             r"float32\."),
    ("label", np.ones(SIZE, bool), r"label/0\.npy: a bool array .*expected a float or integer array.*float32 or "
                                   r"int64"),
])
def test_wrong_array(nyu_root, folder, array, match):
    np.save(nyu_root / f"nyuv2/val/{folder}/0.npy", array)
    setup_error(nyu(nyu_root), match)


def test_integer_labels_are_accepted_and_loaded_as_int64(nyu_root):
    np.save(nyu_root / "nyuv2/train/label/0.npy", np.full(SIZE, 12, np.int16))
    dm = nyu(nyu_root, augment=False)
    dm.setup("fit")
    labels = dm.splits.train[0][1]["segmentation"]
    assert labels.dtype == torch.int64 and (labels == 12).all()


def test_pickled_array_is_refused(nyu_root):
    np.save(nyu_root / "nyuv2/train/label/2.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    setup_error(nyu(nyu_root), r"label/2\.npy: holds Python objects \(a pickled array\), which are never loaded")


def test_truncated_and_foreign_files(nyu_root):
    path = nyu_root / "nyuv2/train/depth/1.npy"
    path.write_bytes(path.read_bytes()[:-100])
    setup_error(nyu(nyu_root), r"depth/1\.npy: truncated: its header announces \(32, 32, 1\) float32")
    path.write_bytes(b"PK\x03\x04 this is a zip")
    setup_error(nyu(nyu_root), r"depth/1\.npy: not a readable \.npy file")


def test_invalid_arguments():
    with pytest.raises(ValueError, match="scales must be .* >= 1"):
        NYUv2(scales=(0.5, 1.0))
    with pytest.raises(ValueError, match="0 <= val_fraction < 1"):
        NYUv2(val_fraction=1.0)
    with pytest.raises(ValueError, match=r"size must be \(height, width\)"):
        NYUv2(size=(32,))
    with pytest.raises(ValueError, match="num_classes >= 2"):
        Cityscapes(num_classes=1)


# ------------------------------------------------------------------ augmentation


def coordinates(h: int = 12, w: int = 16) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every map holds its pixel's source position p = row * w + col, so the crops can be compared."""
    p = torch.arange(h * w, dtype=torch.float64).view(h, w)
    image = torch.stack([p, p + 0.5, -p]).float()
    normal = torch.stack([p + 1, -p, 2 * p]).float()
    return image, {"segmentation": p.long(), "depth": (p + 1)[None].float(), "normal": normal}


@pytest.mark.parametrize("flip", [False, True])
def test_scale_crop_is_the_same_for_every_target_and_divides_depth(flip):
    image, targets = coordinates()
    aug = Augmentation(scale=1.5, top=3, left=5, flip=flip)
    out_image, out = apply_augmentation(image, targets, aug)
    h, w = int(12 / 1.5), int(16 / 1.5)
    assert out_image.shape == image.shape and all(out[t].shape == targets[t].shape for t in targets)
    seg = out["segmentation"].flip(-1) if flip else out["segmentation"]
    depth = out["depth"].flip(-1) if flip else out["depth"]
    # nearest targets sample the same source pixels, all inside the crop, depth divided by the scale
    torch.testing.assert_close(depth[0] * 1.5 - 1, seg.float())
    rows, cols = seg // 16, seg % 16
    assert rows.min() == 3 and rows.max() == 3 + h - 1 and cols.min() == 5 and cols.max() == 5 + w - 1
    assert seg.dtype == torch.int64
    # bilinear with aligned corners: the output corners are the crop's corners, for the image and the normals
    img = out_image.flip(-1) if flip else out_image
    nrm = out["normal"].flip(-1) if flip else out["normal"]
    for (r, c), (sr, sc) in {(0, 0): (3, 5), (-1, -1): (3 + h - 1, 5 + w - 1)}.items():
        p = float(sr * 16 + sc)
        torch.testing.assert_close(img[:, r, c], torch.tensor([p, p + 0.5, -p]))
        sign = -1 if flip else 1
        torch.testing.assert_close(nrm[:, r, c], torch.tensor([sign * (p + 1), -p, 2 * p]))


def test_flip_negates_normal_x_and_mirrors_everything():
    image, targets = coordinates()
    out_image, out = apply_augmentation(image, targets, Augmentation(1.0, 0, 0, flip=True))
    assert torch.equal(out_image, image.flip(-1))
    assert torch.equal(out["segmentation"], targets["segmentation"].flip(-1))
    assert torch.equal(out["depth"], targets["depth"].flip(-1))
    assert torch.equal(out["normal"][0], -targets["normal"][0].flip(-1))
    assert torch.equal(out["normal"][1:], targets["normal"][1:].flip(-1))


def test_scale_one_without_flip_is_the_identity():
    image, targets = coordinates()
    out_image, out = apply_augmentation(image, targets, Augmentation(1.0, 0, 0, flip=False))
    assert torch.equal(out_image, image) and all(torch.equal(out[t], targets[t]) for t in targets)


def test_draws_cover_scales_positions_and_flips():
    draws = [draw_augmentation(12, 16, (1.0, 1.2, 1.5), augmentation_generator(0, 0, i)) for i in range(300)]
    assert {d.scale for d in draws} == {1.0, 1.2, 1.5}
    assert 100 < sum(d.flip for d in draws) < 200
    for d in draws:
        assert 0 <= d.top <= 12 - int(12 / d.scale) and 0 <= d.left <= 16 - int(16 / d.scale)
    big = [d for d in draws if d.scale == 1.5]
    assert len({(d.top, d.left) for d in big}) > 5
    assert draws[7] == draw_augmentation(12, 16, (1.0, 1.2, 1.5), augmentation_generator(0, 0, 7))


def test_dataset_augmentation_is_a_function_of_seed_epoch_and_index(nyu_root):
    ds = DenseSceneDataset(nyu_root / "nyuv2/train", [0, 1, 2], {"segmentation": "label", "depth": "depth",
                                                                 "normal": "normal"}, augment=True, seed=3)
    a, b = ds[(1, 4)], ds[(1, 4)]
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][t], b[1][t]) for t in a[1])
    raw = ds.raw(1)
    assert torch.equal(ds[1][0], raw[0])  # a bare index (evaluation) is never augmented
    changed = [not torch.equal(ds[(1, epoch)][0], raw[0]) for epoch in range(8)]
    assert any(changed)  # 1/3 chance of scale 1 and 1/2 of no flip per epoch: 8 epochs all unchanged is (1/6)^8
    other = DenseSceneDataset(ds.split_dir, ds.indices, ds.folders, augment=True, seed=4)
    assert any(not torch.equal(other[(1, e)][0], ds[(1, e)][0]) for e in range(4))


def epoch_batches(dm, epoch: int) -> list[MultiTaskBatch]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning does
    return list(loader)


def test_training_loader_is_deterministic_with_workers_and_varies_by_epoch(nyu_root):
    batches = {}
    for workers in (0, 2):
        dm = nyu(nyu_root, batch_size=2, num_workers=workers, seed=5)
        dm.setup("fit")
        batches[workers] = [epoch_batches(dm, e) for e in (0, 1)]
    for e in (0, 1):
        for b0, b2 in zip(batches[0][e], batches[2][e], strict=True):
            assert torch.equal(b0.x, b2.x) and all(torch.equal(b0.targets[t], b2.targets[t]) for t in b0.targets)
    assert not torch.equal(batches[0][0][0].x, batches[0][1][0].x)


def test_augment_off_and_eval_splits_give_the_stored_arrays(nyu_root):
    dm = nyu(nyu_root, augment=False, batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    raw = [dm.splits.train.raw(i) for i in range(3)]
    seen = {float(x.sum()) for x in batch.x}
    assert seen == {float(r[0].sum()) for r in raw}
    augmented = nyu(nyu_root, augment=True, batch_size=2)
    augmented.setup("fit")
    for split in ("val", "test"):
        batch = next(iter(getattr(augmented, f"{split}_dataloader")()))
        ds = getattr(augmented.splits, split)
        image, targets = ds.raw(0)
        assert torch.equal(batch.x[0], image)  # evaluation loaders are in order and never augmented
        assert all(torch.equal(batch.targets[t][0], targets[t]) for t in targets)
        assert np.array_equal(np.load(nyu_root / "nyuv2/val/image/0.npy").transpose(2, 0, 1), image.numpy())


# ------------------------------------------------------------------ splits, batches, tasks


def test_batches_have_the_tasks_layout(nyu_root):
    dm = nyu(nyu_root, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, MultiTaskBatch) and batch.x.shape == (2, 3, *SIZE) and batch.x.dtype == torch.float32
    assert batch.targets["segmentation"].shape == (2, *SIZE) and batch.targets["segmentation"].dtype == torch.int64
    assert batch.targets["depth"].shape == (2, 1, *SIZE) and batch.targets["normal"].shape == (2, 3, *SIZE)
    for name, task in dm.build_tasks().items():
        task.check_target(batch.targets[name])
    assert dm.num_classes == {"segmentation": 13, "depth": 1, "normal": 3}


def test_validation_is_the_test_split_by_default_with_a_warning(nyu_root):
    dm = nyu(nyu_root)
    with pytest.warns(UserWarning, match=r"val_fraction=0, so validation runs on the test split .*selection on the "
                                         r"test set"):
        dm.setup("fit")
    assert dm.splits.val.indices == dm.splits.test.indices == [0, 1] and dm.splits.val.split_dir.name == "val"
    assert len(dm.splits.train) == 3 and not dm.splits.val.augment


def test_held_out_validation_is_seeded_and_disjoint(tmp_path):
    root = write_dataset(tmp_path, counts=(10, 2))
    splits = []
    for _ in range(2):
        dm = nyu(root, val_fraction=0.3, split_seed=1)
        dm.setup("fit")
        splits.append((dm.splits.train.indices, dm.splits.val.indices))
    (train, val), again = splits
    assert again == (train, val) and len(val) == 3 and sorted(train + val) == list(range(10))
    assert dm.splits.val.split_dir.name == "train" and not dm.splits.val.augment and dm.splits.train.augment
    other = nyu(root, val_fraction=0.3, split_seed=2)
    other.setup("fit")
    assert other.splits.val.indices != val


def test_sample_count_warning(nyu_root):
    with pytest.warns(UserWarning, match=r"holds 3 train / 2 val samples; the published preprocessed data hold "
                                         r"795 / 654"):
        nyu(nyu_root).setup("fit")


def test_tasks_built():
    tasks = NYUv2().build_tasks()
    assert list(tasks) == ["segmentation", "depth", "normal"]
    seg = tasks["segmentation"]
    assert isinstance(seg, SegmentationTask) and seg.num_classes == 13 and seg.ignore_index == -1
    assert isinstance(tasks["depth"], DepthTask) and isinstance(tasks["normal"], NormalTask)
    city = Cityscapes().build_tasks()
    assert list(city) == ["segmentation", "depth"] and city["segmentation"].num_classes == 7
    assert city["segmentation"].ignore_index == -1 and Cityscapes(num_classes=19).build_tasks()[
        "segmentation"].num_classes == 19


def test_cityscapes_reads_its_label_folder(tmp_path):
    root = write_dataset(tmp_path, "cityscapes")
    dm = Cityscapes(root=str(root), size=SIZE, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch.targets) == {"segmentation", "depth"} and dm.num_classes == {"segmentation": 7, "depth": 1}
    setup_error(Cityscapes(root=str(root), size=SIZE, label_dir="label"), r"missing folder\(s\) label;")


# ------------------------------------------------------------------ configs


def load_recipe():
    spec = importlib.util.spec_from_file_location("multitask_recipe_nyuv2", REPO / "recipes" / "multitask.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_has_a_config_with_launch_command_and_reference():
    names = {(c.parent.name, c.stem) for c in CONFIGS}
    methods = ["equal", "uw", "dwa", "mgda", "pcgrad", "cagrad", "nash_mtl", "famo", "upgrad"]
    for dataset in ("nyuv2", "cityscapes"):
        assert {(dataset, "single_task"), (dataset, "segnet_equal")} <= names
        assert {(dataset, f"mtan_{m}") for m in methods} <= names
    for config in CONFIGS:
        text = config.read_text()
        rel = config.relative_to(REPO)
        assert text.startswith(f"# python recipes/multitask.py fit --config {rel} && python recipes/multitask.py "
                               f"test --config {rel} --ckpt_path last\n"), config
        assert any(source in text for source in ("Navon et al. 2022", "Liu et al. 2023", "No published row", "LibMTL"))
    stl = (REPO / "recipes/configs/nyuv2/single_task.yaml").read_text()
    assert "38.30, pix acc 63.76 | depth abs 0.6754, rel 0.2780 | normal mean 25.01, median 19.21" in stl
    nash = (REPO / "recipes/configs/nyuv2/mtan_nash_mtl.yaml").read_text()
    assert "40.13, pix acc 65.93 | depth abs 0.5261, rel 0.2171 | normal mean 25.26" in nash and "-4.04%" in nash


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_protocol_and_one_training_step(config, tmp_path, monkeypatch):
    """The published protocol (200 epochs, Adam 1e-4, StepLR halving after 100 epochs, stepped per epoch), then one
    step of the config itself on a fixture at 32x32 (SegNet widths 4: its 30M parameters would take minutes)."""
    cfg = yaml.safe_load(config.read_text())
    dataset = config.parent.name
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    steps_per_epoch = math.ceil({"nyuv2": 795, "cityscapes": 2975}[dataset] / data["batch_size"])
    assert cfg["trainer"]["max_epochs"] == 200 and model["optimizer"]["init_args"]["lr"] == 1e-4
    assert model["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.StepLR"
    assert model["lr_scheduler"]["init_args"] == {"step_size": 100, "gamma": 0.5}
    assert model["lr_scheduler_interval"] == "epoch"
    if isinstance(model["balancer"], dict) and model["balancer"]["class_path"].endswith("DWA"):
        assert model["balancer"]["init_args"]["period"] == steps_per_epoch
    deeplab = model["architecture"]["init_args"]["backbone"]["class_path"].endswith("DeepLabResNet50")
    assert data["batch_size"] == (8 if deeplab else {"nyuv2": 2, "cityscapes": 8}[dataset])  # LibMTL's DeepLab: 8

    root = write_dataset(tmp_path / "data", dataset)
    monkeypatch.setattr(sys, "argv", ["multitask.py"])
    cli = load_recipe().main([
        "fit", "--config", str(config), "--trainer.fast_dev_run=true", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", f"--data.root={root}",
        f"--data.size=[{SIZE[0]},{SIZE[1]}]", f"--model.input_shape=[3,{SIZE[0]},{SIZE[1]}]", "--data.num_workers=0",
        "--data.batch_size=2", f"--checkpoint.dirpath={tmp_path}/ckpt",
        *([] if deeplab else ["--model.architecture.init_args.backbone.init_args.widths=[4,4,4,4,4]"])])
    metrics = cli.trainer.callback_metrics
    assert list(cli.model.task_names) == list(cli.datamodule.build_tasks())
    assert torch.isfinite(metrics["train/loss"]) and cli.trainer.global_step == 1
    expected = {"val/segmentation/miou", "val/depth/abs_err", "val/metric_mean"}
    if dataset == "nyuv2":
        expected |= {"val/normal/mean_angle", "val/normal/within_30"}
    assert expected <= set(metrics)
