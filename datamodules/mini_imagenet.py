"""Mini-ImageNet (Vinyals et al., NeurIPS 2016) with the split of Ravi & Larochelle, "Optimization as a Model for
Few-Shot Learning", ICLR 2017: 64 / 16 / 20 disjoint ImageNet classes of 600 images each for train / val / test,
images resized to 84x84.

Two sources under ``path`` (default ``miniimagenet/``) of the data root (``--data.root`` → ``$LIGHTNING_MTL_DATA``
→ ``./data``)::

    images:  images/<wnid><index>.jpg  +  {train,val,test}.csv  (``filename,label`` rows, Ravi & Larochelle's files)
    pickle:  mini-imagenet-cache-{train,validation,test}.pkl    (learn2learn's caches: {'image_data': uint8 array
             (N, 84, 84, 3), 'class_dict': {wnid: [indices into image_data]}})

``source="auto"`` takes the pickles when all three exist, else the images and CSVs. Pickles are read with a
restricted unpickler (:mod:`lightning_mtl.datamodules._safe_pickle`) that refuses every global numpy arrays do not
need, so a crafted pickle cannot run code. Images are decoded once in ``prepare_data``, resized (Lanczos) to
``image_size`` and cached as one uint8 tensor in the cache directory, keyed by a hash of the sources and settings.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from lightning_mtl.datamodules._download import file_digest
from lightning_mtl.datamodules._episodic import STAGES, EpisodeSettings, EpisodicImages
from lightning_mtl.datamodules._images import decode_image, load_cache, pack, save_cache
from lightning_mtl.datamodules._paths import resolve_cache_dir, resolve_data_root
from lightning_mtl.datamodules._safe_pickle import safe_load

#: classes per split and images per class of the Ravi & Larochelle split
SPLIT_CLASSES = {"train": 64, "val": 16, "test": 20}
IMAGES_PER_CLASS = 600
PICKLES = {"train": "mini-imagenet-cache-train.pkl", "val": "mini-imagenet-cache-validation.pkl",
           "test": "mini-imagenet-cache-test.pkl"}
CACHE_VERSION = 1


def read_split_csv(path: str | os.PathLike) -> dict[str, list[str]]:
    """Image file names per class (wnid), in file order, of a Ravi & Larochelle split CSV (``filename,label``).

    Raises:
        ValueError: the header or a row is malformed.
    """
    classes: dict[str, list[str]] = {}
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header != ["filename", "label"]:
            raise ValueError(f"{path}:1: expected the header 'filename,label', got {','.join(header or [])!r}.")
        for n, row in enumerate(rows, start=2):
            if len(row) != 2 or not all(row):
                raise ValueError(f"{path}:{n}: expected 'filename,label', got {','.join(row)!r}.")
            classes.setdefault(row[1], []).append(row[0])
    return classes


def check_split(counts: dict[str, int], split: str, where: str) -> None:
    """Raise ``ValueError`` unless ``counts`` (images per class) match the Ravi & Larochelle ``split``."""
    if len(counts) != SPLIT_CLASSES[split]:
        raise ValueError(
            f"{where}: {len(counts)} classes, but the Ravi & Larochelle {split} split has {SPLIT_CLASSES[split]}; use "
            f"the original split files, or check_protocol=False for a subset."
        )
    for wnid, count in counts.items():
        if count != IMAGES_PER_CLASS:
            raise ValueError(
                f"{where}: class {wnid} has {count} images, the Ravi & Larochelle split has {IMAGES_PER_CLASS} per "
                f"class; use the original files, or check_protocol=False for a subset."
            )


def _from_pickle(path: Path, size: int) -> dict[str, list[np.ndarray]]:
    data = safe_load(path)
    images = data.get("image_data") if isinstance(data, dict) else None
    class_dict = data.get("class_dict") if isinstance(data, dict) else None
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 \
            or not isinstance(class_dict, dict):
        raise ValueError(f"{path}: expected {{'image_data': uint8 array (N, H, W, 3), 'class_dict': {{wnid: "
                         f"[indices]}}}} as in learn2learn's mini-imagenet-cache files; re-download it.")
    out = {}
    for wnid in sorted(class_dict):
        idx = np.asarray(class_dict[wnid], dtype=np.int64)
        if idx.ndim != 1 or idx.size == 0 or idx.min() < 0 or idx.max() >= len(images):
            raise ValueError(f"{path}: class_dict[{wnid!r}] holds indices outside 0..{len(images) - 1}; the file is "
                             f"damaged: re-download it.")
        out[wnid] = [_resized(img, size) for img in images[idx]]
    return out


def _resized(img: np.ndarray, size: int) -> np.ndarray:
    """``(3, size, size)`` from an ``(H, W, 3)`` image."""
    if img.shape[:2] != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.LANCZOS))
    return np.ascontiguousarray(img.transpose(2, 0, 1))


class MiniImageNetEpisodes(EpisodicImages):
    """Mini-ImageNet N-way K-shot Q-query episodes on the Ravi & Larochelle split.

    Args:
        root: data root holding ``path``; ``None`` → ``$LIGHTNING_MTL_DATA`` → ``./data``.
        path: folder, relative to ``root`` (or absolute), holding ``images/`` and the CSVs, or the pickles.
        source: ``"images"`` (images + CSVs), ``"pickle"`` (learn2learn caches) or ``"auto"``.
        train_split: classes to train on: ``"train"`` (64) or ``"trainval"`` (80, for final runs).
        image_size: side of the square images after resizing (84 in the literature).
        check_protocol: require the 64 / 16 / 20 classes x 600 images of the split; turn off for subsets.
        cache_dir: writable directory for the decoded cache; ``None`` → ``$LIGHTNING_MTL_CACHE`` →
            ``~/.cache/lightning_mtl``.
        episodes: shapes, counts and seeds of the episodes: see :class:`~lightning_mtl.datamodules.EpisodeSettings`.
    """

    @classmethod
    def image_shape_for(cls, init_args: dict) -> tuple[int, int, int]:
        """``(C, image_size, image_size)``: see :meth:`EpisodicImages.image_shape_for`."""
        return cls._square(init_args, 3)

    def __init__(
        self,
        root: str | None = None,
        path: str = "miniimagenet",
        source: Literal["auto", "images", "pickle"] = "auto",
        train_split: Literal["train", "trainval"] = "train",
        image_size: int = 84,
        check_protocol: bool = True,
        cache_dir: str | None = None,
        episodes: EpisodeSettings | None = None,
    ) -> None:
        super().__init__(episodes)
        if source not in ("auto", "images", "pickle"):
            raise ValueError(f"source must be 'auto', 'images' or 'pickle', got {source!r}")
        if train_split not in ("train", "trainval"):
            raise ValueError(f"train_split must be 'train' or 'trainval', got {train_split!r}")
        if image_size <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.save_hyperparameters()
        self.root = resolve_data_root(root)
        self.folder = self.root / path
        self.cache_dir = resolve_cache_dir(cache_dir)

    # ------------------------------------------------------------------ sources and cache
    def files(self) -> tuple[str, dict[str, Path]]:
        """The source in use (``"images"`` or ``"pickle"``) and its split files keyed by split.

        Raises:
            FileNotFoundError: the folder or files of the requested source are missing; the message lists them.
        """
        if not self.folder.is_dir():
            raise FileNotFoundError(
                f"Mini-ImageNet folder {self.folder} does not exist. Pass --data.root / --data.path or set "
                f"$LIGHTNING_MTL_DATA; it must hold images/ + train.csv, val.csv, test.csv, or the pickles "
                f"{', '.join(PICKLES.values())}."
            )
        pickles = {s: self.folder / f for s, f in PICKLES.items()}
        csvs = {s: self.folder / f"{s}.csv" for s in STAGES}
        source = self.hparams.source
        if source == "auto":
            source = "pickle" if all(p.exists() for p in pickles.values()) else "images"
        wanted = pickles if source == "pickle" else {**csvs, "images": self.folder / "images"}
        missing = [str(p) for p in wanted.values() if not p.exists()]
        if missing:
            other = "" if self.hparams.source != "auto" else f" (or the pickles {', '.join(PICKLES.values())})"
            raise FileNotFoundError(f"Mini-ImageNet {source} source is incomplete{other}; missing:\n  "
                                    + "\n  ".join(missing))
        return source, {s: wanted[s] for s in STAGES}

    def cache_path(self) -> Path:
        """The decoded-image cache of the current sources and settings."""
        source, files = self.files()
        h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "size": self.hparams.image_size, "src": source}).encode())
        for split in STAGES:
            h.update(file_digest(files[split]).encode())
            if source == "images":
                for names in self._listed_images(files[split]).values():
                    for name in names:
                        st = (self.folder / "images" / name).stat()
                        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return self.cache_dir / f"miniimagenet-{source}-{self.hparams.image_size}px-{h.hexdigest()[:16]}.pt"

    def _listed_images(self, csv_path: Path) -> dict[str, list[str]]:
        """The image names per class of a split CSV, all present in ``images/``."""
        images = self.folder / "images"
        classes = read_split_csv(csv_path)
        present = set(os.listdir(images))
        absent = [n for names in classes.values() for n in names if n not in present]
        if absent:
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            raise FileNotFoundError(f"{csv_path} names {absent[0]}{more}, missing from {images}; place the images "
                                    f"there.")
        return classes

    def _decode_split(self, source: str, path: Path) -> dict[str, list[np.ndarray]]:
        size = self.hparams.image_size
        if source == "pickle":
            return _from_pickle(path, size)
        images = self.folder / "images"
        classes = self._listed_images(path)
        return {wnid: [decode_image((images / n).read_bytes(), str(images / n), size, 3) for n in names]
                for wnid, names in sorted(classes.items())}

    def prepare_data(self) -> None:
        path = self.cache_path()
        if load_cache(path, "Mini-ImageNet") is not None:
            return
        source, files = self.files()
        groups, splits = {}, {}
        for split in STAGES:
            decoded = self._decode_split(source, files[split])
            for wnid in decoded:
                if wnid in groups:
                    raise ValueError(f"{files[split]}: class {wnid} is also in another split; splits must be disjoint.")
            groups.update(decoded)
            splits[split] = list(decoded)
        save_cache(path, pack(groups, splits=splits))

    def setup(self, stage: str | None = None) -> None:
        if self.samplers:
            return
        path = self.cache_path()
        payload = load_cache(path, "Mini-ImageNet")
        if payload is None:
            raise RuntimeError(f"no Mini-ImageNet cache at {path}: call prepare_data() before setup().")
        _, files = self.files()
        counts = dict(zip(payload["classes"], payload["counts"], strict=True))
        if self.hparams.check_protocol:
            for split in STAGES:
                check_split({c: counts[c] for c in payload["splits"][split]}, split, str(files[split]))
        classes = dict(payload["splits"])
        if self.hparams.train_split == "trainval":
            classes["train"] = classes["train"] + classes["val"]
        name = "Mini-ImageNet"
        self.set_splits({s: self.split_array(payload, classes[s], s, f"{name}/{s}") for s in STAGES}, name)
