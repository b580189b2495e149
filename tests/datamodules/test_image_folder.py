"""ImageFolderEpisodes: episodes, splits, caching and bad input on small fake datasets; the real Tiny-ImageNet
subset zip."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_mtl.datamodules import EpisodeSettings
from lightning_mtl.datamodules.image_folder import ImageFolderEpisodes

REPO = Path(__file__).resolve().parents[2]
TINY_ZIP = Path("tiny-imagenet") / "tiny-imagenet-200-subset.zip"


def png(cls: int, sample: int, size: int = 8) -> bytes:
    """An RGB PNG whose first pixel spells its class (red) and sample (green)."""
    pixels = np.random.default_rng(cls * 1000 + sample).integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[0, 0, :2] = cls, sample
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_folders(root: Path, classes: int = 10, per_class: int = 6) -> Path:
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"class{c:02d}" / f"{i:03d}.png").write_bytes(png(c, i))
    return root


@pytest.fixture
def folders(tmp_path) -> Path:
    return make_folders(tmp_path / "data" / "toy")


EPISODES = EpisodeSettings(train_ways=3, train_shots=1, train_queries=2, eval_ways=2, eval_shots=1, eval_queries=2,
                           eval_meta_batch_size=4, val_episodes=8, test_episodes=8)


def dm(path: Path, tmp_path: Path, episodes: dict | None = None, **kw) -> ImageFolderEpisodes:
    """The datamodule of ``path`` with small episodes; ``episodes`` overrides fields of :data:`EPISODES`."""
    kw = {"image_size": 8, **kw}
    return ImageFolderEpisodes(path=str(path), cache_dir=str(tmp_path / "cache"),
                               episodes=replace(EPISODES, **(episodes or {})), **kw)


def ready(d: ImageFolderEpisodes) -> ImageFolderEpisodes:
    d.prepare_data()
    d.setup()
    return d


def class_ids(images: np.ndarray) -> set[int]:
    """Classes of a (classes, samples, 3, H, W) array, read from the red channel of the first pixel."""
    return set(images[:, :, 0, 0, 0].ravel().tolist())


# ------------------------------------------------------------------ episodes and splits


def test_episode_shapes_labels_and_disjoint_splits(folders, tmp_path):
    d = ready(dm(folders, tmp_path, episodes={"meta_batch_size": 2}))
    assert [d.num_classes(s) for s in ("train", "val", "test")] == [6, 2, 2]  # 0.64 / 0.16 / 0.20 of 10
    ids = [class_ids(d.samplers[s].images) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2]) and len(ids[0] | ids[1] | ids[2]) == 10
    ep = next(iter(d.train_dataloader()))
    assert ep.support_x.shape == (2, 3, 3, 8, 8) and ep.query_x.shape == (2, 6, 3, 8, 8) and ep.ways == 3
    assert ep.support_y[0].tolist() == [0, 1, 2] and ep.query_y[0].tolist() == [0, 0, 1, 1, 2, 2]
    for b in range(2):  # each label is one class, the same in support and query; support and query images differ
        s, q = ep.support_x[b, :, :2, 0, 0].tolist(), ep.query_x[b, :, :2, 0, 0].tolist()
        assert [c for c, _ in s] == [c for c, _ in q[::2]] == [c for c, _ in q[1::2]] and len({c for c, _ in s}) == 3
        assert not {tuple(x) for x in s} & {tuple(x) for x in q}
    test = next(iter(d.test_dataloader()))
    assert test.support_x.shape == (4, 2, 3, 8, 8) and set(test.support_x[:, :, 0, 0, 0].ravel().tolist()) <= ids[2]


def test_determinism_by_seed(folders, tmp_path):
    a, b = ready(dm(folders, tmp_path)), ready(dm(folders, tmp_path))
    c = ready(dm(folders, tmp_path, episodes={"seed": 1}))
    first = [next(iter(x.train_dataloader())).support_x for x in (a, b, c)]
    assert (first[0] == first[1]).all() and not (first[0] == first[2]).all()
    assert (next(iter(a.test_dataloader())).query_x == next(iter(c.test_dataloader())).query_x).all()
    other_split = ready(dm(folders, tmp_path, split_seed=1))
    assert class_ids(other_split.samplers["test"].images) != class_ids(a.samplers["test"].images)


def test_explicit_lists_names_and_files(folders, tmp_path):
    (tmp_path / "test.txt").write_text("# held-out classes\nclass08\nclass09\n")
    d = ready(dm(folders, tmp_path, train_classes=[f"class{c:02d}" for c in range(5)],
                 val_classes=["class05", "class06", "class07"], test_classes=str(tmp_path / "test.txt")))
    assert class_ids(d.samplers["test"].images) == {8, 9} and class_ids(d.samplers["val"].images) == {5, 6, 7}


def test_grayscale_and_resize(folders, tmp_path):
    d = ready(dm(folders, tmp_path, channels=1, image_size=5))
    assert d.samplers["train"].images.shape == (6, 6, 1, 5, 5)


def test_unequal_classes_are_cut_to_the_smallest_with_warning(folders, tmp_path):
    for i in range(6, 9):
        (folders / "class00" / f"{i:03d}.png").write_bytes(png(0, i))
    d = dm(folders, tmp_path, train_classes=["class00", "class01", "class02"], val_classes=["class03", "class04"],
           test_classes=["class05", "class06"])
    d.prepare_data()
    with pytest.warns(UserWarning, match="train: classes hold 6 to 9 images; episodes use the first 6"):
        d.setup()
    assert d.samplers["train"].images.shape[:2] == (3, 6)


# ------------------------------------------------------------------ bad input


def test_missing_and_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image dataset .*nowhere does not exist\. Pass --data\.path"):
        dm(tmp_path / "nowhere", tmp_path).prepare_data()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images found in .*empty: expected <class>/<image>"):
        dm(tmp_path / "empty", tmp_path).prepare_data()


def test_class_with_too_few_images(folders, tmp_path):
    for f in sorted((folders / "class03").iterdir())[2:]:
        f.unlink()
    d = dm(folders, tmp_path, train_classes=["class03", "class01", "class02"], val_classes=["class04", "class05"],
           test_classes=["class06", "class07"])
    d.prepare_data()
    with pytest.raises(ValueError, match=r"/train: class class03 has 2 images but episodes need shots \+ queries = "
                                         r"1 \+ 2 = 3; add images to class03"):
        d.setup()


def test_non_image_and_corrupt_files_named(folders, tmp_path):
    (folders / "class02" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"class02/notes\.txt in class folder class02 is not an image"):
        dm(folders, tmp_path).prepare_data()
    (folders / "class02" / "notes.txt").unlink()
    (folders / "class04" / "003.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError, match=r"corrupt or unreadable image .*class04/003\.png"):
        dm(folders, tmp_path).prepare_data()


def test_ways_larger_than_split(folders, tmp_path):
    d = dm(folders, tmp_path, episodes={"eval_ways": 3})
    d.prepare_data()
    with pytest.raises(ValueError, match=r"toy/val: 3-way episodes need 3 classes but the split has only 2"):
        d.setup()


def test_bad_class_lists(folders, tmp_path):
    d = dm(folders, tmp_path, train_classes=["class00", "class01"], val_classes=["class02", "kitten"],
           test_classes=["class03"])
    d.prepare_data()
    with pytest.raises(ValueError, match=r"val_classes: unknown class 'kitten'; .* has 10 classes \(e\.g\. class00"):
        d.setup()
    d = dm(folders, tmp_path, train_classes=["class00", "class01"], val_classes=["class02"], test_classes=["class01"])
    with pytest.raises(ValueError, match="test_classes: class 'class01' is already in train_classes"):
        d.setup()
    with pytest.raises(ValueError, match="give train_classes, val_classes and test_classes together"):
        dm(folders, tmp_path, train_classes=["class00"])
    with pytest.raises(FileNotFoundError, match="test_classes: class list nope.txt not found"):
        dm(folders, tmp_path, train_classes=["class00"], val_classes=["class01"], test_classes="nope.txt").setup()


@pytest.mark.parametrize("kw,match", [({"image_size": 0}, "image_size must be a positive"),
                                      ({"channels": 2}, "channels must be 1 .* or 3"),
                                      ({"split_ratios": (0.5, 0.0, 0.5)}, "split_ratios must be three positive")])
def test_bad_settings(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        dm(tmp_path, tmp_path, **kw)


# ------------------------------------------------------------------ zips


def zip_of(folder: Path, dest: Path, top: str = "toy") -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(folder.rglob("*.png")):
            zf.write(p, f"{top}/{p.relative_to(folder).as_posix()}")
    return dest


def test_zip_matches_folder(folders, tmp_path):
    from_dir = ready(dm(folders, tmp_path / "a"))
    from_zip = ready(dm(zip_of(folders, tmp_path / "toy.zip"), tmp_path / "b"))
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(from_dir.samplers[s].images, from_zip.samplers[s].images)


@pytest.mark.parametrize("member,why", [("../evil/x.png", "'..' path component"), ("/abs/x.png", "absolute path"),
                                        ("toy/class00/link.png", "symbolic link")])
def test_unsafe_zip_members_refused(folders, tmp_path, member, why):
    archive = zip_of(folders, tmp_path / "toy.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo(member)
        if why == "symbolic link":
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd" if why == "symbolic link" else png(0, 0))
    with pytest.raises(ValueError, match=f"refusing '{member}' \\({why}"):
        dm(archive, tmp_path).prepare_data()


def test_symlink_in_folder_refused(folders, tmp_path):
    os.symlink("/etc", folders / "class03" / "escape")
    with pytest.raises(ValueError, match=r"refusing 'class03/escape' \(symbolic link"):
        dm(folders, tmp_path).prepare_data()


def test_tiny_imagenet_layout_in_zip(tmp_path):
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n001\nn002\nn003\nn004\n")
        for c in range(4):
            zf.writestr(f"tiny-imagenet-200/train/n00{c + 1}/n00{c + 1}_boxes.txt", "0 0 8 8")
            for i in range(4):
                zf.writestr(f"tiny-imagenet-200/train/n00{c + 1}/images/n00{c + 1}_{i}.JPEG", png(c, i))
        zf.writestr("tiny-imagenet-200/val/images/val_0.JPEG", png(9, 9))
    d = ready(dm(archive, tmp_path, train_classes=["n001", "n002"], val_classes=["n003"], test_classes=["n004"],
                 episodes={"train_ways": 2, "eval_ways": 1}))
    assert d.samplers["train"].images.shape == (2, 4, 3, 8, 8)


# ------------------------------------------------------------------ cache


def test_cache_in_cache_dir_reused_rebuilt_and_keyed_by_settings(folders, tmp_path):
    d = ready(dm(folders, tmp_path))
    path = d.cache_path()
    assert path.parent == tmp_path / "cache" and path.exists()
    mtime = path.stat().st_mtime_ns
    dm(folders, tmp_path).prepare_data()
    assert path.stat().st_mtime_ns == mtime, "cache was rebuilt"
    assert dm(folders, tmp_path, channels=1).cache_path() != path
    path.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="(?s)image folder cache .* is unreadable .* rebuilding it"):
        dm(folders, tmp_path).prepare_data()
    (folders / "class00" / "000.png").write_bytes(png(0, 99))
    assert dm(folders, tmp_path).cache_path() != path, "changed sources must change the cache key"


def test_read_only_root_is_never_written(folders, tmp_path):
    root = folders.parent
    for p in [root, *root.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    try:
        ready(dm(folders, tmp_path))
    finally:
        for p in [root, *root.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    assert sorted(p.name for p in root.iterdir()) == ["toy"] and not list(root.rglob("*.pt"))


# ------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def tiny_root() -> Path:
    for candidate in (os.environ.get("LIGHTNING_MTL_DATA"), REPO / ".." / "shared" / "data"):
        if candidate and (Path(candidate) / TINY_ZIP).exists():
            return Path(candidate)
    pytest.skip("real Tiny-ImageNet subset absent: set LIGHTNING_MTL_DATA to a folder holding " + str(TINY_ZIP))


def test_real_tiny_imagenet_subset(tiny_root, cache_dir):
    d = ready(ImageFolderEpisodes(path=str(TINY_ZIP), root=str(tiny_root), cache_dir=str(cache_dir), image_size=64,
                                  episodes=EpisodeSettings(test_episodes=32)))
    assert [d.num_classes(s) for s in ("train", "val", "test")] == [128, 32, 40]
    images = d.samplers["train"].images
    assert images.shape == (128, 100, 3, 64, 64) and images.dtype == np.uint8
    assert 60 < images.mean() < 190 and images[:, :, 0].mean() != images[:, :, 2].mean(), "colour photographs"
    episodes = list(d.test_dataloader())
    assert sum(e.meta_batch_size for e in episodes) == 32
    assert episodes[0].support_x.shape == (16, 5, 3, 64, 64) and episodes[0].query_x.shape == (16, 75, 3, 64, 64)
