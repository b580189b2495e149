"""CelebA as 40 binary tasks: one per facial attribute, on the official train / val / test partition.

The benchmark of Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
(arXiv:1810.04650), on CelebA of Liu et al., "Deep Learning Face Attributes in the Wild", ICCV 2015: each of the 40
attributes of ``list_attr_celeba.txt`` is one binary classification task (two logits, cross-entropy, accuracy;
:meth:`CelebA.build_tasks`), and the split is ``list_eval_partition.txt`` (162,770 / 19,867 / 19,962 images).

Layout, under ``<root>/<path>`` (``path="celeba"`` by default, torchvision's folder name; the Google Drive folders
``Anno/``, ``Eval/`` and ``Img/`` of the official release are accepted too)::

    list_attr_celeba.txt       line 1: the image count; line 2: the 40 attribute names;
                               then one line per image: <file> <40 values, each 1 or -1>
    list_eval_partition.txt    one line per image: <file> <0 | 1 | 2>   (train / val / test)
    img_align_celeba/          the aligned and cropped JPEGs (000001.jpg ...), or
    img_align_celeba.zip       the official archive (read in place: members img_align_celeba/<file> or <file>)

The files are those torchvision's ``CelebA`` reads (whitespace-separated columns; -1 becomes 0). Unlike torchvision,
rows are matched by file name, not by position, and every malformed line is reported with its file and line number.
A folder is preferred to the zip when both exist (no decompression). Attribute rows of images absent from the
partition are not used.

Images (218x178 JPEGs) are decoded lazily per sample (:class:`~lightning_mtl.datamodules._lazy_images.LazyImages`)
and resized to ``image_size`` x ``image_size`` (default 64, the size of Sener & Koltun's ``configs.json``), as uint8
RGB; the model scales them to [0, 1]. Departure from their loader (``multi_task/loaders/celeba_loader.py``): it read
the PNG release, subtracted a per-channel mean and resized with ``scipy.misc.imresize``, whose byte scaling maps each
image's value range back onto 0..255 (a per-image min-max stretch, which undoes the mean subtraction); we resize the
JPEGs by Lanczos and keep the intensities. With ``cache_images`` the first images each process decodes stay in memory
(see :mod:`~lightning_mtl.datamodules._lazy_images`); at 64x64, all 202,599 take 2.5 GB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_mtl.datamodules._images import FileTree
from lightning_mtl.datamodules._lazy_images import LazyImages
from lightning_mtl.datamodules._paths import resolve_data_root
from lightning_mtl.datamodules.multitask import MultiTaskDataModule, TaskSplits
from lightning_mtl.mtl.tasks import ClassificationTask

NUM_ATTRIBUTES = 40
SPLITS = ("train", "val", "test")  # partition codes 0, 1, 2
OFFICIAL_SPLIT_SIZES = {"train": 162_770, "val": 19_867, "test": 19_962}
ATTRIBUTES_FILE, PARTITION_FILE, IMAGES = "list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba"
_LAYOUT = (
    f"<root>/celeba/{ATTRIBUTES_FILE}, <root>/celeba/{PARTITION_FILE} and <root>/celeba/{IMAGES}/ (a folder of "
    f"JPEGs) or <root>/celeba/{IMAGES}.zip; the official Anno/, Eval/ and Img/ subfolders are accepted too"
)


class CelebAFormatError(ValueError):
    """A CelebA annotation file is malformed; the message names the file and the line."""


def _lines(path: Path):
    """``(line number, fields)`` of the non-blank lines of ``path``."""
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as e:
        raise CelebAFormatError(f"{path}: not an ASCII text file ({e}); is it the CelebA annotation file?") from e
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield number, line.split()


def read_attributes(path: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """The attribute names and ``{file: (40,) int8 values in {0, 1}}`` of ``list_attr_celeba.txt``.

    Raises:
        CelebAFormatError: a missing or non-integer count, a header without 40 distinct names, a row without 40
            values, a value other than 1 or -1, a file listed twice, or a row count other than the announced one.
    """
    path = Path(path)
    lines = _lines(path)
    first = next(lines, None)
    if first is None or len(first[1]) != 1 or not first[1][0].isdigit():
        where = "it is empty" if first is None else f"line {first[0]} is {' '.join(first[1])!r}"
        raise CelebAFormatError(f"{path}: the first line must be the image count (one integer), but {where}; use "
                                f"the official {ATTRIBUTES_FILE}.")
    count = int(first[1][0])
    number, names = next(lines, (first[0] + 1, []))
    if len(names) != NUM_ATTRIBUTES or len(set(names)) != len(names):
        raise CelebAFormatError(f"{path}, line {number}: expected the {NUM_ATTRIBUTES} distinct attribute names, got "
                                f"{len(names)} ({len(set(names))} distinct); restore the header line of the official "
                                f"{ATTRIBUTES_FILE}.")
    rows: dict[str, list[str]] = {}
    for number, fields in lines:
        values = fields[1:]
        if len(values) != NUM_ATTRIBUTES:
            raise CelebAFormatError(f"{path}, line {number}: {fields[0]!r} has {len(values)} values, expected "
                                    f"<file> and {NUM_ATTRIBUTES} values of 1 or -1; fix or replace the file.")
        if not set(values) <= {"1", "-1"}:
            bad = next(v for v in values if v not in ("1", "-1"))
            raise CelebAFormatError(f"{path}, line {number}: value {bad!r} for {fields[0]!r}; attribute values must be "
                                    f"1 or -1; fix or replace the file.")
        if fields[0] in rows:
            raise CelebAFormatError(f"{path}, line {number}: {fields[0]!r} is listed twice; remove the duplicate.")
        rows[fields[0]] = values
    if len(rows) != count:
        raise CelebAFormatError(f"{path}: line 1 announces {count} images but the file lists {len(rows)}; the file is "
                                f"truncated or edited: replace it.")
    values = np.asarray(list(rows.values()), dtype=np.int8).reshape(len(rows), NUM_ATTRIBUTES)
    return names, dict(zip(rows, (values + 1) // 2, strict=True))  # -1 -> 0, 1 -> 1


def read_partition(path: str | Path) -> dict[str, int]:
    """``{file: 0 | 1 | 2}`` (train / val / test) of ``list_eval_partition.txt``.

    Raises:
        CelebAFormatError: a line other than ``<file> <0|1|2>``, a file listed twice, or no line at all.
    """
    path = Path(path)
    out: dict[str, int] = {}
    for number, fields in _lines(path):
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise CelebAFormatError(f"{path}, line {number}: expected '<file> <0|1|2>' (train / val / test), got "
                                    f"{' '.join(fields)!r}; fix or replace the file.")
        if fields[0] in out:
            raise CelebAFormatError(f"{path}, line {number}: {fields[0]!r} is listed twice; remove the duplicate.")
        out[fields[0]] = int(fields[1])
    if not out:
        raise CelebAFormatError(f"{path}: no partition lines; replace it with the official {PARTITION_FILE}.")
    return out


def _image_members(tree: FileTree) -> dict[str, str]:
    """``{file name: path in the source}`` of the images at the top of a folder, or of a zip (at its top or in its
    ``img_align_celeba/`` folder)."""
    out = {}
    for name in tree.files():
        folder, _, base = name.rpartition("/")
        if folder in ("", IMAGES):
            out[base] = name
    return out


class CelebA(MultiTaskDataModule):
    """CelebA attributes as tasks: one dataset of ``(uint8 image (3, S, S), {attribute: 0 or 1})`` per split.

    Tasks are named by attribute (``5_o_Clock_Shadow`` ... ``Young``, in the file's order); each is a two-class
    :class:`~lightning_mtl.mtl.tasks.ClassificationTask` (:meth:`build_tasks`), whose ``acc`` is higher-is-better.

    Args:
        root: data root; ``None`` → ``$LIGHTNING_MTL_DATA`` → ``./data``.
        path: the CelebA folder, relative to ``root`` (or absolute).
        image_size: side of the square images after resizing (Sener & Koltun: 64).
        attributes: attribute names to use as tasks, in this order; ``None`` → all 40.
        cache_images: decoded images each loader process keeps in memory (0: decode every access).
        batch_size: training images per step.
        eval_batch_size: validation / test batch size; ``None`` → ``batch_size``.
        num_workers: dataloader worker processes (decoding JPEGs is the bottleneck: use several).
        seed: seed of the training shuffles.

    Raises:
        ValueError: a non-positive ``image_size``, a negative ``cache_images``, or an empty or repeating
            ``attributes`` list.
    """

    def __init__(
        self,
        root: str | None = None,
        path: str = "celeba",
        image_size: int = 64,
        attributes: list[str] | None = None,
        cache_images: int = 0,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers=num_workers, seed=seed)
        if image_size <= 0 or cache_images < 0:
            raise ValueError(f"need image_size > 0 and cache_images >= 0, got {image_size} and {cache_images}")
        if attributes is not None and (not attributes or len(set(attributes)) != len(attributes)):
            raise ValueError(f"attributes must be None or a non-empty list without repeats, got {attributes}")
        self.save_hyperparameters()
        self.folder = resolve_data_root(root) / path

    def locate(self) -> tuple[Path, Path, Path]:
        """The attribute file, the partition file and the image folder or zip.

        Raises:
            FileNotFoundError: one is missing; the message names where it was looked for and the expected layout.
        """
        candidates = {
            ATTRIBUTES_FILE: [self.folder / ATTRIBUTES_FILE, self.folder / "Anno" / ATTRIBUTES_FILE],
            PARTITION_FILE: [self.folder / PARTITION_FILE, self.folder / "Eval" / PARTITION_FILE],
            IMAGES: [self.folder / IMAGES, self.folder / f"{IMAGES}.zip", self.folder / "Img" / IMAGES,
                     self.folder / "Img" / f"{IMAGES}.zip"],
        }
        found, missing = [], []
        for what, paths in candidates.items():
            # the annotation files and the zip are files, the image folder a folder
            hit = next((p for p in paths if (p.is_file() if p.suffix in (".txt", ".zip") else p.is_dir())), None)
            found.append(hit)
            if hit is None:
                missing.append(f"{what} (looked for {', '.join(map(str, paths))})")
        if missing:
            raise FileNotFoundError(f"CelebA: missing {'; '.join(missing)}. Download CelebA from "
                                    f"https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and place {_LAYOUT}; or pass "
                                    f"--data.root / --data.path (root: $LIGHTNING_MTL_DATA, else ./data).")
        return found[0], found[1], found[2]

    def prepare_data(self) -> None:
        self.locate()

    def build_splits(self) -> TaskSplits:
        attributes_file, partition_file, images = self.locate()
        names, attributes = read_attributes(attributes_file)
        partition = read_partition(partition_file)
        wanted = self.hparams.attributes or names
        unknown = [a for a in wanted if a not in names]
        if unknown:
            raise ValueError(f"unknown CelebA attributes {unknown}; valid names: {', '.join(names)}")
        unlabelled = [f for f in partition if f not in attributes]
        if unlabelled:
            raise CelebAFormatError(f"{partition_file}: {len(unlabelled)} images have no attribute row in "
                                    f"{attributes_file} (first: {', '.join(unlabelled[:3])}); use the annotation "
                                    f"files of one CelebA release.")
        with FileTree(images) as tree:
            members = _image_members(tree)
        absent = [f for f in partition if f not in members]
        if absent:
            raise FileNotFoundError(f"CelebA: {len(absent)} images of {partition_file} are missing from {images} "
                                    f"(first: {', '.join(absent[:3])}); the images are expected at {IMAGES}/<file> "
                                    f"(a folder, or members of {IMAGES}.zip): complete the download.")
        columns = [names.index(a) for a in wanted]
        data = {}
        for code, split in enumerate(SPLITS):
            files = [f for f, c in partition.items() if c == code]
            values = np.stack([attributes[f] for f in files]) if files else np.zeros((0, NUM_ATTRIBUTES), np.int8)
            targets = {a: torch.from_numpy(values[:, k].astype(np.int64)) for a, k in zip(wanted, columns, strict=True)}
            data[split] = LazyImages(images, [members[f] for f in files], targets, self.hparams.image_size,
                                     self.hparams.cache_images)
        sizes = {s: len(d) for s, d in data.items()}
        note = "" if sizes == OFFICIAL_SPLIT_SIZES else f" (official: {OFFICIAL_SPLIT_SIZES})"
        rank_zero_info(f"CelebA from {images}: split sizes {sizes}{note}; {len(wanted)} attribute tasks")
        return TaskSplits(dict.fromkeys(wanted, 2), data["train"], data["val"], data["test"])

    def build_tasks(self) -> dict[str, ClassificationTask]:
        """One two-class :class:`~lightning_mtl.mtl.tasks.ClassificationTask` per attribute (after :meth:`setup`):
        two logits and cross-entropy, as Sener & Koltun's per-attribute decoder and NLL loss; metric ``acc``."""
        return {attribute: ClassificationTask(2) for attribute in self.tasks}
