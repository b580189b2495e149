"""Office-31 and Office-Home: one classification task per domain, each with its own images.

The multi-input benchmarks of LibMTL (Lin & Zhang, "LibMTL: A Python Library for Multi-Task Learning", JMLR 2023,
arXiv:2203.14338; ``examples/office``):

* Office-31 (Saenko et al., ECCV 2010): domains ``amazon``, ``dslr``, ``webcam``; 31 classes; 4,110 images.
* Office-Home (Venkateswara et al., CVPR 2017): domains ``Art``, ``Clipart``, ``Product``, ``Real_World``; 65
  classes; 15,500 images.

Each domain is a task with its own inputs: ``build_splits`` returns ``{domain: Dataset}`` (the "one dataset per task"
form of :class:`~lightning_mtl.datamodules.multitask.MultiTaskDataModule`), samples ``(uint8 image (3, S, S),
class index)``, classes numbered in sorted name order.

Layouts accepted under ``<root>/<path>`` (class-per-folder JPEGs; ``path=None`` tries the folder names listed)::

    Office-31   <root>/{office31,office-31,Office31,OFFICE31}/<domain>/images/<class>/*.jpg   (the official archive)
                <root>/.../<domain>/<class>/*.jpg                                            (flattened copies)
    Office-Home <root>/{OfficeHomeDataset_10072016,OfficeHome,office_home,office-home}/<Domain>/<class>/*.jpg
                (the domain folder of Real_World may be "Real World", as in the official zip)

Every domain must hold the same classes. Split: LibMTL ships fixed text lists (60% / 20% / 20% train / val / test of
each domain). We draw the split instead, stratified by class: within each class of each domain, a permutation seeded
by ``(split_seed, crc32("<domain>/<class>"))`` gives ``round(0.2 n)`` validation and ``round(0.2 n)`` test images and
the rest for training, so every split sees every class in about the LibMTL proportions; results are comparable in
protocol, not image for image.

Images are decoded lazily per sample (:class:`~lightning_mtl.datamodules._lazy_images.LazyImages`) and resized to
``image_size`` x ``image_size`` (default 224, as LibMTL) by Lanczos, uint8 RGB; the model scales them to [0, 1].
LibMTL also normalises with the ImageNet mean and standard deviation: here the backbone does
(:class:`lightning_mtl.nn.resnet18.ResNet18` with ``imagenet_normalize: true``), so cached images stay uint8.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_mtl.datamodules._images import IMAGE_EXTENSIONS, FileTree, is_image_name
from lightning_mtl.datamodules._lazy_images import LazyImages
from lightning_mtl.datamodules._paths import resolve_data_root
from lightning_mtl.datamodules.multitask import Mode, MultiTaskDataModule, TaskSplits

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DomainLayout:
    """Where a one-task-per-domain dataset lives.

    Attributes:
        name: the dataset's name in messages.
        domains: task name → accepted folder names of that domain, in the order tried.
        folders: dataset folder names tried under the data root when no ``path`` is given.
        images_subfolder: a folder between the domain and the classes that is used when present (``images`` in the
            Office-31 archive); ``None``: classes sit directly in the domain folder.
        url: where to download the dataset.
    """

    name: str
    domains: dict[str, tuple[str, ...]]
    folders: tuple[str, ...]
    images_subfolder: str | None
    url: str

    def describe(self) -> str:
        sub = f"[{self.images_subfolder}/]" if self.images_subfolder else ""
        return (f"<root>/{{{','.join(self.folders)}}}/<domain>/{sub}<class>/<image> with domains "
                f"{', '.join(' or '.join(repr(f) for f in names) for names in self.domains.values())}")


OFFICE_31 = DomainLayout(
    "Office-31", {d: (d,) for d in ("amazon", "dslr", "webcam")}, ("office31", "office-31", "Office31", "OFFICE31"),
    "images", "https://faculty.cc.gatech.edu/~judy/domainadapt/ (domain_adaptation_images.tar.gz)",
)
OFFICE_HOME = DomainLayout(
    "Office-Home", {"Art": ("Art",), "Clipart": ("Clipart",), "Product": ("Product",),
                    "Real_World": ("Real_World", "Real World")},
    ("OfficeHomeDataset_10072016", "OfficeHome", "office_home", "office-home"), None,
    "https://www.hemanthdv.org/officeHomeDataset.html (OfficeHomeDataset_10072016.zip)",
)


def split_per_class(
    files: dict[str, list[str]], fractions: tuple[float, float, float], seed: int, domain: str
) -> dict[str, list[tuple[str, int]]]:
    """``{split: [(file, class index)]}``: each class's files split train / val / test, disjoint and covering.

    Args:
        files: class name → files, in class order (the class index is the position).
        fractions: train / val / test shares; val gets ``round(val * n)`` files of a class of ``n``, test
            ``round(test * n)``, train the rest.
        seed: split seed; class ``c`` of ``domain`` is permuted by ``(seed, crc32("<domain>/<c>"))``, independent of
            the other classes and domains.
        domain: the domain name in the seed.
    """
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for label, (cls, names) in enumerate(files.items()):
        order = np.random.default_rng([seed, zlib.crc32(f"{domain}/{cls}".encode())]).permutation(len(names))
        n_val, n_test = round(fractions[1] * len(names)), round(fractions[2] * len(names))
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        for split, idx in parts.items():
            out[split] += [(names[i], label) for i in sorted(idx)]
    return out


class DomainTasks(MultiTaskDataModule):
    """One classification task per domain of a class-per-folder dataset. A subclass sets the class attribute
    ``layout`` (a :class:`DomainLayout`: where the dataset lives and its domains) and nothing else::

        class DomainNet(DomainTasks):
            layout = DomainLayout("DomainNet", {"clipart": ("clipart",), ...}, ("domainnet",), None, "<url>")

    Args:
        root: data root; ``None`` → ``$LIGHTNING_MTL_DATA`` → ``./data``.
        path: the dataset folder, relative to ``root`` (or absolute); ``None`` → the first of ``layout.folders``
            that exists.
        domains: domains to use as tasks, in this order; ``None`` → all.
        image_size: side of the square images after resizing.
        train_fraction: share of each class of each domain used for training.
        val_fraction: share used for validation.
        test_fraction: share used for testing.
        split_seed: seed of the split; keep it fixed to compare models.
        cache_images: decoded images each loader process keeps in memory (0: decode every access).
        batch_size: training images per domain and step.
        eval_batch_size: validation / test batch size per domain; ``None`` → ``batch_size``.
        mode: how domain loaders combine in training (``max_size_cycle`` or ``min_size``).
        eval_mode: how domain loaders combine in validation / test.
        num_workers: worker processes per domain loader.
        seed: seed of the training shuffles.

    Raises:
        ValueError: fractions that are not positive or do not sum to 1, an unknown or repeated domain, a
            non-positive ``image_size`` or a negative ``cache_images`` or ``split_seed``.
    """

    layout: ClassVar[DomainLayout]

    def __init__(
        self,
        root: str | None = None,
        path: str | None = None,
        domains: list[str] | None = None,
        image_size: int = 224,
        train_fraction: float = 0.6,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        cache_images: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        mode: Mode = "max_size_cycle",
        eval_mode: Mode = "sequential",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, mode, eval_mode, num_workers, seed)
        layout = getattr(type(self), "layout", None)
        if not isinstance(layout, DomainLayout):
            raise TypeError(f"{type(self).__name__} must set the class attribute `layout` to a DomainLayout")
        self.save_hyperparameters()
        self.fractions = (train_fraction, val_fraction, test_fraction)
        if min(self.fractions) <= 0 or abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError(f"train/val/test fractions {self.fractions} must be positive and sum to 1")
        if image_size <= 0 or cache_images < 0 or split_seed < 0:
            raise ValueError(f"need image_size > 0, cache_images >= 0 and split_seed >= 0, got {image_size}, "
                             f"{cache_images} and {split_seed}")
        domains = list(layout.domains) if domains is None else list(domains)
        unknown = [d for d in domains if d not in layout.domains]
        if unknown or not domains or len(set(domains)) != len(domains):
            raise ValueError(f"{layout.name} domains must be a non-empty list without repeats of "
                             f"{', '.join(layout.domains)}; got {domains}")
        self.domains = domains
        self.root, self.path = resolve_data_root(root), path
        self.image_size, self.split_seed, self.cache_images = image_size, split_seed, cache_images

    def dataset_folder(self) -> Path:
        """The dataset folder.

        Raises:
            FileNotFoundError: none of the folders tried exists; the message gives the expected layout.
        """
        tried = [self.root / self.path] if self.path is not None else [self.root / f for f in self.layout.folders]
        found = next((p for p in tried if p.is_dir()), None)
        if found is None:
            raise FileNotFoundError(
                f"{self.layout.name}: no dataset folder at {' or '.join(map(str, tried))}. Download it from "
                f"{self.layout.url} and extract it as {self.layout.describe()}; or pass --data.root / --data.path "
                f"(root: $LIGHTNING_MTL_DATA, else ./data).")
        return found

    def class_root(self, folder: Path, domain: str) -> Path:
        """The folder holding ``domain``'s class folders.

        Raises:
            FileNotFoundError: the domain folder is missing.
        """
        tried = [folder / name for name in self.layout.domains[domain]]
        found = next((p for p in tried if p.is_dir()), None)
        if found is None:
            present = sorted(p.name for p in folder.iterdir() if p.is_dir())
            raise FileNotFoundError(f"{self.layout.name}: domain folder {' or '.join(map(str, tried))} is missing "
                                    f"(folders present: {', '.join(present) or 'none'}); expected "
                                    f"{self.layout.describe()}.")
        sub = found / self.layout.images_subfolder if self.layout.images_subfolder else None
        return sub if sub is not None and sub.is_dir() else found

    def list_classes(self, class_root: Path) -> dict[str, list[str]]:
        """``{class: sorted image paths relative to class_root}``, classes sorted by name.

        Raises:
            ValueError: no class folder with images, or a class folder holding a file that is not an image.
        """
        with FileTree(class_root) as tree:
            files = tree.files()
        groups: dict[str, list[str]] = {}
        for f in files:
            cls, sep, _ = f.partition("/")
            if not sep:
                continue  # files beside the class folders (lists, licences) are not images of a class
            if not is_image_name(f):
                raise ValueError(f"{self.layout.name}: {class_root / f} in class folder {cls} is not an image "
                                 f"(extensions {', '.join(IMAGE_EXTENSIONS)}); remove it from the class folder.")
            groups.setdefault(cls, []).append(f)
        if not groups:
            raise ValueError(f"{self.layout.name}: {class_root} holds no class folder with images; expected "
                             f"{self.layout.describe()}.")
        return {c: sorted(groups[c]) for c in sorted(groups)}

    def prepare_data(self) -> None:
        folder = self.dataset_folder()
        for domain in self.domains:
            self.class_root(folder, domain)

    def build_splits(self) -> TaskSplits:
        folder = self.dataset_folder()
        roots = {d: self.class_root(folder, d) for d in self.domains}
        classes = {d: self.list_classes(r) for d, r in roots.items()}
        union = sorted(set().union(*classes.values()))
        differ = {d: sorted(set(union) - set(c)) for d, c in classes.items() if len(c) != len(union)}
        if differ:
            detail = "; ".join(f"{roots[d]} lacks {', '.join(m[:5])}{' ...' if len(m) > 5 else ''}"
                               for d, m in differ.items())
            raise ValueError(f"{self.layout.name}: every domain must hold the same classes, but {detail}. Restore "
                             f"the missing class folders (or remove the extra ones elsewhere).")
        data: dict[str, dict[str, LazyImages]] = {s: {} for s in SPLITS}
        for domain, files in classes.items():
            for split, items in split_per_class(files, self.fractions, self.split_seed, domain).items():
                names = [n for n, _ in items]
                labels = torch.tensor([y for _, y in items], dtype=torch.long)
                data[split][domain] = LazyImages(roots[domain], names, labels, self.image_size, self.cache_images)
        sizes = {d: tuple(len(data[s][d]) for s in SPLITS) for d in self.domains}
        rank_zero_info(f"{self.layout.name} from {folder}: {len(union)} classes; train/val/test images per domain "
                       f"{sizes} (split_seed={self.split_seed})")
        num_classes = dict.fromkeys(self.domains, len(union))
        return TaskSplits(num_classes, data["train"], data["val"], data["test"])


class Office31(DomainTasks):
    """Office-31: tasks ``amazon``, ``dslr``, ``webcam`` (31 classes each); arguments as :class:`DomainTasks`, the
    layout excepted (see the module docstring)."""

    layout = OFFICE_31


class OfficeHome(DomainTasks):
    """Office-Home: tasks ``Art``, ``Clipart``, ``Product``, ``Real_World`` (65 classes each); arguments as
    :class:`DomainTasks`, the layout excepted (see the module docstring)."""

    layout = OFFICE_HOME
