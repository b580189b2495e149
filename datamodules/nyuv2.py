"""NYUv2 and Cityscapes for dense multi-task learning, in the preprocessed ``.npy`` layout of the MTAN line of work.

The layout is the one of Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019
(arXiv:1803.10704, ``lorenmt/mtan`` ``im2im_pred/create_dataset.py``), also read by LibMTL (Lin & Zhang, JMLR 2023,
arXiv:2203.14338, ``examples/nyu``, ``examples/cityscapes``), CAGrad (Liu et al., NeurIPS 2021, arXiv:2110.14048),
Nash-MTL (Navon et al., ICML 2022, arXiv:2202.01017, ``experiments/nyuv2/data.py``) and FAMO (Liu et al., NeurIPS
2023, arXiv:2306.03792, ``experiments/cityscapes/data.py``)::

    <root>/nyuv2/{train,val}/image/<i>.npy    float (H, W, 3)              288 x 384; 795 train, 654 val
                            /label/<i>.npy    (H, W), classes 0..12, -1 = no label
                            /depth/<i>.npy    float (H, W, 1), 0 = no depth
                            /normal/<i>.npy   float (H, W, 3), (0, 0, 0) = no normal
    <root>/cityscapes/{train,val}/image, label_7, depth    128 x 256; 2975 train, 500 val; 7 classes

Those codes move the channel axis first (``np.moveaxis(x, -1, 0)``) and cast every array to float; so do we, except
that labels become int64 (what :class:`~lightning_mtl.mtl.tasks.SegmentationTask` reads). Their Cityscapes loaders
read ``label_7`` (CAGrad, FAMO) or ``label`` (LibMTL's own preprocessing); ``label_dir`` chooses.

**Splits.** Those codes train on ``train/`` and evaluate every epoch on ``val/``, which is the test set: the papers'
tables are ``val/`` numbers. Here ``val/`` is always the test split. Validation (what the checkpoint monitor reads):

* ``val_fraction=0`` (default, what the MTAN / Nash-MTL / FAMO codes do): validation *is* the test split, all of
  ``train/`` is used for training, and a warning says so at every setup: picking a checkpoint or hyper-parameters by
  ``val/`` metrics is then selection on the test set. Report the last checkpoint (``--ckpt_path last``), as those
  papers report the end of training.
* ``val_fraction > 0``: a held-out share of ``train/`` chosen by ``split_seed`` (LibMTL's newest NYUv2 example holds
  out part of the 795 training images in the same way, with a fixed index list, ``data_split.json``); results
  then come from fewer training images than the published tables.

**Augmentation** (training only; ``augment=True``, the default of the Nash-MTL and FAMO code; MTAN's paper trained
without it). As in those codes (after ``lorenmt/mtan`` issue 34): a scale ``s`` drawn uniformly from ``scales``
(1, 1.2, 1.5), a crop of ``int(H / s) x int(W / s)`` at a uniform position, resized back to ``H x W`` (image and
normals bilinear with ``align_corners=True``, labels and depth nearest), depth divided by ``s`` (the scene seen
closer); then, with probability 1/2, a horizontal flip of everything, negating the normals' x component. The same
crop and flip apply to the image and every target. Differences:

* Randomness: the references draw from Python's and torch's global generators (so worker processes and restarts
  change it); here each sample's draws come from a ``torch.Generator`` seeded by ``(seed, epoch, sample index)``, so
  an epoch's augmentation is reproducible and independent of ``num_workers`` and of the order of loading.
* With ``s = 1`` the references still resize the (full-size) crop onto itself, an identity; we skip it.
* Bilinear resizing shortens normals and blends a valid normal with a neighbouring (0, 0, 0); we keep that, as the
  references do. :class:`~lightning_mtl.mtl.tasks.NormalTask`'s loss and metrics are cosines and angles, blind to
  length, so only pixels at the border of a region without normals differ from a renormalised version.

Files are validated in :meth:`setup` before training (folders, index sets, ``.npy`` headers: shape, dtype, size;
never the values, so it reads no pixel data) and read lazily, one memory-mapped sample at a time, with
``np.load(allow_pickle=False)``: a pickled array is refused, never run.
"""

from __future__ import annotations

import math
import re
import warnings
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from lightning_mtl.datamodules._paths import DATA_ENV, resolve_data_root
from lightning_mtl.datamodules.multitask import MultiTaskDataModule, TaskSplits
from lightning_mtl.mtl.tasks import DepthTask, NormalTask, SegmentationTask, Task

