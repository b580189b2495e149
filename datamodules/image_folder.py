"""Any class-per-folder image dataset as N-way K-shot episodes.

Layouts, in a folder or a ``.zip`` archive (read in place, never extracted), found at ``path`` under the data root
(``--data.root`` → ``$LIGHTNING_MTL_DATA`` → ``./data``)::

    class_folders:  [<top>/]<class>/**/<image>.{png,jpg,jpeg,bmp,gif,tif,tiff,webp}   (torchvision ImageFolder)
    tiny_imagenet:  [tiny-imagenet-200/]train/<wnid>/images/<wnid>_<i>.JPEG          (Le & Yang, CS231N 2015)

``layout="auto"`` picks ``tiny_imagenet`` when such paths exist (its ``val/`` and ``test/`` folders are unlabelled
or label-file based and are not used: few-shot splits are made of disjoint *classes* of ``train/``). Classes are
split into train / val / test by explicit lists (class names, or text files of one name per line) or at random by
``split_ratios`` with ``split_seed``; the default ratios 0.64 / 0.16 / 0.20 are those of the Mini-ImageNet split of
Ravi & Larochelle (ICLR 2017). No standard few-shot split of Tiny-ImageNet exists: report the split you used.

Images are decoded once in ``prepare_data``, converted to RGB or grayscale, resized (Lanczos) to ``image_size``
and cached as one uint8 tensor in the cache directory, keyed by a hash of the sources and the settings.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Literal

import numpy as np

from lightning_mtl.datamodules._episodic import STAGES, EpisodeSettings, EpisodicImages
from lightning_mtl.datamodules._images import (
    IMAGE_EXTENSIONS,
    FileTree,
    decode_image,
    is_image_name,
    load_cache,
    pack,
    save_cache,
)
from lightning_mtl.datamodules._paths import resolve_cache_dir, resolve_data_root

CACHE_VERSION = 1
_TINY = re.compile(r"^(?:[^/]+/)?train/(?P<cls>[^/]+)/images/[^/]+$")


def find_classes(files: list[str], layout: str, where: Path) -> dict[str, list[str]]:
    """Image files grouped by class (sorted) for a ``layout`` of ``files`` (relative POSIX paths).

    Raises:
        ValueError: a class folder holds a file that is not an image.
    """
    if layout == "auto":
        layout = "tiny_imagenet" if any(_TINY.match(f) for f in files) else "class_folders"
    groups: dict[str, list[str]] = defaultdict(list)
    if layout == "tiny_imagenet":
        for f in files:
            if m := _TINY.match(f):
                groups[m["cls"]].append(f)
    else:
        tops = {f.split("/")[0] for f in files}
        # one top folder holding the class folders (a zip of the dataset folder) rather than being a class itself
        nested = len(tops) == 1 and not any(f.count("/") == 1 and is_image_name(f) for f in files)
        skip = 1 if nested else 0
        for f in files:
            parts = f.split("/")[skip:]
            if len(parts) >= 2:  # files beside the class folders (README, licences) are not classes
                groups[parts[0]].append(f)
    for cls, names in groups.items():
        for f in names:
            if not is_image_name(f):
                raise ValueError(
                    f"{where}: {f} in class folder {cls} is not an image (extensions {', '.join(IMAGE_EXTENSIONS)}); "
                    f"remove it from the class folder."
                )
    return {c: sorted(groups[c]) for c in sorted(groups)}


def empty_class_folders(source: Path, classes: dict[str, list[str]]) -> list[str]:
    """Folders beside the class folders of a folder ``source`` that hold no image, so are missing from ``classes``.

    The class folders sit at the top of ``source``, under one top folder, or under ``[top/]train/`` (Tiny-ImageNet);
    their parent is found from the paths of ``classes``. Zip archives are not checked.
    """
    if not source.is_dir() or not classes:
        return []
    paths = {c: files[0].split("/") for c, files in classes.items()}
    for depth in (0, 1, 2):
        if all(len(p) > depth + 1 and p[depth] == c for c, p in paths.items()):
            parent = source.joinpath(*next(iter(paths.values()))[:depth])
            return sorted(d.name for d in parent.iterdir() if d.is_dir() and d.name not in classes
                          and not d.name.startswith(".") and d.name != "__MACOSX")  # hidden, as FileTree skips them
    return []


def list_classes(tree: FileTree, source: Path, root: Path, layout: str) -> dict[str, list[str]]:
    """``{class: image files}`` of the class-per-folder (or Tiny-ImageNet) dataset ``source`` opened as ``tree``.

    Raises:
        FileNotFoundError: ``source`` does not exist (the message names ``--data.path`` / ``--data.root``).
        ValueError: no image in the expected layout, or a class folder without images.
    """
    if not source.exists():
        raise FileNotFoundError(
            f"image dataset {source} does not exist. Pass --data.path (a class-per-folder directory or a "
            f".zip, relative to the data root {root} or absolute), --data.root or $LIGHTNING_MTL_DATA."
        )
    classes = find_classes(tree.files(), layout, source)
    if not classes:
        raise ValueError(
            f"no images found in {source}: expected <class>/<image>.png|.jpg|... folders or Tiny-ImageNet's "
            f"train/<wnid>/images/*.JPEG (layout={layout!r})."
        )
    if empty := empty_class_folders(source, classes):
        raise ValueError(f"{source}: class folder(s) {', '.join(empty)} hold no images; add images to them or "
                         f"remove them (an empty folder would silently not be a class).")
    return classes


def cache_file(cache_dir: Path, kind: str, source: Path, tree: FileTree, classes: dict[str, list[str]],
               settings: dict, tag: str) -> Path:
    """The cache file of ``classes`` of ``source`` decoded with ``settings``: named ``<kind>-<source>-<tag>-<hash>.pt``,
    the hash covering the settings and every file's content digest, so any change of either gives a new file."""
    h = hashlib.sha256(json.dumps(settings).encode())
    h.update(tree.digest([f for fs in classes.values() for f in fs]).encode())
    stem = source.name.removesuffix(".zip") or "data"
    return cache_dir / f"{kind}-{stem}-{tag}-{h.hexdigest()[:16]}.pt"


