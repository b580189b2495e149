"""MultiMNIST: two overlaid MNIST digits; tasks ``left`` (top-left digit) and ``right`` (bottom-right digit).

Construction of Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
(arXiv:1810.04650), after Sabour et al. (NeurIPS 2017), as in their released loader: for every digit ``i`` of a set a
partner ``j`` is drawn uniformly from the same set; on a 36x36 canvas ``i`` fills ``[0:28, 0:28]`` and ``j`` fills
``[6:34, 6:34]``, the overlap keeping the maximum; the canvas is resized to 28x28 by nearest neighbour (source pixel
``floor((k + 0.5) * 36 / 28)``, PIL's rule). Labels: ``left`` = label of ``i``, ``right`` = label of ``j``; one image
per source digit. Departure: partners come from ``split_seed`` (the released code used NumPy's global state).

Sources are IDX files (gzip or raw) relative to the data root. With a training pair, it is split into train / val
(``val_fraction``) and the test pair is the test set (``test_fraction`` unused). Without one (the offline data holds
only the t10k images), the test pair is split into train / val / test (``1 - val_fraction - test_fraction`` /
``val_fraction`` / ``test_fraction``), a warning names the missing files and :attr:`MultiMNIST.sources` records which
files built each split. Digits are split before pairing, so no MNIST digit appears in two splits.
"""

from __future__ import annotations

import gzip
import math
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_mtl.datamodules._paths import resolve_data_root
from lightning_mtl.datamodules.multitask import MultiTargetDataset, MultiTaskDataModule, TaskSplits

