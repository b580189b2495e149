"""CelebA: the official file formats on tiny fixtures (folder and zip), every layout error, lazy decoding with
workers and the bounded cache, the 40 tasks, and every recipes/configs/celeba config for one step."""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lightning_mtl.datamodules.celeba import CelebA, CelebAFormatError, read_attributes, read_partition
from lightning_mtl.mtl.tasks import ClassificationTask

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "recipes" / "configs" / "celeba").glob("*.yaml"))
NAMES = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
         "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
         "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
         "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
         "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
PARTITION = [0] * 6 + [1] * 3 + [2] * 3  # 12 images: 6 train, 3 val, 3 test


def files(n: int = len(PARTITION)) -> list[str]:
    return [f"{i:06d}.jpg" for i in range(1, n + 1)]


def attribute_values(n: int = len(PARTITION)) -> np.ndarray:
    return np.where(np.random.default_rng(0).random((n, 40)) < 0.5, -1, 1)  # (n, 40) in {1, -1}


def write_celeba(root: Path, as_zip: bool = False) -> Path:
    """The official layout at ``root/celeba``: annotation files as released (values padded to width 2) and 12 small
    JPEGs (218x178 in the real data; 12x10 here)."""
    folder = root / "celeba"
    folder.mkdir(parents=True)
    values = attribute_values()
    rows = [f"{f} " + " ".join(f"{v:2d}" for v in row) for f, row in zip(files(), values, strict=True)]
    (folder / "list_attr_celeba.txt").write_text("\n".join([str(len(rows)), " ".join(NAMES), *rows]) + "\n")
    (folder / "list_eval_partition.txt").write_text("".join(f"{f} {c}\n" for f, c in zip(files(), PARTITION,
                                                                                          strict=True)))
    rng = np.random.default_rng(1)
    images = folder / "img_align_celeba"
    images.mkdir()
    for f in files():
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(images / f, quality=95)
    if as_zip:
        with zipfile.ZipFile(folder / "img_align_celeba.zip", "w") as z:
            for f in files():
                z.write(images / f, f"img_align_celeba/{f}")
        for f in images.iterdir():
            f.unlink()
        images.rmdir()
    return folder


def setup(root: Path, **kwargs) -> CelebA:
    dm = CelebA(root=str(root), image_size=8, batch_size=4, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_official_split_targets_and_tasks(tmp_path):
    write_celeba(tmp_path)
    dm = setup(tmp_path)
    splits = dm.splits
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 3)
    assert dm.tasks == NAMES and dm.num_classes == dict.fromkeys(NAMES, 2)
    x, y = splits.val[1]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8
    expected = (attribute_values()[7] + 1) // 2  # the second val image is the 8th of the file
    assert [int(y[a]) for a in NAMES] == expected.tolist()
    tasks = dm.build_tasks()
    assert list(tasks) == NAMES
    assert all(isinstance(t, ClassificationTask) and t.num_classes == 2 for t in tasks.values())
    assert tasks["Male"].directions() == {"acc": True}
    batch = next(iter(dm.train_dataloader()))
    assert batch.x.shape == (4, 3, 8, 8) and set(batch.targets) == set(NAMES) and batch.targets["Young"].shape == (4,)


def test_attribute_subset_and_unknown_attribute(tmp_path):
    write_celeba(tmp_path)
    assert setup(tmp_path, attributes=["Young", "Male"]).tasks == ["Young", "Male"]
    with pytest.raises(ValueError, match="unknown CelebA attributes \\['Smile'\\]; valid names: 5_o_Clock_Shadow"):
        setup(tmp_path, attributes=["Smile"])


def test_zip_equals_folder(tmp_path):
    write_celeba(tmp_path / "a")
    write_celeba(tmp_path / "b", as_zip=True)
    folder, archive = setup(tmp_path / "a"), setup(tmp_path / "b")
    assert archive.locate()[2].name == "img_align_celeba.zip"
    for split in ("train", "val", "test"):
        a, b = getattr(folder.splits, split), getattr(archive.splits, split)
        assert len(a) == len(b)
        for i in range(len(a)):
            assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]


