"""MiniImageNetEpisodes: fixtures in the real formats (images/ + split CSVs, learn2learn pickles), the restricted
unpickler, bad input, and the real Ravi & Larochelle CSVs."""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_mtl.datamodules import EpisodeSettings
from lightning_mtl.datamodules._safe_pickle import RestrictedUnpickler, UnsafePickleError, safe_load
from lightning_mtl.datamodules.mini_imagenet import (
    IMAGES_PER_CLASS,
    PICKLES,
    SPLIT_CLASSES,
    MiniImageNetEpisodes,
    check_split,
    read_split_csv,
)

REPO = Path(__file__).resolve().parents[2]
WNIDS = {"train": ["n01532829", "n01558993", "n01704323", "n01749939"], "val": ["n01855672", "n02091244"],
         "test": ["n01930112", "n01981276", "n02099601"]}
PER_CLASS = 5


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_images_source(folder: Path) -> Path:
    """``images/<wnid><8 digits>.jpg`` and ``{train,val,test}.csv`` as in Ravi & Larochelle's release."""
    (folder / "images").mkdir(parents=True)
    for split, wnids in WNIDS.items():
        rows = ["filename,label"]
        for wnid in wnids:
            for i in range(PER_CLASS):
                name = f"{wnid}{i + 1:08d}.jpg"
                (folder / "images" / name).write_bytes(jpeg(int(wnid[1:]) + i))
                rows.append(f"{name},{wnid}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return folder


def make_pickles(images_folder: Path, dest: Path) -> Path:
    """learn2learn's caches, made with pickle.dumps from the decoded JPEGs of ``images_folder``."""
    dest.mkdir(parents=True, exist_ok=True)
    for split in WNIDS:
        images, class_dict = [], {}
        for wnid, names in read_split_csv(images_folder / f"{split}.csv").items():
            class_dict[wnid] = list(range(len(images), len(images) + len(names)))
            images += [np.asarray(Image.open(images_folder / "images" / n).convert("RGB")) for n in names]
        data = {"image_data": np.stack(images), "class_dict": class_dict}
        (dest / PICKLES[split]).write_bytes(pickle.dumps(data))
    return dest


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_pickles(make_images_source(root / "miniimagenet"), root / "pickles")
    return root


EPISODES = EpisodeSettings(train_ways=3, train_queries=2, eval_ways=2, eval_queries=2, eval_meta_batch_size=4,
                           val_episodes=8, test_episodes=8)


def dm(root: Path, tmp_path: Path, episodes: dict | None = None, **kw) -> MiniImageNetEpisodes:
    """The datamodule of ``root`` with small episodes; ``episodes`` overrides fields of :data:`EPISODES`."""
    kw = {"check_protocol": False, **kw}
    return MiniImageNetEpisodes(root=str(root), cache_dir=str(tmp_path / "cache"),
                                episodes=replace(EPISODES, **(episodes or {})), **kw)


def ready(d: MiniImageNetEpisodes) -> MiniImageNetEpisodes:
    d.prepare_data()
    d.setup()
    return d


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------ episodes


def test_images_source_episodes(sources, tmp_path):
    d = ready(dm(sources, tmp_path, source="images", episodes={"meta_batch_size": 2}))
    assert [d.num_classes(s) for s in ("train", "val", "test")] == [4, 2, 3]
    ep = next(iter(d.train_dataloader()))
    assert ep.support_x.shape == (2, 3, 3, 84, 84) and ep.query_x.shape == (2, 6, 3, 84, 84)
    assert ep.support_y[1].tolist() == [0, 1, 2] and ep.query_y[1].tolist() == [0, 0, 1, 1, 2, 2]
    flat = {s: {d.samplers[s].images[c, i].tobytes() for c in range(d.num_classes(s)) for i in range(PER_CLASS)}
            for s in ("train", "val", "test")}
    assert not (flat["train"] & flat["val"] or flat["train"] & flat["test"] or flat["val"] & flat["test"])
    test = next(iter(d.test_dataloader()))
    assert test.support_x.shape == (4, 2, 3, 84, 84)
    assert {x.tobytes() for x in test.support_x.flatten(0, 1).numpy()} <= flat["test"]


def test_pickle_source_equals_images_source_and_auto_prefers_pickles(sources, tmp_path):
    from_images = ready(dm(sources, tmp_path, source="images"))
    auto = dm(sources, tmp_path, path="pickles")
    assert auto.files()[0] == "pickle"
    ready(auto)
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(from_images.samplers[s].images, auto.samplers[s].images)


def test_determinism_trainval_and_resize(sources, tmp_path):
    a, b = ready(dm(sources, tmp_path)), ready(dm(sources, tmp_path))
    c = ready(dm(sources, tmp_path, episodes={"seed": 3}))
    first = [next(iter(x.train_dataloader())).query_x for x in (a, b, c)]
    assert (first[0] == first[1]).all() and not (first[0] == first[2]).all()
    assert ready(dm(sources, tmp_path, train_split="trainval")).num_classes("train") == 6
    small = ready(dm(sources, tmp_path, path="pickles", image_size=32))
    assert small.samplers["val"].images.shape == (2, PER_CLASS, 3, 32, 32)


# ------------------------------------------------------------------ bad input


def test_csv_naming_a_missing_image(sources, tmp_path):
    folder = tmp_path / "data" / "miniimagenet"
    make_images_source(folder)
    (folder / "images" / "n0185567200000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"val\.csv names n0185567200000003\.jpg, missing from .*images"):
        dm(tmp_path / "data", tmp_path).prepare_data()


def test_wrong_class_counts(sources, tmp_path):
    d = dm(sources, tmp_path, check_protocol=True)
    d.prepare_data()
    with pytest.raises(ValueError, match=r"train\.csv: 4 classes, but the Ravi & Larochelle train split has 64"):
        d.setup()
    with pytest.raises(ValueError, match="class n1 has 599 images, the Ravi & Larochelle split has 600 per class"):
        check_split({f"n{i}": 600 - (i == 1) for i in range(16)}, "val", "val.csv")


def test_bad_csv_and_missing_sources(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\nx.jpg,n1\n")
    with pytest.raises(ValueError, match=r"bad\.csv:1: expected the header 'filename,label', got 'file,class'"):
        read_split_csv(bad)
    bad.write_text("filename,label\nx.jpg,n1\ny.jpg\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: expected 'filename,label', got 'y\.jpg'"):
        read_split_csv(bad)
    with pytest.raises(FileNotFoundError, match=r"Mini-ImageNet folder .*miniimagenet does not exist"):
        dm(tmp_path, tmp_path).prepare_data()
    (tmp_path / "miniimagenet").mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)pickle source is incomplete; missing:.*validation\.pkl"):
        dm(tmp_path, tmp_path, source="pickle").prepare_data()


def test_class_in_two_splits(tmp_path):
    folder = make_images_source(tmp_path / "data" / "miniimagenet")
    test_csv = folder / "test.csv"
    test_csv.write_text(test_csv.read_text() + "n0153282900000001.jpg,n01532829\n")
    with pytest.raises(ValueError, match=r"test\.csv: class n01532829 is also in another split"):
        dm(tmp_path / "data", tmp_path).prepare_data()


def test_corrupt_cache_rebuilt_with_warning(sources, tmp_path):
    d = ready(dm(sources, tmp_path))
    d.cache_path().write_bytes(b"\0" * 10)
    with pytest.warns(UserWarning, match="(?s)Mini-ImageNet cache .* is unreadable .* rebuilding it"):
        ready(dm(sources, tmp_path))
    assert d.cache_path().parent == tmp_path / "cache"


# ------------------------------------------------------------------ restricted unpickler


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_restricted_unpickler_loads_numpy_data(protocol):
    data = {"image_data": np.arange(2 * 84 * 84 * 3, dtype=np.uint8).reshape(2, 84, 84, 3),
            "class_dict": {"n01": [0], "n02": [np.int64(1)]}, "meta": ({1, 2}, frozenset("ab"))}
    out = RestrictedUnpickler(io.BytesIO(pickle.dumps(data, protocol=protocol))).load()
    np.testing.assert_array_equal(out["image_data"], data["image_data"])
    assert out["class_dict"] == {"n01": [0], "n02": [1]} and out["meta"] == data["meta"]


def test_malicious_pickle_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"image_data": Evil(marker), "class_dict": {}})
    with pytest.raises(UnsafePickleError, match=r"refused global (posix|nt)\.system"):
        RestrictedUnpickler(io.BytesIO(payload)).load()
    assert not marker.exists()
    folder = tmp_path / "data" / "miniimagenet"
    folder.mkdir(parents=True)
    for name in PICKLES.values():
        (folder / name).write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=r"mini-imagenet-cache-train\.pkl: refused global (posix|nt)\.system"):
        dm(tmp_path / "data", tmp_path).prepare_data()
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match=r"refused global builtins\.eval"):
        RestrictedUnpickler(io.BytesIO(b"cbuiltins\neval\n(S'1+1'\ntR.")).load()