class ImageFolderEpisodes(EpisodicImages):
    """N-way K-shot Q-query episodes from a class-per-folder dataset or Tiny-ImageNet.

    Args:
        path: dataset folder or ``.zip``, relative to ``root`` (or absolute); ``""`` is the data root itself.
        root: data root; ``None`` → ``$LIGHTNING_MTL_DATA`` → ``./data``.
        layout: ``"class_folders"``, ``"tiny_imagenet"`` or ``"auto"`` (see the module docstring).
        train_classes: training classes: a list of class names or a text file of one name per line (relative
            paths are looked up in the working directory, then under ``root``). Give all three lists or none.
        val_classes: validation classes, as ``train_classes``.
        test_classes: test classes, as ``train_classes``.
        split_ratios: train / val / test fractions of the classes when no lists are given.
        split_seed: seed of the random class split by ``split_ratios``.
        image_size: side of the square images after resizing.
        channels: 3 (RGB) or 1 (grayscale).
        cache_dir: writable directory for the decoded cache; ``None`` → ``$LIGHTNING_MTL_CACHE`` →
            ``~/.cache/lightning_mtl``.
        episodes: shapes, counts and seeds of the episodes: see :class:`~lightning_mtl.datamodules.EpisodeSettings`.
    """

    @classmethod
    def image_shape_for(cls, init_args: dict) -> tuple[int, int, int]:
        """``(C, image_size, image_size)``: see :meth:`EpisodicImages.image_shape_for`."""
        channels = init_args.get("channels", inspect.signature(cls.__init__).parameters["channels"].default)
        return cls._square(init_args, int(channels))

    def __init__(
        self,
        path: str = "",
        root: str | None = None,
        layout: Literal["auto", "class_folders", "tiny_imagenet"] = "auto",
        train_classes: str | list[str] | None = None,
        val_classes: str | list[str] | None = None,
        test_classes: str | list[str] | None = None,
        split_ratios: tuple[float, float, float] = (0.64, 0.16, 0.20),
        split_seed: int = 0,
        image_size: int = 84,
        channels: Literal[1, 3] = 3,
        cache_dir: str | None = None,
        episodes: EpisodeSettings | None = None,
    ) -> None:
        super().__init__(episodes)
        if layout not in ("auto", "class_folders", "tiny_imagenet"):
            raise ValueError(f"layout must be 'auto', 'class_folders' or 'tiny_imagenet', got {layout!r}")
        if image_size <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        lists = (train_classes, val_classes, test_classes)
        if any(x is not None for x in lists) and any(x is None for x in lists):
            raise ValueError("give train_classes, val_classes and test_classes together, or none of them to split "
                             "the classes by split_ratios.")
        if len(split_ratios) != 3 or min(split_ratios) <= 0:
            raise ValueError(f"split_ratios must be three positive train / val / test fractions, got {split_ratios}")
        self.save_hyperparameters()
        self.root = resolve_data_root(root)
        self.source = self.root / path
        self.cache_dir = resolve_cache_dir(cache_dir)

    # ------------------------------------------------------------------ sources and cache
    def _classes(self, tree: FileTree) -> dict[str, list[str]]:
        return list_classes(tree, self.source, self.root, self.hparams.layout)

    def _cache_path(self, tree: FileTree, classes: dict[str, list[str]]) -> Path:
        hp = self.hparams
        settings = {"v": CACHE_VERSION, "size": hp.image_size, "channels": hp.channels, "layout": hp.layout}
        return cache_file(self.cache_dir, "imagefolder", self.source, tree, classes, settings,
                          f"{hp.image_size}px-{hp.channels}ch")

    def cache_path(self) -> Path:
        """The decoded-image cache of the current sources and settings."""
        with FileTree(self.source) as tree:
            return self._cache_path(tree, self._classes(tree))

    def prepare_data(self) -> None:
        with FileTree(self.source) as tree:
            classes = self._classes(tree)
            path = self._cache_path(tree, classes)
            if load_cache(path, "image folder") is not None:
                return
            size, channels = self.hparams.image_size, self.hparams.channels
            groups = {c: [decode_image(tree.read(f), tree.where(f), size, channels) for f in files]
                      for c, files in classes.items()}
        save_cache(path, pack(groups))

    # ------------------------------------------------------------------ splits
    def _named_list(self, value: str | list[str], arg: str) -> tuple[list[str], str]:
        if not isinstance(value, str):
            return list(value), arg
        path = Path(value).expanduser()
        if not path.exists() and not path.is_absolute():
            path = self.root / value
        if not path.is_file():
            raise FileNotFoundError(f"{arg}: class list {value} not found (looked in the working directory and "
                                    f"under {self.root}); give a text file of one class per line or a list of names.")
        lines = [line.strip() for line in path.read_text().splitlines()]
        return [line for line in lines if line and not line.startswith("#")], str(path)

    def split_classes(self, names: list[str]) -> dict[str, list[str]]:
        """Class names of each stage, from the explicit lists or by ``split_ratios`` with ``split_seed``.

        Raises:
            ValueError: an unknown class, a class in two splits or listed twice, or too few classes for the ratios.
        """
        hp = self.hparams
        if hp.train_classes is None:
            ratios = np.asarray(hp.split_ratios, dtype=float) / sum(hp.split_ratios)
            n_train, n_val = (int(round(r * len(names))) for r in ratios[:2])
            if min(n_train, n_val, len(names) - n_train - n_val) < 1:
                raise ValueError(f"{self.source}: {len(names)} classes cannot be split by ratios {hp.split_ratios} "
                                 f"into three non-empty splits; add classes or give explicit class lists.")
            order = [names[i] for i in np.random.default_rng(hp.split_seed).permutation(len(names))]
            return {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
        known, seen, out = set(names), {}, {}
        for stage in STAGES:
            chosen, label = self._named_list(hp[f"{stage}_classes"], f"{stage}_classes")
            for c in chosen:
                if c not in known:
                    raise ValueError(f"{label}: unknown class {c!r}; {self.source} has {len(names)} classes "
                                     f"(e.g. {', '.join(names[:3])}). Fix the class list.")
                if c in seen:
                    raise ValueError(f"{label}: class {c!r} is already in {seen[c]}; each class belongs to one split.")
                seen[c] = label
            out[stage] = chosen
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.samplers:
            return
        path = self.cache_path()
        payload = load_cache(path, "image folder")
        if payload is None:
            raise RuntimeError(f"no image cache at {path}: call prepare_data() before setup().")
        name = f"ImageFolder {self.source.name}"
        splits = self.split_classes(payload["classes"])
        self.set_splits({s: self.split_array(payload, splits[s], s, f"{name}/{s}") for s in STAGES}, name)
