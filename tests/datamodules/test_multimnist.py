"""MultiMNIST: the IDX reader on small synthetic files, the overlay construction, splits, and the real t10k files."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_mtl.batches import MultiTaskBatch
from lightning_mtl.datamodules import MultiMNIST, read_idx
from lightning_mtl.datamodules.multimnist import IDXError, overlay_pairs, read_mnist


def write_idx(path: Path, array: np.ndarray, compress: bool = True, type_code: int = 0x08) -> Path:
    data = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def tagged_digits(n: int, first: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Digit ``i`` is a 28x28 block of value ``first + i`` (≤ 255); its label is that value mod 10."""
    ids = np.arange(first, first + n, dtype=np.uint8)
    return np.repeat(ids, 28 * 28).reshape(n, 28, 28), ids % 10


def mnist_root(tmp_path: Path, n_test: int = 200, n_train: int | None = None) -> Path:
    root = tmp_path / "data"
    write_idx(root / "mnist/t10k-images-idx3-ubyte.gz", tagged_digits(n_test)[0])
    write_idx(root / "mnist/t10k-labels-idx1-ubyte.gz", tagged_digits(n_test)[1])
    if n_train:
        write_idx(root / "mnist/train-images-idx3-ubyte.gz", tagged_digits(n_train, first=n_test + 1)[0])
        write_idx(root / "mnist/train-labels-idx1-ubyte.gz", tagged_digits(n_train, first=n_test + 1)[1])
    return root


# ------------------------------------------------------------------ IDX reader


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    out = read_idx(write_idx(tmp_path / "x.idx", images, compress), ndim=3)
    assert out.dtype == np.uint8 and (out == images).all()


def test_bad_magic_names_file(tmp_path):
    path = tmp_path / "corrupt-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x03" + bytes(100))
    with pytest.raises(IDXError, match=r"corrupt-images-idx3-ubyte: bad IDX magic number 12340803"):
        read_idx(path)


def test_truncated_and_wrong_ndim_and_bad_gzip(tmp_path):
    path = write_idx(tmp_path / "short.gz", np.zeros((4, 28, 28), np.uint8))
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))
    with pytest.raises(IDXError, match=r"short\.gz: header announces shape \(4, 28, 28\) \(3136 data bytes\).*3131"):
        read_idx(path)
    labels = write_idx(tmp_path / "labels.gz", np.zeros(4, np.uint8))
    with pytest.raises(IDXError, match=r"labels\.gz: IDX file of 1 dimensions, expected 3"):
        read_idx(labels, ndim=3)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(bytes(64))[:20])
    with pytest.raises(IDXError, match=r"broken\.gz: corrupt gzip stream"):
        read_idx(broken)


def test_pair_mismatch_and_label_range(tmp_path):
    images = write_idx(tmp_path / "i.gz", np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(IDXError, match=r"i\.gz holds 3 images but .*l\.gz holds 2 labels"):
        read_mnist(images, write_idx(tmp_path / "l.gz", np.zeros(2, np.uint8)))
    with pytest.raises(IDXError, match=r"m\.gz: label 12 outside 0\.\.9"):
        read_mnist(images, write_idx(tmp_path / "m.gz", np.array([1, 12, 3], np.uint8)))


# ------------------------------------------------------------------ construction


def test_overlay_matches_reference_canvas():
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, (6, 28, 28)).astype(np.uint8)
    ds = overlay_pairs(digits, np.arange(6) % 10, np.random.default_rng(1))
    partner = np.random.default_rng(1).integers(6, size=6)
    for i in range(6):
        canvas = np.zeros((36, 36), np.uint8)  # Sener & Koltun's loader, written out
        canvas[0:28, 0:28] = digits[i]
        canvas[6:34, 6:34] = digits[partner[i]]
        canvas[6:28, 6:28] = np.maximum(digits[i][6:28, 6:28], digits[partner[i]][0:22, 0:22])
        expected = np.asarray(Image.fromarray(canvas).resize((28, 28), Image.Resampling.NEAREST))
        x, targets = ds[i]
        assert x.shape == (1, 28, 28) and (x[0].numpy() == expected).all()
        assert (int(targets["left"]), int(targets["right"])) == (i % 10, partner[i] % 10)