def test_truncated_and_malformed_pickles(tmp_path):
    path = tmp_path / "broken.pkl"
    path.write_bytes(pickle.dumps({"image_data": np.zeros((1, 84, 84, 3), np.uint8)})[:40])
    with pytest.raises(ValueError, match=r"broken\.pkl is not a readable pickle"):
        safe_load(path)
    folder = tmp_path / "data" / "miniimagenet"
    folder.mkdir(parents=True)
    for name in PICKLES.values():
        (folder / name).write_bytes(pickle.dumps({"image_data": np.zeros((2, 84, 84, 3)), "class_dict": {}}))
    with pytest.raises(ValueError, match=r"train\.pkl: expected \{'image_data': uint8 array"):
        dm(tmp_path / "data", tmp_path).prepare_data()


# ------------------------------------------------------------------ real split files


@pytest.fixture(scope="module")
def real_csvs() -> Path:
    for candidate in (os.environ.get("LIGHTNING_MTL_DATA"), REPO / ".." / "shared" / "data"):
        if candidate and (Path(candidate) / "miniimagenet" / "test.csv").exists():
            return Path(candidate)
    pytest.skip("real Mini-ImageNet split CSVs absent: set LIGHTNING_MTL_DATA to a folder holding miniimagenet/*.csv")


def test_real_split_csvs(real_csvs):
    splits = {s: read_split_csv(real_csvs / "miniimagenet" / f"{s}.csv") for s in ("train", "val", "test")}
    for split, classes in splits.items():
        check_split({w: len(names) for w, names in classes.items()}, split, split)
        assert len(classes) == SPLIT_CLASSES[split] and {len(v) for v in classes.values()} == {IMAGES_PER_CLASS}
        assert all(n.startswith(w) and n.endswith(".jpg") for w, names in classes.items() for n in names)
    assert not (set(splits["train"]) & set(splits["val"]) or set(splits["train"]) & set(splits["test"]))
    assert sum(len(v) for c in splits.values() for v in c.values()) == 60000


def test_real_csvs_without_images_say_what_is_missing(real_csvs, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)images source is incomplete \(or the pickles .*\).*images"):
        dm(real_csvs, tmp_path).prepare_data()
