"""Dense tasks derived from any class-per-folder image dataset (Tiny-ImageNet to start with), in the spirit of
Taskonomy (Zamir, Sax, Shen, Guibas, Malik & Savarese, "Taskonomy: Disentangling Task Transfer Learning", CVPR 2018,
arXiv:1804.08328), whose 2D tasks (edges, denoising, colourisation, ...) are computed from the images themselves.

Every sample is one image; its tasks, from ONE shared input:

* input ``x``: the clean greyscale image ``g`` plus white Gaussian noise, ``x = g + noise_sigma * n``, ``n ~ N(0, 1)``
  per pixel, ``(1, H, W)`` float32, neither clipped nor standardised (the first BatchNorm of the network sees its
  scale). One input serves both image-to-image tasks: denoising must remove the noise, colourisation must infer the
  colours that greyscale conversion dropped.
* ``edges``: the Sobel gradient magnitude of the *clean* ``g``, ``sqrt(gx^2 + gy^2) / 4``, ``(1, H, W)``: with
  the 3x3 kernels ``[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]`` and its transpose on replicate-padded ``g`` (so a flat
  image has no edges at its border); the ``/ 4`` makes a 0 -> 1 step give 1 on the two pixels beside it.
  :class:`~lightning_mtl.mtl.tasks.PixelRegressionTask` (1 channel).
* ``colour``: the clean colour image in RGB, ``(3, H, W)`` in [0, 1] (uint8 / 255). RGB rather than Lab's ab
  channels: the metrics then read as plain image errors (PSNR of the RGB image), at the price of the network also
  reproducing the luminance it is given (noisily). :class:`~lightning_mtl.mtl.tasks.PixelRegressionTask` (3 channels).
* ``denoise``: the clean ``g``, ``(1, H, W)``. :class:`~lightning_mtl.mtl.tasks.PixelRegressionTask` (1 channel).
* ``class``: the image's class index (its folder), int64. :class:`~lightning_mtl.mtl.tasks.ClassificationTask` on the
  global average of the feature map (``pool="avg"``), not on its flattened ``C x H x W`` values.

Greyscale: ITU-R BT.601 luma, ``g = 0.299 R + 0.587 G + 0.114 B`` of the RGB image in [0, 1], unrounded (PIL's
``convert("L")`` uses the same weights but rounds to uint8).

Images: decoded once (RGB, resized with Lanczos to ``image_size`` x ``image_size`` when needed) by the helpers of
:mod:`lightning_mtl.datamodules.image_folder` (same layouts: class folders, or Tiny-ImageNet's
``train/<wnid>/images/``, in a folder or a ``.zip``). The uint8 images and the deterministic targets ``grey`` and
``edges`` (float32) are cached as one file in the writable cache directory (``cache_dir`` → ``$LIGHTNING_MTL_CACHE``
→ ``~/.cache/lightning_mtl``), never in the data root, keyed by a hash of the sources and settings.

Split: per class (stratified, so the class task sees every class in every split), a permutation seeded with
``(split_seed, class index)``; ``val_fraction`` and ``test_fraction`` of each class (rounded) go to validation and
test, the rest to training. No image is in two splits.

Noise (a pure function of the seeds and the image, so identical across epochs, workers, ranks and resumes):

* validation and test: one fixed draw per image, seeded with ``(noise_seed, 1, image index)``;
* training: the training set is each training image ``noise_draws`` times, draw ``d`` of image ``i`` seeded with
  ``(noise_seed, 0, i, d)``; an epoch (one pass of the shuffled set) thus shows every image ``noise_draws`` times,
  each with a different noise. Fresh noise per pass, yet reproducible and independent of the loader's workers, which
  an epoch counter in the dataset would not be (workers hold copies of it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_mtl.datamodules._images import FileTree, decode_image, load_cache, pack, save_cache
from lightning_mtl.datamodules._paths import resolve_cache_dir, resolve_data_root
from lightning_mtl.datamodules.image_folder import cache_file, list_classes
from lightning_mtl.datamodules.multitask import MultiTaskDataModule, TaskSplits
from lightning_mtl.mtl.tasks import ClassificationTask, PixelRegressionTask, Task

CACHE_VERSION = 1
TASKS = ("edges", "colour", "denoise", "class")
BT601 = (0.299, 0.587, 0.114)
_STREAM = {"train": 0, "val": 1, "test": 1}  # validation and test images are disjoint: one stream serves both


def greyscale(rgb: Tensor) -> Tensor:
    """ITU-R BT.601 luma of ``(N, 3, H, W)`` images (uint8, or floats in [0, 1]): ``(N, 1, H, W)`` float32 in
    [0, 1]."""
    x = rgb.float() / 255 if rgb.dtype == torch.uint8 else rgb.float()
    weights = torch.tensor(BT601, dtype=torch.float32).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def sobel_magnitude(grey: Tensor) -> Tensor:
    """``sqrt(gx^2 + gy^2) / 4`` of ``(N, 1, H, W)`` images with the 3x3 Sobel kernels on replicate padding: a unit
    step gives 1 on the two pixels beside it, a flat image 0 everywhere."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([kx, kx.T]).unsqueeze(1).to(grey)  # (2, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)  # (N, 2, H, W)
    return g.square().sum(1, keepdim=True).sqrt() / 4