def ids(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """Left and right digit ids of tagged MultiMNIST images: pixel (0, 0) comes from the left digit only,
    pixel (25, 25) (canvas pixel 32) from the right digit only."""
    return x[:, 0, 0, 0].tolist(), x[:, 0, 25, 25].tolist()


def test_fallback_split_warns_and_keeps_digits_apart(tmp_path):
    dm = MultiMNIST(root=str(mnist_root(tmp_path)), val_fraction=0.1, test_fraction=0.2, batch_size=32)
    dm.prepare_data()
    with pytest.warns(UserWarning, match=r"missing .*train-images-idx3-ubyte\.gz.*splitting .*t10k-images"):
        dm.setup("fit")
    assert dm.tasks == ["left", "right"] and dm.num_classes == {"left": 10, "right": 10}
    used = {}
    for split, n in (("train", 140), ("val", 20), ("test", 40)):
        ds = getattr(dm.splits, split)
        assert len(ds) == n and "t10k-images-idx3-ubyte.gz" in dm.sources[split]
        left, right = ids(ds.x)
        assert set(right) <= set(left), "partners come from the same split"
        assert (ds.targets["left"] == torch.tensor(left) % 10).all()
        assert (ds.targets["right"] == torch.tensor(right) % 10).all()
        used[split] = set(left)
    assert not (used["train"] & used["val"] or used["train"] & used["test"] or used["val"] & used["test"])
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, MultiTaskBatch) and batch.x.shape == (32, 1, 28, 28)
    assert set(batch.targets) == {"left", "right"}


def test_training_pair_used_when_present(tmp_path, recwarn):
    dm = MultiMNIST(root=str(mnist_root(tmp_path, n_test=30, n_train=50)), val_fraction=0.2)
    dm.setup()
    assert not [w for w in recwarn if "MultiMNIST" in str(w.message)]
    assert (len(dm.splits.train), len(dm.splits.val), len(dm.splits.test)) == (40, 10, 30)
    assert "train-images" in dm.sources["train"] and "train-images" in dm.sources["val"]
    assert "t10k-images" in dm.sources["test"] and min(ids(dm.splits.train.x)[0]) > 30


def test_missing_test_pair_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing: .*nowhere/mnist/t10k-images-idx3-ubyte\.gz"):
        MultiMNIST(root=str(tmp_path / "nowhere")).prepare_data()


# ------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    """The real data folder holding mnist/t10k-*: $LIGHTNING_MTL_DATA, else ../shared/data."""
    for candidate in (os.environ.get("LIGHTNING_MTL_DATA"), Path(__file__).resolve().parents[3] / "shared" / "data"):
        if candidate and (Path(candidate) / "mnist" / "t10k-images-idx3-ubyte.gz").exists():
            return Path(candidate)
    pytest.skip("real MNIST t10k files absent: set LIGHTNING_MTL_DATA to a folder holding mnist/t10k-*-ubyte.gz")


def real(root: Path) -> MultiMNIST:
    dm = MultiMNIST(root=str(root))
    dm.prepare_data()
    with pytest.warns(UserWarning, match="train-images-idx3-ubyte.gz"):
        dm.setup()
    return dm


def test_real_t10k_multimnist(mnist_dir):
    dm = real(mnist_dir)
    assert (len(dm.splits.train), len(dm.splits.val), len(dm.splits.test)) == (7000, 1000, 2000)
    x = dm.splits.train.x
    assert x.shape == (7000, 1, 28, 28) and x.dtype == torch.uint8 and 0.1 < (x > 127).float().mean() < 0.4
    for split in ("train", "val", "test"):
        targets = getattr(dm.splits, split).targets
        assert all(int(y.min()) == 0 and int(y.max()) == 9 for y in targets.values())
    again = real(mnist_dir)
    assert torch.equal(again.splits.test.x, dm.splits.test.x)
    assert all(torch.equal(again.splits.test.targets[t], dm.splits.test.targets[t]) for t in ("left", "right"))