SCALES = (1.0, 1.2, 1.5)
_AUGMENTATION_STREAM = 0x61756700  # keeps augmentation seeds apart from the shuffles' (seed, stream, epoch, pass)
_INDEX_NAME = re.compile(r"(0|[1-9][0-9]*)\.npy")


class DenseLayoutError(ValueError):
    """The data folder does not have the expected layout; the message names the file or folder and the fix."""


@dataclass(frozen=True)
class ArraySpec:
    """What one ``.npy`` file of a folder must hold.

    Attributes:
        folder: folder name under ``<split>/``.
        channels: size of the last axis (``(H, W, channels)``), or ``None`` for ``(H, W)`` arrays.
        integer_ok: integer dtypes are accepted besides floating point (labels).
        meaning: what the array is, for error messages.
    """

    folder: str
    channels: int | None
    integer_ok: bool
    meaning: str

    def expected(self, size: tuple[int, int]) -> str:
        shape = (*size, self.channels) if self.channels is not None else size
        kinds = "a float or integer" if self.integer_ok else "a float"
        return f"{kinds} array of shape {shape} ({self.meaning})"


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file from its header alone (no data is read).

    Raises:
        DenseLayoutError: not a ``.npy`` file, an unsupported version, or a file shorter than its header announces.
    """
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as e:
            raise DenseLayoutError(f"{path}: not a readable .npy file ({e}); replace it with an array saved by "
                                   f"numpy.save.") from e
        data_start = f.tell()
    if not dtype.hasobject:
        need = data_start + math.prod(shape) * dtype.itemsize
        have = path.stat().st_size
        if have < need:
            raise DenseLayoutError(f"{path}: truncated: its header announces {shape} {dtype} ({need} bytes) but the "
                                   f"file has {have} bytes; copy it again.")
    return tuple(shape), dtype


def check_array(path: Path, spec: ArraySpec, size: tuple[int, int]) -> None:
    """Check one file's header against ``spec`` and the spatial ``size``.

    Raises:
        DenseLayoutError: naming the file, what it holds and what it should hold.
    """
    shape, dtype = read_npy_header(path)
    if dtype.hasobject:
        raise DenseLayoutError(f"{path}: holds Python objects (a pickled array), which are never loaded "
                               f"(allow_pickle=False); save {spec.expected(size)} with numpy.save.")
    kind_ok = np.issubdtype(dtype, np.floating) or (spec.integer_ok and np.issubdtype(dtype, np.integer))
    expected = (*size, spec.channels) if spec.channels is not None else tuple(size)
    if not kind_ok or shape != expected:
        hint = ""
        if not kind_ok:
            hint = f" Save it as float32{' or int64' if spec.integer_ok else ''}."
        elif spec.channels is not None and shape == (spec.channels, *size):
            hint = " Its channel axis is first: save it last, (H, W, C), as the preprocessed data do."
        elif spec.channels is not None and shape == tuple(size):
            hint = f" Add the channel axis: numpy.save(path, array[..., None]) gives (H, W, {spec.channels})."
        elif tuple(shape[:2]) != tuple(size):
            hint = (f" Its spatial size is not size={tuple(size)}: use the preprocessed data, or set the datamodule's "
                    f"size to the size your data were preprocessed at.")
        raise DenseLayoutError(f"{path}: a {dtype} array of shape {shape}; expected {spec.expected(size)}.{hint}")


def scan_split(split_dir: Path, specs: Sequence[ArraySpec], size: tuple[int, int]) -> list[int]:
    """The sorted sample indices of one split folder, after checking every file of every folder in ``specs``.

    Raises:
        DenseLayoutError: a missing or empty folder, a file not named ``<i>.npy``, folders holding different index
            sets, or a file whose header does not match its spec.
    """
    missing = [spec.folder for spec in specs if not (split_dir / spec.folder).is_dir()]
    if missing:
        raise DenseLayoutError(
            f"{split_dir}: missing folder(s) {', '.join(missing)}; it must hold "
            + ", ".join(f"{s.folder}/<i>.npy ({s.expected(size)})" for s in specs) + ".")
    indices: dict[str, set[int]] = {}
    for spec in specs:
        folder, found = split_dir / spec.folder, set()
        for path in folder.glob("*.npy"):
            if not _INDEX_NAME.fullmatch(path.name):
                raise DenseLayoutError(f"{path}: files must be named <i>.npy with a sample index i = 0, 1, 2, ... "
                                       f"(no leading zeros); rename or remove it.")
            found.add(int(path.stem))
        if not found:
            raise DenseLayoutError(f"{folder}: no <i>.npy files; it must hold one {spec.expected(size)} per sample.")
        indices[spec.folder] = found
    reference, ref_set = specs[0].folder, indices[specs[0].folder]
    for folder, found in indices.items():
        if found != ref_set:
            lacks, extra = sorted(ref_set - found), sorted(found - ref_set)
            parts = []
            if lacks:
                parts.append(f"lacks {_some(lacks)} (present in {reference}/)")
            if extra:
                parts.append(f"has {_some(extra)} that {reference}/ lacks")
            raise DenseLayoutError(f"{split_dir / folder}: {' and '.join(parts)}; every folder of {split_dir} must "
                                   f"hold the same samples <i>.npy. Copy the missing files or remove the extra ones.")
    for spec in specs:
        for i in sorted(ref_set):
            check_array(split_dir / spec.folder / f"{i}.npy", spec, size)
    return sorted(ref_set)


def _some(indices: list[int], shown: int = 5) -> str:
    names = ", ".join(f"{i}.npy" for i in indices[:shown])
    return names + (f" and {len(indices) - shown} more" if len(indices) > shown else "")


# ------------------------------------------------------------------ augmentation


@dataclass(frozen=True)
class Augmentation:
    """One sample's random scale crop and flip (see the module docstring).

    Attributes:
        scale: the zoom ``s`` (the crop is ``int(H / s) x int(W / s)``; depth is divided by ``s``).
        top: the crop's first row.
        left: the crop's first column.
        flip: whether the sample is flipped horizontally after the crop.
    """

    scale: float
    top: int
    left: int
    flip: bool


def augmentation_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of sample ``index``'s augmentation in ``epoch``: a pure function of its arguments."""
    state = np.random.SeedSequence([seed, _AUGMENTATION_STREAM, epoch, index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def draw_augmentation(height: int, width: int, scales: Sequence[float], generator: torch.Generator) -> Augmentation:
    """Draw a scale uniformly from ``scales``, a uniform crop position and a fair flip from ``generator``."""
    scale = float(scales[int(torch.randint(len(scales), (1,), generator=generator))])
    h, w = int(height / scale), int(width / scale)
    top = int(torch.randint(height - h + 1, (1,), generator=generator))
    left = int(torch.randint(width - w + 1, (1,), generator=generator))
    flip = bool(torch.rand(1, generator=generator) < 0.5)
    return Augmentation(scale, top, left, flip)


def apply_augmentation(
    image: Tensor, targets: dict[str, Tensor], aug: Augmentation
) -> tuple[Tensor, dict[str, Tensor]]:
    """Crop, resize back and flip ``image`` ``(3, H, W)`` and every target the same way.

    Targets, by task name: ``segmentation`` ``(H, W)`` labels (nearest), ``depth`` ``(1, H, W)`` (nearest, divided by
    the scale), ``normal`` ``(3, H, W)`` (bilinear; x negated on a flip).
    """
    height, width = image.shape[-2:]
    h, w = int(height / aug.scale), int(width / aug.scale)
    rows, cols = slice(aug.top, aug.top + h), slice(aug.left, aug.left + w)
    resize = (h, w) != (height, width)

    def crop(x: Tensor, mode: str) -> Tensor:  # (C, H, W) -> (C, H, W)
        x = x[:, rows, cols]
        if not resize:
            return x
        corners = {"align_corners": True} if mode == "bilinear" else {}
        return F.interpolate(x[None], size=(height, width), mode=mode, **corners)[0]

    out_image = crop(image, "bilinear")
    out: dict[str, Tensor] = {}
    for task, y in targets.items():
        if task == "segmentation":  # labels interpolate as floats (nearest keeps them exact), back to int64
            out[task] = crop(y[None].double(), "nearest")[0].to(y.dtype)
        elif task == "depth":
            out[task] = crop(y, "nearest") / aug.scale
        elif task == "normal":
            out[task] = crop(y, "bilinear")
        else:
            raise ValueError(f"no augmentation rule for task {task!r}; known: segmentation, depth, normal")
    if aug.flip:
        out_image = out_image.flip(-1)
        out = {task: y.flip(-1) for task, y in out.items()}
        if "normal" in out:
            out["normal"] = torch.cat([-out["normal"][:1], out["normal"][1:]])
    return out_image, out


# ------------------------------------------------------------------ dataset and sampler


class DenseSceneDataset(Dataset):
    """Samples ``(image (3, H, W) float32, {task: target})`` read lazily from ``<split_dir>/<folder>/<i>.npy``.

    Targets: ``segmentation`` ``(H, W)`` int64, ``depth`` ``(1, H, W)`` float32, ``normal`` ``(3, H, W)`` float32.
    An item is a sample position, or ``(position, epoch)`` (what :class:`EpochTagged` yields): with ``augment`` the
    latter is augmented by :func:`augmentation_generator` ``(seed, epoch, position)``; a bare position never is.

    Args:
        split_dir: the split folder (``<root>/nyuv2/train``).
        indices: file indices ``i`` of the samples, in sample order.
        folders: task name → folder of its targets (the images are in ``image/``).
        augment: augment ``(position, epoch)`` items.
        scales: the scales of the random crop.
        seed: seed of the augmentation.
    """

    def __init__(self, split_dir: Path, indices: Sequence[int], folders: dict[str, str], augment: bool = False,
                 scales: Sequence[float] = SCALES, seed: int = 0) -> None:
        self.split_dir, self.indices, self.folders = Path(split_dir), list(indices), dict(folders)
        self.augment, self.scales, self.seed = augment, tuple(scales), seed

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, folder: str, i: int) -> np.ndarray:
        # memory-mapped: only this sample's bytes are read; the copy below detaches it from the file
        return np.load(self.split_dir / folder / f"{i}.npy", mmap_mode="r", allow_pickle=False)

    def raw(self, position: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Sample ``position`` as stored, channels first, without augmentation."""
        i = self.indices[position]
        image = torch.from_numpy(np.array(self._load("image", i), dtype=np.float32).transpose(2, 0, 1).copy())
        targets = {}
        for task, folder in self.folders.items():
            array = self._load(folder, i)
            if task == "segmentation":
                targets[task] = torch.from_numpy(np.array(array, dtype=np.int64))  # (H, W); float -1.0 -> -1
            else:
                targets[task] = torch.from_numpy(np.array(array, dtype=np.float32).transpose(2, 0, 1).copy())
        return image, targets

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, dict[str, Tensor]]:
        position, epoch = (item, None) if isinstance(item, int | np.integer) else item
        image, targets = self.raw(int(position))
        if self.augment and epoch is not None:
            generator = augmentation_generator(self.seed, int(epoch), int(position))
            aug = draw_augmentation(image.shape[-2], image.shape[-1], self.scales, generator)
            image, targets = apply_augmentation(image, targets, aug)
        return image, targets


class EpochTagged(Sampler):
    """Yields ``(index, epoch)`` for each index of ``sampler``, the epoch read from ``sampler.epoch``.

    The sampler lives in the main process, where Lightning sets the epoch; workers receive it with every index, so
    an augmentation seeded by ``(seed, epoch, index)`` is right in any worker, persistent or not.
    """

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((int(i), epoch) for i in self.sampler)


# ------------------------------------------------------------------ datamodules


class _DenseScenes(MultiTaskDataModule):
    """What NYUv2 and Cityscapes share: layout checks, the split, the augmented training loader."""

    dataset_dir: str = ""
    expected_counts: tuple[int, int] = (0, 0)  # train, val samples of the published preprocessed data

    def __init__(self, root: str | None, augment: bool, scales: Sequence[float], val_fraction: float,
                 split_seed: int, size: Sequence[int], batch_size: int, eval_batch_size: int | None,
                 num_workers: int, seed: int) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers=num_workers, seed=seed)
        scales = tuple(float(s) for s in scales)
        if not scales or min(scales) < 1:
            raise ValueError(f"scales must be a non-empty list of zooms >= 1 (a crop cannot exceed the image), got "
                             f"{list(scales)}")
        if not 0 <= val_fraction < 1 or split_seed < 0:
            raise ValueError(f"need 0 <= val_fraction < 1 and split_seed >= 0, got {val_fraction} and {split_seed}")
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be (height, width) in pixels, got {size}")
        self.root = resolve_data_root(root)
        self.augment, self.scales, self.val_fraction, self.split_seed = augment, scales, val_fraction, split_seed
        self.size = size

    @abstractmethod
    def specs(self) -> dict[str, ArraySpec]:
        """Task name → the spec of its folder, in task order."""

    @abstractmethod
    def build_tasks(self) -> dict[str, Task]:
        """Task name → the task (head, loss, metrics) of each target, in task order."""

    @property
    def data_dir(self) -> Path:
        return self.root / self.dataset_dir

    def _layout(self) -> str:
        folders = ", ".join(s.folder for s in (IMAGE, *self.specs().values()))
        return (f"{self.data_dir}/{{train,val}}/{{{folders}}}/<i>.npy, {self.size[0]}x{self.size[1]} (the "
                f"preprocessed data of the MTAN / LibMTL / Nash-MTL codes)")

    def prepare_data(self) -> None:
        """Check that the data are there (they cannot be downloaded: the preprocessed files are shared by hand)."""
        missing = [str(self.data_dir / s) for s in ("train", "val") if not (self.data_dir / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{type(self).__name__}: missing {', '.join(missing)}. Place the preprocessed data as "
                f"{self._layout()}; the data root is --data.root, else ${DATA_ENV}, else ./data (now {self.root}).")

    def build_splits(self) -> TaskSplits:
        self.prepare_data()
        specs = self.specs()
        folders = {task: spec.folder for task, spec in specs.items()}
        train_idx = scan_split(self.data_dir / "train", [IMAGE, *specs.values()], self.size)
        test_idx = scan_split(self.data_dir / "val", [IMAGE, *specs.values()], self.size)
        name = type(self).__name__
        if (len(train_idx), len(test_idx)) != self.expected_counts:
            warnings.warn(f"{name}: {self.data_dir} holds {len(train_idx)} train / {len(test_idx)} val samples; the "
                          f"published preprocessed data hold {self.expected_counts[0]} / {self.expected_counts[1]}. "
                          f"Results are not comparable to the papers' tables.", stacklevel=1)
        test = DenseSceneDataset(self.data_dir / "val", test_idx, folders)
        if self.val_fraction == 0:
            warnings.warn(f"{name}: val_fraction=0, so validation runs on the test split ({self.data_dir / 'val'}), as "
                          f"the MTAN / Nash-MTL / FAMO codes do: val/ metrics are test metrics, and choosing a "
                          f"checkpoint or hyper-parameters by them is selection on the test set. Report --ckpt_path "
                          f"last, or set val_fraction > 0 to hold out part of train/.", stacklevel=1)
            train_part, val = train_idx, DenseSceneDataset(self.data_dir / "val", test_idx, folders)
        else:
            order = np.random.default_rng(self.split_seed).permutation(len(train_idx))
            n_val = max(1, round(self.val_fraction * len(train_idx)))
            val_idx = sorted(train_idx[k] for k in order[:n_val])
            train_part = sorted(train_idx[k] for k in order[n_val:])
            val = DenseSceneDataset(self.data_dir / "train", val_idx, folders)
        train = DenseSceneDataset(self.data_dir / "train", train_part, folders, self.augment, self.scales, self.seed)
        rank_zero_info(f"{name}: {len(train)} train / {len(val)} val / {len(test)} test samples from {self.data_dir}"
                       f" (augment={self.augment})")
        # values predicted per pixel: classes of the segmentation, 1 for depth, 3 for normals
        channels = {task: t.out_channels for task, t in self.build_tasks().items()}
        return TaskSplits(channels, train, val, test)

    def train_sampler(self, ds: Dataset, stream: int, epoch: int, passes: int) -> Sampler:
        sampler = super().train_sampler(ds, stream, epoch, passes)
        # augmented samples need the epoch in the worker: the shuffle hands each index over with it (EpochTagged)
        return EpochTagged(sampler) if isinstance(ds, DenseSceneDataset) and ds.augment else sampler


IMAGE = ArraySpec("image", 3, integer_ok=False, meaning="RGB image, channels last")


class NYUv2(_DenseScenes):
    """NYUv2 (Silberman et al., ECCV 2012) with MTAN's 13-class labels, depth and surface normals at 288x384.

    One dataset for all tasks: samples ``(float32 image (3, H, W), {"segmentation": (H, W) int64 (-1: no label),
    "depth": (1, H, W) float32 (0: no depth), "normal": (3, H, W) float32})``. Layout, splits and augmentation: see
    the module docstring. :meth:`build_tasks` gives the matching tasks.

    Args:
        root: data root holding ``nyuv2/``; ``None`` → ``$LIGHTNING_MTL_DATA`` → ``./data``.
        augment: random scale crop and horizontal flip of training samples (Nash-MTL / FAMO protocol).
        scales: the zooms drawn from, each >= 1.
        val_fraction: share of ``train/`` held out for validation; 0 validates on the test split (``val/``), as the
            reference codes do (a warning says so).
        split_seed: seed of the held-out share.
        size: ``(height, width)`` every array must have. The preprocessed data are 288x384; set another size only for
            data preprocessed at that size (the tests use small fixtures). Arrays are checked, never resized.
        batch_size: training samples per step (2 in the published protocol).
        eval_batch_size: validation / test batch size; ``None`` → ``batch_size``.
        num_workers: dataloader worker processes.
        seed: seed of the training shuffle and of the augmentation.

    Raises:
        ValueError: a scale below 1, ``val_fraction`` outside [0, 1), or a bad ``size``.
    """

    dataset_dir = "nyuv2"
    expected_counts = (795, 654)
    num_classes_segmentation = 13

    def __init__(
        self,
        root: str | None = None,
        augment: bool = True,
        scales: tuple[float, ...] = SCALES,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        size: tuple[int, int] = (288, 384),
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(root, augment, scales, val_fraction, split_seed, size, batch_size, eval_batch_size,
                         num_workers, seed)
        self.save_hyperparameters()

    def specs(self) -> dict[str, ArraySpec]:
        return {"segmentation": ArraySpec("label", None, integer_ok=True, meaning="classes 0..12, -1 = no label"),
                "depth": ArraySpec("depth", 1, integer_ok=False, meaning="depth, 0 = none"),
                "normal": ArraySpec("normal", 3, integer_ok=False, meaning="surface normal, (0, 0, 0) = none")}

    def build_tasks(self) -> dict[str, Task]:
        """``segmentation`` (13 classes, -1 ignored), ``depth`` and ``normal`` tasks."""
        return {"segmentation": SegmentationTask(self.num_classes_segmentation, ignore_index=-1),
                "depth": DepthTask(), "normal": NormalTask()}


class Cityscapes(_DenseScenes):
    """Cityscapes (Cordts et al., CVPR 2016) at 128x256 with 7-class labels and depth, as preprocessed for MTAN.

    One dataset for all tasks: samples ``(float32 image (3, H, W), {"segmentation": (H, W) int64 (-1: no label),
    "depth": (1, H, W) float32 (0: no depth)})``. Layout, splits and augmentation: see the module docstring.

    Args:
        root: data root holding ``cityscapes/``; ``None`` → ``$LIGHTNING_MTL_DATA`` → ``./data``.
        label_dir: folder of the labels: ``label_7`` (CAGrad, FAMO), or ``label`` (LibMTL's copy).
        num_classes: classes of those labels (7 for ``label_7``).
        augment: random scale crop and horizontal flip of training samples (FAMO's default).
        scales: the zooms drawn from, each >= 1.
        val_fraction: share of ``train/`` held out for validation; 0 validates on the test split (``val/``).
        split_seed: seed of the held-out share.
        size: ``(height, width)`` every array must have (128x256 preprocessed; others only for data preprocessed so).
        batch_size: training samples per step (8 in FAMO's Cityscapes code).
        eval_batch_size: validation / test batch size; ``None`` → ``batch_size``.
        num_workers: dataloader worker processes.
        seed: seed of the training shuffle and of the augmentation.

    Raises:
        ValueError: fewer than 2 classes, a scale below 1, ``val_fraction`` outside [0, 1), or a bad ``size``.
    """

    dataset_dir = "cityscapes"
    expected_counts = (2975, 500)

    def __init__(
        self,
        root: str | None = None,
        label_dir: str = "label_7",
        num_classes: int = 7,
        augment: bool = True,
        scales: tuple[float, ...] = SCALES,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        size: tuple[int, int] = (128, 256),
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(root, augment, scales, val_fraction, split_seed, size, batch_size, eval_batch_size,
                         num_workers, seed)
        if num_classes < 2:
            raise ValueError(f"Cityscapes segmentation needs num_classes >= 2, got {num_classes}")
        self.label_dir, self.num_classes_segmentation = label_dir, num_classes
        self.save_hyperparameters()

    def specs(self) -> dict[str, ArraySpec]:
        labels = f"classes 0..{self.num_classes_segmentation - 1}, -1 = no label"
        return {"segmentation": ArraySpec(self.label_dir, None, integer_ok=True, meaning=labels),
                "depth": ArraySpec("depth", 1, integer_ok=False, meaning="depth, 0 = none")}

    def build_tasks(self) -> dict[str, Task]:
        """``segmentation`` (``num_classes``, -1 ignored) and ``depth`` tasks."""
        return {"segmentation": SegmentationTask(self.num_classes_segmentation, ignore_index=-1),
                "depth": DepthTask()}