def gaussian_noise(shape: tuple[int, ...], *seed: int) -> Tensor:
    """Standard normal float32 noise of ``shape``, a pure function of the integers ``seed``."""
    return torch.from_numpy(np.random.default_rng(list(seed)).standard_normal(shape, dtype=np.float32))


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Tensor]:
    """Image indices of each split: per class, a permutation seeded with ``(seed, class)``; the first
    ``round(val_fraction * n)`` go to ``val``, the next ``round(test_fraction * n)`` to ``test``, the rest to
    ``train``. Indices are sorted within each split."""
    out: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = members[np.random.default_rng([seed, int(c)]).permutation(len(members))]
        n_val, n_test = round(val_fraction * len(order)), round(test_fraction * len(order))
        out["val"].append(order[:n_val])
        out["test"].append(order[n_val:n_val + n_test])
        out["train"].append(order[n_val + n_test:])
    return {s: torch.from_numpy(np.sort(np.concatenate(parts))) for s, parts in out.items()}


class NoisyImageTasks(Dataset):
    """Samples ``(x, {"edges", "colour", "denoise", "class"})`` of the images ``indices`` (see the module docstring).

    Args:
        images: ``(N, 3, H, W)`` uint8 RGB images of the whole dataset.
        grey: ``(N, 1, H, W)`` float32 greyscale images.
        edges: ``(N, 1, H, W)`` float32 Sobel magnitudes.
        labels: ``(N,)`` int64 classes.
        indices: the images of this split.
        noise_sigma: standard deviation of the input noise.
        noise_seed: seed of the noise.
        stream: 0 for training draws, 1 for the fixed evaluation draw.
        draws: noise draws per image (the dataset holds ``len(indices) * draws`` samples).
    """

    def __init__(self, images: Tensor, grey: Tensor, edges: Tensor, labels: Tensor, indices: Tensor,
                 noise_sigma: float, noise_seed: int, stream: int, draws: int = 1) -> None:
        self.images, self.grey, self.edges, self.labels, self.indices = images, grey, edges, labels, indices
        self.noise_sigma, self.noise_seed, self.stream, self.draws = noise_sigma, noise_seed, stream, draws

    def __len__(self) -> int:
        return len(self.indices) * self.draws

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        draw, position = divmod(int(i), len(self.indices))
        image = int(self.indices[position])
        grey = self.grey[image]  # (1, H, W)
        seed = (self.noise_seed, self.stream, image, draw) if self.stream == 0 else (self.noise_seed, 1, image)
        x = grey + self.noise_sigma * gaussian_noise(tuple(grey.shape), *seed)
        targets = {"edges": self.edges[image], "colour": self.images[image].float() / 255, "denoise": grey,
                   "class": self.labels[image]}
        return x, targets