def test_workers_read_the_zip_and_the_cache_is_bounded(tmp_path):
    write_celeba(tmp_path, as_zip=True)
    ds = setup(tmp_path, cache_images=2).splits.train
    loaders = [DataLoader(ds, batch_size=3, num_workers=w) for w in (0, 2)]
    plain, workers = (list(loader) for loader in loaders)
    assert len(plain) == len(workers) == 2
    for (x0, y0), (x2, y2) in zip(plain, workers, strict=True):
        assert torch.equal(x0, x2) and all(torch.equal(y0[a], y2[a]) for a in NAMES)
    for i in range(len(ds)):
        ds[i]
    assert len(ds._cache) == 2 and torch.equal(ds[0][0], ds._cache[0])  # bounded, and served from it


def test_unsafe_zip_members_are_refused(tmp_path):
    folder = write_celeba(tmp_path, as_zip=True)
    with zipfile.ZipFile(folder / "img_align_celeba.zip", "a") as z:
        z.writestr("../evil.jpg", b"x")
    with pytest.raises(ValueError, match="refusing '../evil.jpg' \\('..' path component\\)"):
        setup(tmp_path)


def test_official_subfolders_are_accepted(tmp_path):
    folder = write_celeba(tmp_path)
    for sub, name in (("Anno", "list_attr_celeba.txt"), ("Eval", "list_eval_partition.txt"),
                      ("Img", "img_align_celeba")):
        (folder / sub).mkdir()
        (folder / name).rename(folder / sub / name)
    assert len(setup(tmp_path).splits.test) == 3


@pytest.mark.parametrize("missing", ["list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba"])
def test_missing_file_says_where_and_the_layout(tmp_path, missing):
    folder = write_celeba(tmp_path)
    target = folder / missing
    if target.is_dir():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(FileNotFoundError, match=f"CelebA: missing {missing} \\(looked for .*celeba/{missing}.*"
                                                f"mmlab.*<root>/celeba/list_attr_celeba.txt"):
        CelebA(root=str(tmp_path)).prepare_data()


def _edit(path: Path, line: int, new: str | None) -> None:
    lines = path.read_text().splitlines()
    if new is None:
        del lines[line - 1]
    else:
        lines[line - 1] = new
    path.write_text("\n".join(lines) + "\n")


ROW = "000003.jpg " + " ".join(["1"] * 40)
ATTRIBUTE_ERRORS = [
    (1, "twelve", "line 1 is 'twelve'"),
    (2, " ".join(NAMES[:39]), "line 2: expected the 40 distinct attribute names, got 39"),
    (2, " ".join([*NAMES[:39], NAMES[0]]), "got 40 \\(39 distinct\\)"),
    (5, ROW.rsplit(" ", 1)[0], "line 5: '000003.jpg' has 39 values"),
    (5, ROW + " 1", "line 5: '000003.jpg' has 41 values"),
    (5, ROW.replace(" 1", " 0", 1), "line 5: value '0' for '000003.jpg'; attribute values must be 1 or -1"),
    (5, ROW.replace("000003", "000002"), "line 5: '000002.jpg' is listed twice"),
    (1, "13", "line 1 announces 13 images but the file lists 12"),
]


@pytest.mark.parametrize(("line", "new", "message"), ATTRIBUTE_ERRORS)
def test_malformed_attribute_file(tmp_path, line, new, message):
    folder = write_celeba(tmp_path)
    _edit(folder / "list_attr_celeba.txt", line, new)
    with pytest.raises(CelebAFormatError, match=f"list_attr_celeba.txt.*{message}"):
        setup(tmp_path)