_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IDXError(ValueError):
    """An IDX file is malformed; the message names the file."""


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzip-compressed or raw.

    Args:
        path: the file.
        ndim: expected number of dimensions (3 for images, 1 for labels); ``None`` accepts any.

    Raises:
        FileNotFoundError: no such file.
        IDXError: bad gzip stream, magic number, dimension count or size.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise IDXError(f"{path}: corrupt gzip stream ({e}); replace the file.") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise IDXError(
            f"{path}: bad IDX magic number {raw[:4].hex() or 'none'}; expected 0000 <type> <ndim> "
            f"(00000803 for MNIST images, 00000801 for labels). Is this an IDX file?"
        )
    if ndim is not None and raw[3] != ndim:
        raise IDXError(f"{path}: IDX file of {raw[3]} dimensions, expected {ndim}; check the path (MNIST images have 3 "
                       f"dimensions, labels 1: are images and labels swapped?).")
    header = 4 + 4 * raw[3]
    if len(raw) < header:
        raise IDXError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header}); replace the file.")
    shape = struct.unpack(f">{raw[3]}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    if len(raw) - header != math.prod(shape) * dtype.itemsize:
        raise IDXError(
            f"{path}: header announces shape {shape} ({math.prod(shape) * dtype.itemsize} data bytes) but the file "
            f"holds {len(raw) - header}; it is truncated or corrupt."
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_mnist(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(N, H, W)`` uint8 images and ``(N,)`` int64 labels in 0..9 from an IDX pair, checked against each other."""
    x, y = read_idx(images, ndim=3), read_idx(labels, ndim=1)
    if x.dtype != np.uint8 or y.dtype != np.uint8:
        raise IDXError(f"{images} / {labels}: expected unsigned-byte IDX data, got {x.dtype} / {y.dtype}.")
    if len(x) != len(y):
        raise IDXError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels; they are not a pair: pass "
                       f"the label file of these images.")
    if y.max(initial=0) > 9:
        raise IDXError(f"{labels}: label {y.max()} outside 0..9; is this an MNIST label file?")
    return x, y.astype(np.int64)


def overlay_pairs(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> MultiTargetDataset:
    """MultiMNIST images ``(N, 1, 28, 28)`` uint8 with ``left`` / ``right`` labels, one per digit of ``images``."""
    partner = rng.integers(len(images), size=len(images))
    canvas = np.zeros((len(images), 36, 36), np.uint8)
    canvas[:, :28, :28] = images
    canvas[:, 6:34, 6:34] = np.maximum(canvas[:, 6:34, 6:34], images[partner])
    k = ((np.arange(28) + 0.5) * 36 / 28).astype(int)  # nearest neighbour, as PIL's NEAREST
    x = torch.from_numpy(np.ascontiguousarray(canvas[:, k[:, None], k[None, :]])).unsqueeze(1)
    return MultiTargetDataset(x, {"left": torch.from_numpy(labels), "right": torch.from_numpy(labels[partner])})


class MultiMNIST(MultiTaskDataModule):
    """MultiMNIST: one dataset whose samples are ``(uint8 image (1, 28, 28), {"left": y, "right": y})``.

    Args:
        root: data root the IDX paths are relative to; ``None`` → ``$LIGHTNING_MTL_DATA`` → ``./data``.
        train_images: IDX images of the training source; ``None`` or a missing file → split the test source.
        train_labels: IDX labels of the training source.
        test_images: IDX images of the test source.
        test_labels: IDX labels of the test source.
        val_fraction: share of the training source (or of the test source, without one) kept for validation.
        test_fraction: share of the test source kept for testing when it is split (no training source).
        split_seed: seed of the splits and of the partner draws; keep it fixed to compare models.
        batch_size: training images per step.
        eval_batch_size: validation / test batch size; ``None`` → ``batch_size``.
        num_workers: dataloader worker processes.
        seed: seed of the training shuffles.

    Attributes:
        sources: after :meth:`setup`, which files and share built each split (also logged).
    """

    def __init__(
        self,
        root: str | None = None,
        train_images: str | None = "mnist/train-images-idx3-ubyte.gz",
        train_labels: str | None = "mnist/train-labels-idx1-ubyte.gz",
        test_images: str = "mnist/t10k-images-idx3-ubyte.gz",
        test_labels: str = "mnist/t10k-labels-idx1-ubyte.gz",
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers=num_workers, seed=seed)
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1) or split_seed < 0:
            raise ValueError(
                f"need 0 < val_fraction, 0 < test_fraction, val_fraction + test_fraction < 1 and split_seed >= 0; "
                f"got {val_fraction}, {test_fraction}, {split_seed}"
            )
        self.save_hyperparameters()
        self.root = resolve_data_root(root)
        self.sources: dict[str, str] = {}

    def _pair(self, images: str | None, labels: str | None) -> tuple[Path, Path] | None:
        return None if images is None or labels is None else (self.root / images, self.root / labels)

    def _test_pair(self) -> tuple[Path, Path]:
        pair = self._pair(self.hparams.test_images, self.hparams.test_labels)
        missing = [str(p) for p in pair if not p.exists()]
        if missing:
            raise FileNotFoundError(f"MultiMNIST needs the test IDX pair; missing: {', '.join(missing)}. Place the "
                                    f"MNIST t10k files there, or pass --data.root / --data.test_images / "
                                    f"--data.test_labels.")
        return pair

    def prepare_data(self) -> None:
        self._test_pair()

    def build_splits(self) -> TaskSplits:
        hp, test_pair = self.hparams, self._test_pair()
        train_pair = self._pair(hp.train_images, hp.train_labels)
        missing = [str(p) for p in train_pair or () if not p.exists()]
        rng = np.random.default_rng([hp.split_seed, 0])
        if train_pair is not None and not missing:
            train_x, train_y = read_mnist(*train_pair)
            order = rng.permutation(len(train_x))
            n_val = round(hp.val_fraction * len(order))
            parts = {"train": (train_x, train_y, order[n_val:]), "val": (train_x, train_y, order[:n_val])}
            parts["test"] = (*read_mnist(*test_pair), None)
            names = {"train": train_pair, "val": train_pair, "test": test_pair}
        else:
            reason = f"missing {', '.join(missing)}" if missing else "no training pair given"
            warnings.warn(
                f"MultiMNIST: {reason}; splitting {test_pair[0]} + {test_pair[1]} into train / val / test "
                f"(split_seed={hp.split_seed}); results are not comparable to the standard 60k/10k protocol.",
                stacklevel=1,
            )
            x, y = read_mnist(*test_pair)
            order = rng.permutation(len(x))
            n_val, n_test = round(hp.val_fraction * len(x)), round(hp.test_fraction * len(x))
            splits = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
            parts = {s: (x, y, idx) for s, idx in splits.items()}
            names = dict.fromkeys(parts, test_pair)
        data = {}
        for i, split in enumerate(("train", "val", "test")):
            x, y, idx = parts[split]
            x, y = (x, y) if idx is None else (x[idx], y[idx])
            data[split] = overlay_pairs(x, y, np.random.default_rng([hp.split_seed, 1 + i]))
            self.sources[split] = f"{names[split][0]} + {names[split][1]}: {len(y)} digits"
        rank_zero_info("MultiMNIST sources: " + "; ".join(f"{s} from {d}" for s, d in self.sources.items()))
        return TaskSplits({"left": 10, "right": 10}, data["train"], data["val"], data["test"])