class DenseImageTasks(MultiTaskDataModule):
    """Edges, colourisation, denoising and classification of the images of a class-per-folder dataset, from one noisy
    greyscale input (see the module docstring for the targets, the noise, the split and the cache).

    Args:
        path: dataset folder or ``.zip``, relative to ``root`` (or absolute); the default is the Tiny-ImageNet subset
            of the shared data.
        root: data root; ``None`` → ``$LIGHTNING_MTL_DATA`` → ``./data``.
        layout: ``"class_folders"``, ``"tiny_imagenet"`` or ``"auto"`` (as
            :class:`~lightning_mtl.datamodules.image_folder.ImageFolderEpisodes`).
        image_size: side of the square images after resizing (Tiny-ImageNet: 64 native).
        images_per_class: keep the first this many images (by file name) of each class; ``None`` keeps all.
        val_fraction: share of each class's images for validation.
        test_fraction: share of each class's images for testing.
        split_seed: seed of the split; keep it fixed to compare models.
        noise_sigma: standard deviation of the Gaussian noise added to the greyscale input (images in [0, 1];
            0.1 is 25.5 / 255).
        noise_seed: seed of the noise.
        noise_draws: noise draws per training image and epoch (the training set holds each image this many times).
        pixel_loss: loss of the three pixel tasks, ``"l1"`` or ``"l2"``.
        cache_dir: writable directory of the cache; ``None`` → ``$LIGHTNING_MTL_CACHE`` → ``~/.cache/lightning_mtl``.
        batch_size: training samples per step.
        eval_batch_size: validation / test batch size; ``None`` → ``batch_size``.
        num_workers: dataloader worker processes.
        seed: seed of the training shuffles.

    Raises:
        ValueError: a bad size, fraction, sigma or draw count, or an unknown layout or loss.
    """

    def __init__(
        self,
        path: str = "tiny-imagenet/tiny-imagenet-200-subset.zip",
        root: str | None = None,
        layout: Literal["auto", "class_folders", "tiny_imagenet"] = "auto",
        image_size: int = 64,
        images_per_class: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        noise_sigma: float = 0.1,
        noise_seed: int = 0,
        noise_draws: int = 16,
        pixel_loss: Literal["l1", "l2"] = "l1",
        cache_dir: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers=num_workers, seed=seed)
        if layout not in ("auto", "class_folders", "tiny_imagenet"):
            raise ValueError(f"layout must be 'auto', 'class_folders' or 'tiny_imagenet', got {layout!r}")
        if image_size < 1 or (images_per_class is not None and images_per_class < 1):
            raise ValueError(f"image_size and images_per_class must be >= 1, got {image_size} and {images_per_class}")
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise ValueError(f"need 0 < val_fraction, 0 < test_fraction and val_fraction + test_fraction < 1; got "
                             f"{val_fraction} and {test_fraction}")
        if noise_sigma < 0 or noise_draws < 1 or split_seed < 0 or noise_seed < 0:
            raise ValueError(f"need noise_sigma >= 0, noise_draws >= 1 and seeds >= 0; got {noise_sigma}, "
                             f"{noise_draws}, {split_seed} and {noise_seed}")
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}")
        self.save_hyperparameters()
        self.root = resolve_data_root(root)
        self.source = self.root / path
        self.cache_dir = resolve_cache_dir(cache_dir)

    # ------------------------------------------------------------------ sources and cache
    def _classes(self, tree: FileTree) -> dict[str, list[str]]:
        classes = list_classes(tree, self.source, self.root, self.hparams.layout)
        k = self.hparams.images_per_class
        return classes if k is None else {c: files[:k] for c, files in classes.items()}

    def _cache_path(self, tree: FileTree, classes: dict[str, list[str]]) -> Path:
        hp = self.hparams
        settings = {"v": CACHE_VERSION, "size": hp.image_size, "layout": hp.layout, "per_class": hp.images_per_class}
        return cache_file(self.cache_dir, "densetasks", self.source, tree, classes, settings, f"{hp.image_size}px")

    def cache_path(self) -> Path:
        """The cache of the current sources and settings."""
        with FileTree(self.source) as tree:
            return self._cache_path(tree, self._classes(tree))

    def _load(self, path: Path) -> dict | None:
        payload = load_cache(path, "dense tasks")
        if payload is None:
            return None
        shape = (payload["images"].shape[0], 1, *payload["images"].shape[2:])
        if any(payload.get(k) is None or tuple(payload[k].shape) != shape for k in ("grey", "edges")):
            return None  # written by something else under this name: rebuild it
        return payload

    def prepare_data(self) -> None:
        with FileTree(self.source) as tree:
            classes = self._classes(tree)
            path = self._cache_path(tree, classes)
            if self._load(path) is not None:
                return
            size = self.hparams.image_size
            groups = {c: [decode_image(tree.read(f), tree.where(f), size, 3) for f in files]
                      for c, files in classes.items()}
        payload = pack(groups)
        grey = greyscale(payload["images"])  # (N, 1, H, W)
        save_cache(path, {**payload, "grey": grey, "edges": sobel_magnitude(grey)})

    # ------------------------------------------------------------------ splits and tasks
    def build_splits(self) -> TaskSplits:
        hp, path = self.hparams, self.cache_path()
        payload = self._load(path)
        if payload is None:
            raise RuntimeError(f"no dense-task cache at {path}: call prepare_data() before setup().")
        labels = torch.repeat_interleave(torch.arange(len(payload["counts"])), torch.tensor(payload["counts"]))
        splits = stratified_split(labels.numpy(), hp.val_fraction, hp.test_fraction, hp.split_seed)
        for split, indices in splits.items():
            if len(indices) == 0:
                raise ValueError(f"{self.source}: the {split} split is empty ({len(labels)} images, fractions "
                                 f"{hp.val_fraction} / {hp.test_fraction} of each class, rounded); raise the fraction "
                                 f"or add images.")
        data = {s: NoisyImageTasks(payload["images"], payload["grey"], payload["edges"], labels, idx, hp.noise_sigma,
                                   hp.noise_seed, _STREAM[s], hp.noise_draws if s == "train" else 1)
                for s, idx in splits.items()}
        # values per pixel of the dense tasks (the model takes its tasks from build_tasks; these name them)
        num_classes = {"edges": 1, "colour": 3, "denoise": 1, "class": len(payload["classes"])}
        return TaskSplits(num_classes, data["train"], data["val"], data["test"])

    def build_tasks(self) -> dict[str, Task]:
        """The four tasks (after :meth:`setup`): three :class:`PixelRegressionTask` and a :class:`ClassificationTask`
        on the average-pooled feature map."""
        loss, classes = self.hparams.pixel_loss, self.num_classes["class"]
        return {"edges": PixelRegressionTask(1, loss), "colour": PixelRegressionTask(3, loss),
                "denoise": PixelRegressionTask(1, loss), "class": ClassificationTask(classes, pool="avg")}