@pytest.mark.parametrize(("line", "new", "message"), [
    (4, "000004.jpg 3", "line 4: expected '<file> <0\\|1\\|2>' \\(train / val / test\\), got '000004.jpg 3'"),
    (4, "000004.jpg", "line 4: expected '<file> <0\\|1\\|2>'"),
    (4, "000003.jpg 0", "line 4: '000003.jpg' is listed twice"),
])
def test_malformed_partition_file(tmp_path, line, new, message):
    folder = write_celeba(tmp_path)
    _edit(folder / "list_eval_partition.txt", line, new)
    with pytest.raises(CelebAFormatError, match=f"list_eval_partition.txt, {message}"):
        setup(tmp_path)


def test_partition_entry_without_attribute_row(tmp_path):
    folder = write_celeba(tmp_path)
    _edit(folder / "list_attr_celeba.txt", 7, None)  # 000005.jpg
    _edit(folder / "list_attr_celeba.txt", 1, "11")
    with pytest.raises(CelebAFormatError, match="list_eval_partition.txt: 1 images have no attribute row in .*"
                                                "list_attr_celeba.txt \\(first: 000005.jpg\\)"):
        setup(tmp_path)


def test_partition_entry_without_image(tmp_path):
    folder = write_celeba(tmp_path)
    (folder / "img_align_celeba" / "000009.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 images of .* are missing from .*img_align_celeba \\(first: "
                                                "000009.jpg\\).*complete the download"):
        setup(tmp_path)


def test_corrupt_image_is_named_when_read(tmp_path):
    folder = write_celeba(tmp_path)
    (folder / "img_align_celeba" / "000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="corrupt or unreadable image .*000001.jpg"):
        setup(tmp_path).splits.train[0]


def test_readers_parse_the_released_formats(tmp_path):
    folder = write_celeba(tmp_path)
    names, rows = read_attributes(folder / "list_attr_celeba.txt")
    assert names == NAMES and rows["000012.jpg"].tolist() == ((attribute_values()[11] + 1) // 2).tolist()
    assert read_partition(folder / "list_eval_partition.txt") == dict(zip(files(), PARTITION, strict=True))


# ---------------------------------------------------------------------------------------------- every config, one step
def load_recipe():
    spec = importlib.util.spec_from_file_location("multitask_recipe_celeba", REPO / "recipes" / "multitask.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_cover_the_methods():
    assert {c.stem for c in CONFIGS} == {"hps_equal", "hps_mgda_ub", "hps_pcgrad", "hps_upgrad", "hps_uw"}
    for config in CONFIGS:
        assert config.read_text().startswith(f"# python recipes/multitask.py fit --config recipes/configs/celeba/"
                                             f"{config.name} ")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_one_step(config, tmp_path, monkeypatch):
    """One training step and one validation batch on the fixture, at 16x16 (all 40 tasks for equal weighting; 3
    attributes for the gradient methods, whose 40 x 11M task-gradient matrix is a GPU's job); the zip for two."""
    torch.set_num_threads(1)
    write_celeba(tmp_path / "data", as_zip=config.stem in ("hps_equal", "hps_pcgrad"))
    monkeypatch.setattr(sys, "argv", ["multitask.py"])
    subset = [] if config.stem == "hps_equal" else ["--data.attributes=[Male,Smiling,Young]"]
    cli = load_recipe().main(["fit", "--config", str(config), "--trainer.fast_dev_run=true", "--trainer.logger=false",
                              f"--data.root={tmp_path / 'data'}", "--data.image_size=16", "--data.batch_size=4",
                              "--data.num_workers=0", "--model.input_shape=[3,16,16]", "--model.diagnostics_every=0",
                              *subset, f"--checkpoint.dirpath={tmp_path}/ckpt",
                              f"--trainer.default_root_dir={tmp_path}"])
    metrics = cli.trainer.callback_metrics
    assert len(cli.model.task_names) == (40 if config.stem == "hps_equal" else 3)
    assert torch.isfinite(metrics["train/loss"]) and "val/Male/acc" in metrics
    assert cli.model.architecture.backbone.num_features == 2048  # MGDA's encoder: 2x2x512
