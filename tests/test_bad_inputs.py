"""Bad-input catalogue: each way we know of to hand the library bad input, and the exact message it answers with.

Every row of :data:`CASES` is ``(id, provoke, error type, message)``: ``provoke(tmp)`` builds the bad input in the
temporary folder ``tmp`` and runs the library on it, which must raise ``error`` with exactly ``message``
(``{tmp}`` stands for the folder, ``{balancers}`` / ``{weightings}`` for the registered balancing methods).

The rule the rows check: bad input gets an error that says what was wrong and what to do, raised before training
starts (at the latest in the first step, before any update), and nothing is silently dropped. Rows are grouped by
where the input enters: data on disk, splits, episode shapes, multi-task datamodules and model, meta-learners, the
trainer and checkpoints. Command-line errors (jsonargparse's) are in :data:`CLI_CASES`; non-finite losses under
``nonfinite.mode="skip"`` warn rather than raise and have their own test.

Fixtures are tiny files in the real formats (PNG, JPEG, zip, IDX, pickle, CSV), written per test; nothing is trained
beyond one step.
"""

from __future__ import annotations

import collections
import functools
import gzip
import importlib.util
import io
import math
import os
import pickle
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from lightning_mtl import Episode, MultiTaskBatch
from lightning_mtl.callbacks import NonFiniteGuard
from lightning_mtl.cli import resolve_checkpoint_alias
from lightning_mtl.datamodules import (
    EpisodeSampler,
    EpisodeSettings,
    FixedEpisodes,
    ImageFolderEpisodes,
    MiniImageNetEpisodes,
    MultiMNIST,
    OmniglotAlphabets,
    OmniglotEpisodes,
    read_idx,
)
from lightning_mtl.datamodules._safe_pickle import UnsafePickleError, safe_load
from lightning_mtl.datamodules.l2l_tasks import episode_from_task
from lightning_mtl.datamodules.multimnist import IDXError, read_mnist
from lightning_mtl.datamodules.multitask import MultiTargetDataset, MultiTaskDataModule, TaskSplits
from lightning_mtl.meta import MAML, R2D2, MatchingNetwork, ProtoNet, Reptile, SiameseNetwork
from lightning_mtl.mtl import MultiTaskModule, SoftSharing
from lightning_mtl.mtl.balancing import create_balancer, list_balancers
from lightning_mtl.mtl.balancing.fixed import FixedWeighting
from lightning_mtl.mtl.tasks import ClassificationTask
from lightning_mtl.mtl.tasks.segmentation import SegmentationTask

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"

# ------------------------------------------------------------------ tiny files in the real formats


def png(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def class_folders(root: Path, classes: int = 5, per_class: int = 3) -> Path:
    """``root/class<c>/<i>.png``: a class-per-folder dataset (torchvision ImageFolder layout)."""
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"class{c}" / f"{i}.png").write_bytes(png(10 * c + i))
    return root


def image_folder(tmp: Path, path: str = "toy", episodes: dict | None = None, **kw) -> ImageFolderEpisodes:
    """2-way 1-shot 1-query episodes of 8x8 images; the split (5 classes by default ratios) is 3 / 1 / 1 classes.
    ``episodes`` overrides fields of these episode settings."""
    kw = {"image_size": 8, **kw}
    settings = {"train_ways": 2, "train_shots": 1, "train_queries": 1, "eval_ways": 1, "eval_shots": 1,
                "eval_queries": 1, "eval_meta_batch_size": 2, "val_episodes": 2, "test_episodes": 2, **(episodes or {})}
    return ImageFolderEpisodes(path=path, root=str(tmp), cache_dir=str(tmp / "cache"),
                               episodes=EpisodeSettings(**settings), **kw)


def prepared(dm: L.LightningDataModule) -> L.LightningDataModule:
    dm.prepare_data()
    dm.setup()
    return dm


def fake_omniglot(root: Path) -> Path:
    """Two archives of one alphabet and two characters each (20 drawings of 8x8), and Vinyals split lists."""
    folder = root / "omniglot"
    (folder / "splits" / "vinyals").mkdir(parents=True)
    lines = []
    for archive, alphabet in (("images_background", "Alpha"), ("images_evaluation", "Beta")):
        with zipfile.ZipFile(folder / f"{archive}.zip", "w") as zf:
            for c in (1, 2):
                for d in range(1, 21):
                    zf.writestr(f"{archive}/{alphabet}/character{c:02d}/{c:04d}_{d:02d}.png", png(100 * c + d))
                lines += [f"{alphabet}/character{c:02d}/rot{r:03d}" for r in (0, 90, 180, 270)]
    for split, chosen in (("train", lines[:8]), ("val", lines[8:12]), ("test", lines[12:]), ("trainval", lines[:12])):
        (folder / "splits" / "vinyals" / f"{split}.txt").write_text("\n".join(chosen) + "\n")
    return root


def omniglot(tmp: Path, episodes: dict | None = None, **kw) -> OmniglotEpisodes:
    kw = {"image_size": 8, "download": False, **kw}
    settings = {"train_ways": 2, "eval_ways": 2, **(episodes or {})}
    return OmniglotEpisodes(root=str(tmp), cache_dir=str(tmp / "cache"), episodes=EpisodeSettings(**settings), **kw)


def idx(path: Path, array: np.ndarray, type_code: int = 0x08, compress: bool = True) -> Path:
    """An IDX file (LeCun's MNIST format) of a uint8 array."""
    raw = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def mnist_pair(tmp: Path, images: int = 4, labels: int = 4) -> tuple[Path, Path]:
    x = np.zeros((images, 28, 28), np.uint8)
    return idx(tmp / "i.gz", x), idx(tmp / "l.gz", np.arange(labels, dtype=np.uint8) % 10)


def mini_imagenet(tmp: Path, missing: str | None = None) -> MiniImageNetEpisodes:
    """``images/`` + ``{train,val,test}.csv``: two classes of two images per split, all written but ``missing``."""
    folder = tmp / "mini"
    (folder / "images").mkdir(parents=True)
    for s, split in enumerate(("train", "val", "test")):
        rows = ["filename,label"]
        for c in range(2):
            wnid = f"n0{s}{c}"
            for i in range(2):
                name = f"{wnid}{i:08d}.jpg"
                rows.append(f"{name},{wnid}")
                if name != missing:
                    (folder / "images" / name).write_bytes(jpeg(100 * s + 10 * c + i))
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return MiniImageNetEpisodes(root=str(tmp), path="mini", source="images", image_size=8, check_protocol=False,
                                cache_dir=str(tmp / "cache"),
                                episodes=EpisodeSettings(train_ways=2, eval_ways=2, train_queries=1, eval_queries=1))


def mini_imagenet_pickles(tmp: Path, train: object) -> MiniImageNetEpisodes:
    """learn2learn-style pickles; the training one holds ``train``, the others are well formed."""
    folder = tmp / "mini"
    folder.mkdir(parents=True)
    good = {"image_data": np.zeros((4, 8, 8, 3), np.uint8), "class_dict": {"n0": [0, 1], "n1": [2, 3]}}
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        with open(folder / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
            pickle.dump(train if split == "train" else good, f, protocol=4)
    return MiniImageNetEpisodes(root=str(tmp), path="mini", source="pickle", image_size=8, check_protocol=False,
                                cache_dir=str(tmp / "cache"))


# ------------------------------------------------------------------ a tiny multi-task model and one-step fits

TASKS = {"a": 3, "b": 2}


def mtl_model(**kw) -> MultiTaskModule:
    torch.manual_seed(0)
    kw = {"backbone": nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh()), "input_shape": (6,),
          "diagnostics_every": 0, "num_classes": dict(TASKS), **kw}
    return MultiTaskModule(**kw)


def mtl_batch(x: torch.Tensor | None = None, **targets: torch.Tensor) -> MultiTaskBatch:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g) if x is None else x
    default = {t: torch.randint(0, c, (4,), generator=g) for t, c in TASKS.items()}
    return MultiTaskBatch(x, {**default, **targets})


def fit(model: L.LightningModule, batch: object, **kw) -> L.Trainer:
    """One training step on ``batch`` (no validation, logging or checkpoints)."""
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, **kw)
    trainer.fit(model, train_dataloaders=DataLoader([batch], batch_size=None))
    return trainer


class InfiniteLoss(ClassificationTask):
    """Cross-entropy plus infinity: every task loss is +inf."""

    def loss(self, output, target):
        return F.cross_entropy(output, target) + math.inf


def episode(ways: int = 2, shots: int = 1, queries: int = 1, size: int = 28) -> Episode:
    g = torch.Generator().manual_seed(0)
    sx = torch.randint(0, 256, (1, ways * shots, 1, size, size), generator=g, dtype=torch.uint8)
    qx = torch.randint(0, 256, (1, ways * queries, 1, size, size), generator=g, dtype=torch.uint8)
    return Episode(sx, torch.arange(ways).repeat_interleave(shots)[None], qx,
                   torch.arange(ways).repeat_interleave(queries)[None], ways)


class EmptyTrainSplit(MultiTaskDataModule):
    """A multi-task datamodule whose ``build_splits`` gives a task an empty training set."""

    def build_splits(self) -> TaskSplits:
        full = MultiTargetDataset(torch.zeros(4, 6), {"a": torch.zeros(4, dtype=torch.long)})
        empty = MultiTargetDataset(torch.zeros(0, 6), {"a": torch.zeros(0, dtype=torch.long)})
        return TaskSplits({"a": 2}, empty, full, full)


# ------------------------------------------------------------------ provocations needing several statements


def corrupt_png(tmp: Path) -> None:
    (class_folders(tmp / "toy") / "class1" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    image_folder(tmp).prepare_data()


def truncated_jpeg(tmp: Path) -> None:
    root = class_folders(tmp / "toy")
    data = jpeg(0)
    (root / "class2" / "0.jpg").write_bytes(data[: len(data) // 2])
    image_folder(tmp).prepare_data()


def non_image_in_class_folder(tmp: Path) -> None:
    (class_folders(tmp / "toy") / "class3" / "notes.txt").write_text("labels by hand")
    image_folder(tmp).prepare_data()


def empty_class_folder(tmp: Path) -> None:
    (class_folders(tmp / "toy") / "class9").mkdir()
    image_folder(tmp).prepare_data()


def class_with_too_few_images(tmp: Path) -> None:
    root = class_folders(tmp / "toy")
    (root / "class4" / "1.png").unlink()
    (root / "class4" / "2.png").unlink()
    prepared(image_folder(tmp, train_classes=["class0", "class1", "class4"], val_classes=["class2"],
                          test_classes=["class3"]))


def not_a_zip(tmp: Path) -> None:
    (tmp / "toy.zip").write_bytes(b"PK\x03\x04 truncated download")
    image_folder(tmp, path="toy.zip").prepare_data()


def empty_root(tmp: Path) -> None:
    (tmp / "toy").mkdir()
    image_folder(tmp).prepare_data()


def unknown_class_in_split_list(tmp: Path) -> None:
    class_folders(tmp / "toy")
    prepared(image_folder(tmp, train_classes=["class0", "class1"], val_classes=["kitten"], test_classes=["class3"]))


def class_in_two_splits(tmp: Path) -> None:
    class_folders(tmp / "toy")
    prepared(image_folder(tmp, train_classes=["class0", "class1"], val_classes=["class2"], test_classes=["class1"]))


def missing_split_file(tmp: Path) -> None:
    class_folders(tmp / "toy")
    prepared(image_folder(tmp, train_classes=["class0"], val_classes=["class2"], test_classes="test_classes.txt"))


def ways_above_classes(tmp: Path) -> None:
    class_folders(tmp / "toy")
    prepared(image_folder(tmp, episodes={"eval_ways": 2}))  # val and test hold 1 class each


class StepCounter(L.Callback):
    """Fails the test if a training step ran before the error under test."""

    def on_train_batch_start(self, *args) -> None:
        raise AssertionError("a training step ran before the configuration error was raised")


def maml_eval_ways_not_the_head(tmp: Path) -> None:
    """MAML's head is sized for model.ways; 1-way evaluation episodes would fail at the first validation, after
    training: refused in on_fit_start."""
    class_folders(tmp / "toy")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[StepCounter()])
    data = image_folder(tmp, image_size=16, episodes={"eval_ways": 1})
    trainer.fit(MAML(ways=2, image_shape=(1, 16, 16)), datamodule=data)


def omniglot_split_naming_missing_character(tmp: Path) -> None:
    fake_omniglot(tmp)
    with open(tmp / "omniglot" / "splits" / "vinyals" / "test.txt", "a") as f:
        f.write("Gamma/character07/rot000\n")
    prepared(omniglot(tmp))


def omniglot_corrupt_drawing(tmp: Path) -> None:
    fake_omniglot(tmp)
    with zipfile.ZipFile(tmp / "omniglot" / "images_evaluation.zip", "a") as zf:
        zf.writestr("images_evaluation/Beta/character03/0003_01.png", b"not a png")
    omniglot(tmp).prepare_data()


def omniglot_empty_root(tmp: Path) -> None:
    omniglot(tmp).prepare_data()


def mini_imagenet_csv_names_missing_image(tmp: Path) -> None:
    mini_imagenet(tmp, missing="n01100000001.jpg").prepare_data()


def mini_imagenet_bad_csv_header(tmp: Path) -> None:
    dm = mini_imagenet(tmp)
    (tmp / "mini" / "val.csv").write_text("file,class\nx.jpg,n0\n")
    dm.prepare_data()


def pickle_of_objects(tmp: Path) -> None:
    with open(tmp / "objects.pkl", "wb") as f:
        pickle.dump(collections.OrderedDict(image_data=np.zeros(2, np.uint8)), f)
    safe_load(tmp / "objects.pkl")


def truncated_pickle(tmp: Path) -> None:
    (tmp / "cut.pkl").write_bytes(pickle.dumps({"image_data": np.zeros((4, 8, 8, 3), np.uint8)})[:50])
    safe_load(tmp / "cut.pkl")


def idx_with_wrong_magic(tmp: Path) -> None:
    path = tmp / "images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x03" + bytes(12))
    read_idx(path)


def idx_truncated(tmp: Path) -> None:
    path = idx(tmp / "short-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-5])
    read_idx(path)


def multimnist_missing_files(tmp: Path) -> None:
    MultiMNIST(root=str(tmp)).prepare_data()


def best_checkpoint_deleted(tmp: Path) -> None:
    torch.save({"callbacks": {"ModelCheckpoint{'monitor': 'val/acc'}": {"best_model_path": str(tmp / "best.ckpt")}}},
               tmp / "last.ckpt")
    resolve_checkpoint_alias("best", str(tmp))


def cuda_without_gpu(tmp: Path) -> None:
    L.Trainer(accelerator="cuda", logger=False)


# ------------------------------------------------------------------ the catalogue


def expand(message: str, tmp: Path) -> str:
    """``message`` with ``{tmp}`` and the registry listings ``{balancers}`` / ``{weightings}`` filled in."""
    for key, value in (("{tmp}", str(tmp)), ("{balancers}", ", ".join(list_balancers())),
                       ("{weightings}", ", ".join(list_balancers("weighting")))):
        message = message.replace(key, value)
    return message


@dataclass(frozen=True)
class Case:
    id: str
    provoke: Callable[[Path], object]
    error: type[BaseException]
    message: str
    marks: tuple = ()


EXTENSIONS = ".png, .jpg, .jpeg, .bmp, .gif, .tif, .tiff, .webp"
NO_GPU = (pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),)

CASES = [
    # ---- data roots and files
    Case("image_folder_missing_root", lambda tmp: image_folder(tmp, path="nowhere").prepare_data(), FileNotFoundError,
         "image dataset {tmp}/nowhere does not exist. Pass --data.path (a class-per-folder directory or a .zip, "
         "relative to the data root {tmp} or absolute), --data.root or $LIGHTNING_MTL_DATA."),
    Case("image_folder_empty_root", empty_root, ValueError,
         "no images found in {tmp}/toy: expected <class>/<image>.png|.jpg|... folders or Tiny-ImageNet's "
         "train/<wnid>/images/*.JPEG (layout='auto')."),
    Case("omniglot_missing_root", lambda tmp: omniglot(tmp / "nowhere").prepare_data(), FileNotFoundError,
         "Omniglot data root {tmp}/nowhere does not exist. Pass --data.root, set $LIGHTNING_MTL_DATA, or create "
         "{tmp}/nowhere/omniglot/ holding images_background.zip and images_evaluation.zip."),
    Case("omniglot_empty_root_offline", omniglot_empty_root, FileNotFoundError,
         "Omniglot files are missing and download=False. Place them here:\n"
         f"  {{tmp}}/omniglot/images_background.zip  (from {OMNIGLOT_URL}/images_background.zip)\n"
         f"  {{tmp}}/omniglot/images_evaluation.zip  (from {OMNIGLOT_URL}/images_evaluation.zip)\n"
         "  {tmp}/omniglot/splits/vinyals/train.txt  (from https://raw.githubusercontent.com/jakesnell/"
         "prototypical-networks/master/data/omniglot/splits/vinyals/train.txt)\n"
         "  {tmp}/omniglot/splits/vinyals/val.txt  (from https://raw.githubusercontent.com/jakesnell/"
         "prototypical-networks/master/data/omniglot/splits/vinyals/val.txt)\n"
         "  {tmp}/omniglot/splits/vinyals/test.txt  (from https://raw.githubusercontent.com/jakesnell/"
         "prototypical-networks/master/data/omniglot/splits/vinyals/test.txt)"),
    Case("mini_imagenet_missing_folder", lambda tmp: MiniImageNetEpisodes(root=str(tmp)).prepare_data(),
         FileNotFoundError,
         "Mini-ImageNet folder {tmp}/miniimagenet does not exist. Pass --data.root / --data.path or set "
         "$LIGHTNING_MTL_DATA; it must hold images/ + train.csv, val.csv, test.csv, or the pickles "
         "mini-imagenet-cache-train.pkl, mini-imagenet-cache-validation.pkl, mini-imagenet-cache-test.pkl."),
    Case("multimnist_missing_idx_files", multimnist_missing_files, FileNotFoundError,
         "MultiMNIST needs the test IDX pair; missing: {tmp}/mnist/t10k-images-idx3-ubyte.gz, "
         "{tmp}/mnist/t10k-labels-idx1-ubyte.gz. Place the MNIST t10k files there, or pass --data.root / "
         "--data.test_images / --data.test_labels."),
    # ---- corrupt or foreign files (the message names the file)
    Case("corrupt_png", corrupt_png, ValueError,
         "corrupt or unreadable image {tmp}/toy/class1/2.png (not a recognised image format); replace it or remove "
         "it from the dataset."),
    Case("truncated_jpeg", truncated_jpeg, ValueError,
         "corrupt or unreadable image {tmp}/toy/class2/0.jpg (Truncated File Read); replace it or remove it from the "
         "dataset."),
    Case("corrupt_png_in_omniglot_zip", omniglot_corrupt_drawing, ValueError,
         "corrupt or unreadable image {tmp}/omniglot/images_evaluation.zip:images_evaluation/Beta/character03/"
         "0003_01.png (not a recognised image format); replace it with the original file."),
    Case("non_image_in_class_folder", non_image_in_class_folder, ValueError,
         f"{{tmp}}/toy: class3/notes.txt in class folder class3 is not an image (extensions {EXTENSIONS}); remove it "
         "from the class folder."),
    Case("empty_class_folder", empty_class_folder, ValueError,
         "{tmp}/toy: class folder(s) class9 hold no images; add images to them or remove them (an empty folder would "
         "silently not be a class)."),
    Case("not_a_zip", not_a_zip, ValueError,
         "{tmp}/toy.zip is not a readable zip archive (File is not a zip file); pass a folder or a zip. A truncated "
         "(partially downloaded) zip reads like this: replace it."),
    Case("idx_wrong_magic", idx_with_wrong_magic, IDXError,
         "{tmp}/images-idx3-ubyte: bad IDX magic number 12340803; expected 0000 <type> <ndim> (00000803 for MNIST "
         "images, 00000801 for labels). Is this an IDX file?"),
    Case("idx_truncated", idx_truncated, IDXError,
         "{tmp}/short-idx3-ubyte: header announces shape (4, 28, 28) (3136 data bytes) but the file holds 3131; it is "
         "truncated or corrupt."),
    Case("idx_labels_as_images", lambda tmp: read_mnist(mnist_pair(tmp)[1], mnist_pair(tmp)[1]), IDXError,
         "{tmp}/l.gz: IDX file of 1 dimensions, expected 3; check the path (MNIST images have 3 dimensions, labels "
         "1: are images and labels swapped?)."),
    Case("idx_image_label_count_mismatch", lambda tmp: read_mnist(*mnist_pair(tmp, images=3, labels=2)), IDXError,
         "{tmp}/i.gz holds 3 images but {tmp}/l.gz holds 2 labels; they are not a pair: pass the label file of these "
         "images."),
    Case("idx_label_out_of_range", lambda tmp: read_mnist(
        idx(tmp / "i.gz", np.zeros((2, 28, 28), np.uint8)), idx(tmp / "l.gz", np.array([3, 12], np.uint8))),
         IDXError, "{tmp}/l.gz: label 12 outside 0..9; is this an MNIST label file?"),
    Case("pickle_of_non_array_objects", pickle_of_objects, UnsafePickleError,
         "{tmp}/objects.pkl: refused global collections.OrderedDict; only numpy arrays and builtin containers may be "
         "loaded from this file. It is not a plain data pickle: do not load it with pickle.load."),
    Case("pickle_without_arrays", lambda tmp: mini_imagenet_pickles(tmp, {"image_data": [[0, 1]], "class_dict": {}})
         .prepare_data(), ValueError,
         "{tmp}/mini/mini-imagenet-cache-train.pkl: expected {'image_data': uint8 array (N, H, W, 3), 'class_dict': "
         "{wnid: [indices]}} as in learn2learn's mini-imagenet-cache files; re-download it."),
    Case("pickle_index_out_of_range", lambda tmp: mini_imagenet_pickles(
        tmp, {"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": {"n0": [0, 5]}}).prepare_data(),
         ValueError, "{tmp}/mini/mini-imagenet-cache-train.pkl: class_dict['n0'] holds indices outside 0..1; the "
         "file is damaged: re-download it."),
    Case("pickle_truncated", truncated_pickle, ValueError,
         "{tmp}/cut.pkl is not a readable pickle (UnpicklingError: pickle data was truncated); re-download it."),
    # ---- splits
    Case("split_list_unknown_class", unknown_class_in_split_list, ValueError,
         "val_classes: unknown class 'kitten'; {tmp}/toy has 5 classes (e.g. class0, class1, class2). Fix the class "
         "list."),
    Case("split_list_class_twice", class_in_two_splits, ValueError,
         "test_classes: class 'class1' is already in train_classes; each class belongs to one split."),
    Case("split_list_file_missing", missing_split_file, FileNotFoundError,
         "test_classes: class list test_classes.txt not found (looked in the working directory and under {tmp}); "
         "give a text file of one class per line or a list of names."),
    Case("split_list_missing_character", omniglot_split_naming_missing_character, ValueError,
         "{tmp}/omniglot/splits/vinyals/test.txt:5: character Gamma/character07 is not in the Omniglot archives under "
         "{tmp}/omniglot; fix the split list or use the complete archives."),
    Case("mini_imagenet_csv_names_missing_image", mini_imagenet_csv_names_missing_image, FileNotFoundError,
         "{tmp}/mini/val.csv names n01100000001.jpg, missing from {tmp}/mini/images; place the images there."),
    Case("mini_imagenet_bad_csv_header", mini_imagenet_bad_csv_header, ValueError,
         "{tmp}/mini/val.csv:1: expected the header 'filename,label', got 'file,class'."),
    # ---- episode shapes
    Case("ways_above_classes", ways_above_classes, ValueError,
         "ImageFolder toy/val: 2-way episodes need 2 classes but the split has only 1; lower the ways to at most 1."),
    Case("shots_plus_queries_above_images", lambda tmp: EpisodeSampler(np.zeros((5, 4, 1, 2, 2), np.uint8), 2, 2, 3,
                                                                       name="toy/train"), ValueError,
         "toy/train: shots + queries = 2 + 3 = 5 exceeds the 4 examples per class; lower shots or queries so that "
         "shots + queries <= 4."),
    Case("shots_plus_queries_above_omniglot_drawings",
         lambda tmp: omniglot(tmp, episodes={"train_shots": 5, "train_queries": 16}), ValueError,
         "episodes.train_shots + episodes.train_queries = 5 + 16 = 21 exceeds the 20 drawings of each Omniglot "
         "character; lower them to sum to at most 20."),
    Case("class_with_fewer_images_than_shots_plus_queries", class_with_too_few_images, ValueError,
         "ImageFolder toy/train: class class4 has 1 images but episodes need shots + queries = 1 + 1 = 2; add images "
         "to class4, move it out of this split, or lower shots / queries."),
    Case("zero_shots", lambda tmp: EpisodeSampler(np.zeros((5, 4, 1, 2, 2), np.uint8), 2, 0, 1, name="toy/train"),
         ValueError, "toy/train: shots must be >= 1, got 0"),
    Case("zero_val_episodes", lambda tmp: FixedEpisodes(EpisodeSampler(np.zeros((5, 4, 1, 2, 2), np.uint8), 2, 1, 1,
                                                                       name="toy/val"), 0, 0, "val"), ValueError,
         "toy/val: the number of val episodes must be >= 1, got 0"),
    Case("image_size_zero", lambda tmp: image_folder(tmp, image_size=0), ValueError,
         "image_size must be a positive number of pixels, got 0"),
    Case("image_size_negative", lambda tmp: MiniImageNetEpisodes(root=str(tmp), image_size=-84), ValueError,
         "image_size must be a positive number of pixels, got -84"),
    Case("omniglot_alphabets_image_size_zero", lambda tmp: OmniglotAlphabets(root=str(tmp), image_size=0),
         ValueError, "image_size must be a positive number of pixels, got 0"),
    Case("l2l_task_of_wrong_size", lambda tmp: episode_from_task(torch.zeros(6, 1), torch.tensor([0, 0, 1, 1, 2, 2]),
                                                                 ways=2, shots=1, queries=1), ValueError,
         "a learn2learn task must hold 2 classes x 2 examples (shots 1 + queries 1); got 3 classes with counts "
         "[2, 2, 2]. Sample tasks with NWays(dataset, 2) and KShots(dataset, 2)."),
    # ---- multi-task datamodules
    Case("multitask_unknown_mode", lambda tmp: OmniglotAlphabets(root=str(tmp), mode="max_size"), ValueError,
         "unknown mode 'max_size'; valid modes: max_size_cycle, min_size, sequential"),
    Case("multitask_sequential_training", lambda tmp: EmptyTrainSplit(mode="sequential").setup("fit"), ValueError,
         'mode="sequential" cannot train: Lightning\'s fit loop refuses CombinedLoader(mode="sequential"). Use '
         'mode="max_size_cycle" or "min_size"; "sequential" is for eval_mode.'),
    Case("multitask_empty_split", lambda tmp: EmptyTrainSplit().setup("fit"), ValueError,
         "EmptyTrainSplit: the train dataset of 'all tasks' has zero samples; check the split."),
    Case("omniglot_alphabets_bad_fractions", lambda tmp: OmniglotAlphabets(root=str(tmp), train_fraction=0.9),
         ValueError,
         "train/val/test fractions (0.9, 0.2, 0.3) must be positive, sum to 1 and give every split at least one of "
         "the 20 drawings per character (they give (18, 4, -2))."),
    # ---- the multi-task model: configuration
    Case("unknown_balancer", lambda tmp: mtl_model(balancer="pcgard"), ValueError,
         "unknown balancing method 'pcgard'; valid names: {balancers} (or the class path of a LossWeighting or "
         "GradientAggregator subclass)"),
    Case("balancer_argument_typo", lambda tmp: create_balancer("dwa", ["a", "b"], temp=2.0), TypeError,
         "invalid arguments for balancing method 'dwa' (DWA): DWA.__init__() got an unexpected keyword argument "
         "'temp'; its arguments are: temperature, period."),
    Case("fixed_weights_wrong_length",
         lambda tmp: mtl_model(balancer=functools.partial(FixedWeighting, weights=[1.0])), ValueError,
         "fixed weighting expected 2 weights (one per task ['a', 'b']), got 1; give the balancer's weights one weight "
         "per task, in task order."),
    Case("unknown_aggregation_level", lambda tmp: mtl_model(balancer="mgda", level="features"), ValueError,
         "level must be one of ('parameter', 'representation'), got 'features'"),
    Case("soft_sharing_with_gradient_aggregator", lambda tmp: mtl_model(
        balancer="pcgrad", backbone=None, architecture=lambda tasks: SoftSharing(tasks, nn.Flatten())), ValueError,
         "gradient aggregation (PCGrad) acts on shared parameters, and SoftSharing has none; use a loss weighting "
         "(e.g. balancer: equal, uncertainty, dwa, famo) or an architecture with shared parameters."),
    Case("architecture_and_backbone",
         lambda tmp: mtl_model(architecture=lambda tasks: SoftSharing(tasks, nn.Flatten())), ValueError,
         "give model architecture or backbone (a shortcut for HardSharing(backbone)), not both: pass the backbone "
         "inside the architecture's init_args."),
    Case("tasks_and_num_classes", lambda tmp: MultiTaskModule(tasks={"a": ClassificationTask(2)}, num_classes={"a": 2}),
         ValueError, "give model tasks or num_classes (a shortcut for classification tasks), not both"),
    Case("dense_task_on_vector_representation", lambda tmp: mtl_model(num_classes=None, tasks={
        "a": ClassificationTask(3), "seg": SegmentationTask(4)}), ValueError,
         "task 'seg' (SegmentationTask) cannot read the representation of shape (8,) that HardSharing gives it: "
         "SegmentationTask is a dense task: it needs a (C, H, W) representation, got (8,). Use a backbone or "
         "architecture whose output is a feature map (one that does not pool and flatten, e.g. a SegNet or ResNet "
         "encoder without its classifier)."),
    Case("no_tasks", lambda tmp: MultiTaskModule(num_classes={}), ValueError,
         "tasks / num_classes must name at least one task (or be null to take the datamodule's)"),
    Case("one_class_task", lambda tmp: MultiTaskModule(num_classes={"a": 3, "b": 1}, backbone=nn.Flatten(),
                                                       input_shape=(6,)), ValueError,
         "a classification task needs at least 2 classes, got num_classes=1"),
    Case("backbone_rejects_input_shape", lambda tmp: mtl_model(input_shape=(1, 28, 28)), ValueError,
         "HardSharing cannot take an input of input_shape=(1, 28, 28) (mat1 and mat2 shapes cannot be multiplied "
         "(2x784 and 6x8)); set model input_shape to the shape of one input, e.g. (C, H, W) for images."),
    Case("tasks_from_missing_datamodule", lambda tmp: fit(MultiTaskModule(), mtl_batch()), ValueError,
         "MultiTaskModule(tasks=None, num_classes=None) takes its tasks from the datamodule's `build_tasks()` or "
         "`num_classes`, but no datamodule was given; pass model tasks or num_classes."),
    # ---- the multi-task model: batches (checked on the first batch, before any update)
    Case("batch_not_a_multitask_batch", lambda tmp: fit(mtl_model(), {"x": torch.zeros(4, 6)}), TypeError,
         "expected a MultiTaskBatch, got dict; yield lightning_mtl.MultiTaskBatch(x, targets) from the datamodule."),
    Case("batch_tasks_not_the_heads", lambda tmp: fit(mtl_model(), MultiTaskBatch(torch.zeros(4, 6), {
        "a": torch.zeros(4, dtype=torch.long), "left": torch.zeros(4, dtype=torch.long)})), ValueError,
         "batch tasks ['a', 'left'] do not match the model's tasks ['a', 'b']; make the datamodule's task names "
         "match the model's."),
    Case("target_out_of_range", lambda tmp: fit(mtl_model(), mtl_batch(b=torch.tensor([0, 1, 2, 1]))), ValueError,
         "task 'b': target 2 is out of the head's range 0..1; fix num_classes or the labels."),
    Case("backbone_output_does_not_fit_heads", lambda tmp: fit(mtl_model(backbone=nn.Flatten()),
                                                                mtl_batch(torch.zeros(4, 2, 6))), ValueError,
         "HardSharing gives task 'a' a representation of shape (12,) for inputs of shape (2, 6), but its head was "
         "sized for (6,) from input_shape=(6,); set model input_shape to the shape of one input."),
    Case("nan_loss_raise", lambda tmp: fit(mtl_model(), mtl_batch(torch.full((4, 6), math.nan)),
                                           callbacks=[NonFiniteGuard("raise")]), FloatingPointError,
         "step 0: non-finite loss for task(s) ['a', 'b'] ([nan, nan]); stopping (nonfinite.mode='raise'). Lower the "
         "learning rate or check the data of these tasks."),
    Case("inf_loss_raise", lambda tmp: fit(MultiTaskModule(
        tasks={t: InfiniteLoss(c) for t, c in TASKS.items()}, backbone=nn.Flatten(), input_shape=(6,)), mtl_batch(),
        callbacks=[NonFiniteGuard("raise")]), FloatingPointError,
         "step 0: non-finite loss for task(s) ['a', 'b'] ([inf, inf]); stopping (nonfinite.mode='raise'). Lower the "
         "learning rate or check the data of these tasks."),
    # ---- meta-learners
    Case("meta_learner_given_multitask_batch", lambda tmp: fit(ProtoNet(), mtl_batch()), TypeError,
         "ProtoNet expected an Episode, got MultiTaskBatch; yield lightning_mtl.Episode batches from the datamodule "
         "(an episodic one, e.g. OmniglotEpisodes)."),
    Case("maml_ways_not_the_episodes", lambda tmp: MAML(ways=5).episode_logits(episode(ways=3), "train"), ValueError,
         "episodes are 3-way but the MAML head has 5 outputs; give the model and every stage of the datamodule the "
         "same ways (--model.ways, --data.episodes.train_ways, --data.episodes.eval_ways)."),
    Case("maml_eval_ways_not_the_head_before_training", maml_eval_ways_not_the_head, ValueError,
         "data.episodes.eval_ways=1 but MAML's head has model.ways=2 outputs, and one head serves every stage: set "
         "--data.episodes.eval_ways 2."),
    Case("maml_image_shape_not_the_episodes", lambda tmp: MAML(ways=2).episode_logits(episode(size=14), "train"),
         ValueError,
         "episodes hold images of shape (1, 14, 14) but the head was sized for image_shape (1, 28, 28); set model "
         "image_shape to the datamodule's (C, H, W)."),
    *[Case(f"{cls.__name__.lower()}_support_labels_not_one_per_image",
           lambda tmp, cls=cls: fit(cls(), episode(ways=2)._replace(support_y=torch.zeros(1, 3, dtype=torch.long))),
           ValueError,
           f"{cls.__name__}: support_y has shape (1, 3) but support_x holds (1, 2) (B, N) images; give one label per "
           f"support image") for cls in (ProtoNet, R2D2, MAML, Reptile, SiameseNetwork)],
    Case("episode_ways_not_the_support_set", lambda tmp: fit(MatchingNetwork(), episode(ways=2)._replace(ways=3)),
         ValueError,
         "MatchingNetwork: the support set has 2 examples, not a positive multiple of ways=3; set Episode.ways to the "
         "number of classes of the episode (ways * shots support examples)"),
    # ---- trainer and checkpoints
    Case("cuda_without_gpu", cuda_without_gpu, MisconfigurationException,
         "`CUDAAccelerator` can not run on your system since the accelerator is not available. The following "
         "accelerator(s) is available and can be passed into `accelerator` argument of `Trainer`: ['cpu'].",
         marks=NO_GPU),
    Case("unknown_precision", lambda tmp: L.Trainer(precision="8-mixed", logger=False), ValueError,
         "Precision '8-mixed' is invalid. Allowed precision values: ('transformer-engine', "
         "'transformer-engine-float16', '16-true', '16-mixed', 'bf16-true', 'bf16-mixed', '32-true', '64-true', 64, "
         "32, 16, '64', '32', '16', 'bf16')"),
    Case("ckpt_best_before_fit", lambda tmp: resolve_checkpoint_alias("best", str(tmp / "ckpt")), FileNotFoundError,
         "--ckpt_path best: no {tmp}/ckpt/last.ckpt; run `fit` with this config first."),
    Case("ckpt_best_deleted", best_checkpoint_deleted, FileNotFoundError,
         "--ckpt_path best: {tmp}/last.ckpt names no existing best checkpoint ('{tmp}/best.ckpt'); pass --ckpt_path "
         "last or a checkpoint file, or run `fit` again."),
    Case("ckpt_alias_without_dirpath", lambda tmp: resolve_checkpoint_alias("last", None), ValueError,
         "--ckpt_path last needs checkpoint.dirpath in the config to find the checkpoints."),
    Case("ckpt_file_missing", lambda tmp: resolve_checkpoint_alias(str(tmp / "epoch=3.ckpt"), None), FileNotFoundError,
         "--ckpt_path {tmp}/epoch=3.ckpt: no such checkpoint; pass an existing .ckpt file, or best / last to take "
         "them from checkpoint.dirpath after `fit`."),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice (few workers, ...) is not under test here
        with pytest.raises(case.error) as info:
            case.provoke(tmp_path)
    assert str(info.value) == expand(case.message, tmp_path)


def test_catalogue_ids_are_unique_and_many():
    ids = [c.id for c in CASES + CLI_CASES]
    assert len(set(ids)) == len(ids) and len(CASES) >= 30


def test_real_mini_imagenet_csvs_without_images():
    """The shared data holds the Ravi & Larochelle CSVs but not the images: the datamodule lists what is missing."""
    root = Path(os.environ.get("LIGHTNING_MTL_DATA") or REPO.parent / "shared" / "data").resolve()
    folder = root / "miniimagenet"
    if not (folder / "train.csv").exists() or (folder / "images").exists():
        pytest.skip("needs the real Mini-ImageNet CSVs without their images (../shared/data/miniimagenet)")
    with pytest.raises(FileNotFoundError) as info:
        MiniImageNetEpisodes(root=str(root)).prepare_data()
    assert str(info.value) == (
        "Mini-ImageNet images source is incomplete (or the pickles mini-imagenet-cache-train.pkl, "
        "mini-imagenet-cache-validation.pkl, mini-imagenet-cache-test.pkl); missing:\n"
        f"  {folder}/images")


# ------------------------------------------------------------------ non-finite losses under nonfinite.mode="skip"


def test_nan_loss_skip_warns_and_leaves_the_parameters():
    model = mtl_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning) as record:
        fit(model, mtl_batch(torch.full((4, 6), math.nan)))
    ours = [str(w.message) for w in record if "non-finite" in str(w.message)]
    assert ours == ["step 0: non-finite loss for task(s) ['a', 'b'] ([nan, nan]); step skipped "
                    "(nonfinite.mode='skip')."]
    for b, p in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)


# ------------------------------------------------------------------ command line and YAML (jsonargparse's messages)


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class CliCase:
    """``yaml`` (with ``{tmp}``) is written to ``{tmp}/config.yaml`` and passed with ``args``; jsonargparse exits with
    status 2 and prints ``line`` (exactly, after stripping) among its error lines."""

    id: str
    yaml: str
    args: tuple[str, ...]
    line: str


QUICK = ("model:\n  class_path: lightning_mtl.meta.ProtoNet\n"
         "data:\n  class_path: lightning_mtl.datamodules.OmniglotEpisodes\n")
CLI_CASES = [
    CliCase("yaml_unknown_init_arg", QUICK + "  init_args:\n    wayz: 5\n", (),
            "error: data: Option 'wayz' is not accepted"),
    CliCase("yaml_unknown_top_level_key", QUICK + "lr_sheduler: null\n", (),
            "error: Option 'lr_sheduler' is not accepted"),
    CliCase("yaml_wrong_type", QUICK + "  init_args:\n    episodes:\n      train_ways: five\n", (),
            "error: data.episodes.train_ways: Expected a <class 'int'>. Got value: five"),
    CliCase("yaml_flat_episode_setting", QUICK + "  init_args:\n    protocol: lake\n    train_ways: 5\n", (),
            "error: data.init_args.train_ways moved to data.init_args.episodes.train_ways: OmniglotEpisodes takes its "
            "episode settings (train_ways, train_shots, train_queries, eval_ways, eval_shots, eval_queries, "
            "meta_batch_size, eval_meta_batch_size, val_episodes, test_episodes, seed, eval_seed, num_workers, "
            "train_mode, train_batch_size, on_device) as one group, EpisodeSettings; move them under `episodes:` in "
            "the YAML, or write --data.episodes.train_ways on the command line."),
    CliCase("flat_episode_setting_on_the_command_line", QUICK, ("--data.init_args.num_workers=2",),
            "error: data.init_args.num_workers moved to data.init_args.episodes.num_workers: OmniglotEpisodes takes "
            "its episode settings (train_ways, train_shots, train_queries, eval_ways, eval_shots, eval_queries, "
            "meta_batch_size, eval_meta_batch_size, val_episodes, test_episodes, seed, eval_seed, num_workers, "
            "train_mode, train_batch_size, on_device) as one group, EpisodeSettings; move them under `episodes:` in "
            "the YAML, or write --data.episodes.num_workers on the command line."),
    CliCase("unknown_method_class", QUICK, ("--model.class_path=lightning_mtl.meta.ProtoNett",),
            "error: model: module 'lightning_mtl.meta' has no attribute 'ProtoNett'"),
    CliCase("unknown_backbone_class", QUICK, ("--model.backbone.class_path=lightning_mtl.nn.Conv5",),
            "error: model.backbone: module 'lightning_mtl.nn' has no attribute 'Conv5'"),
    CliCase("unknown_backbone_name", QUICK, ("--model.backbone=Conv44",),
            "error: model.backbone: no class named 'Conv44'; did you mean Conv4? valid names: ASPP, Conv4, "
            "ConvEncoderDecoder, DeepLabHead, DeepLabResNet50, DropBlock, ResNet12, ResNet18, SegNet, TimmBackbone "
            "(or the full class path of your own, e.g. my_module.MyClass)"),
    CliCase("unknown_method_name", QUICK, ("--model=ProtoNett",),
            "error: model: no class named 'ProtoNett'; did you mean ProtoNet? valid names: ANIL, EmbeddingBaseline, "
            "LearnedOptimizer, MAML, MatchingNetwork, MetaOptNet, MetaSGD, ProtoNet, R2D2, RelationNetwork, Reptile, "
            "SiameseNetwork, TRMAML (or the full class path of your own, e.g. my_module.MyClass)"),
    CliCase("unknown_subcommand", QUICK, ("fitt",),
            "error: argument subcommand: invalid choice: 'fitt' (choose from 'fit', 'validate', 'test')"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_bad_command_line(case: CliCase, tmp_path: Path, capsys, monkeypatch):
    fewshot = load_recipe("fewshot")
    monkeypatch.setattr(sys, "argv", ["fewshot.py"])
    config = tmp_path / "config.yaml"
    config.write_text(case.yaml.replace("{tmp}", str(tmp_path)))
    args = list(case.args) if case.args[:1] == ("fitt",) else ["fit", "--config", str(config), *case.args,
                                                                "--print_config"]
    with pytest.raises(SystemExit) as info:
        fewshot.main(args)
    assert info.value.code == 2
    lines = [line.strip() for line in capsys.readouterr().err.splitlines()]
    assert case.line in lines, "\n".join(lines[-15:])
    assert len(lines) <= 4, "\n".join(lines)  # the message, not the usage and jsonargparse's union report


def test_ckpt_best_before_fit_fails_before_data(tmp_path: Path, monkeypatch):
    """``test --ckpt_path best`` in a fresh process: the recipe says what to do before touching the (absent) data."""
    fewshot = load_recipe("fewshot")
    monkeypatch.setattr(sys, "argv", ["fewshot.py"])
    config = REPO / "recipes" / "configs" / "omniglot" / "protonet_5w1s_quick.yaml"
    with pytest.raises(FileNotFoundError) as info:
        fewshot.main(["test", "--config", str(config), "--ckpt_path=best", "--trainer.logger=false",
                      f"--data.root={tmp_path}/nodata", f"--checkpoint.dirpath={tmp_path}/ckpt"])
    assert str(info.value) == f"--ckpt_path best: no {tmp_path}/ckpt/last.ckpt; run `fit` with this config first."


# ------------------------------------------------------------------ combinations that used to fail late and now work


@pytest.mark.parametrize("make", [ProtoNet, lambda: SiameseNetwork(image_shape=(1, 28, 28)),
                                  lambda: MultiTaskModule(num_classes={"a": 2, "b": 2})],
                         ids=["protonet", "siamese", "mtl"])
def test_true_precision_takes_uint8_images(make):
    """``precision="bf16-true"`` (weights in bfloat16) with the datamodules' uint8 images: the images are converted to
    the model's dtype, not to float32 (which failed in the first step with a bare dtype error)."""
    model = make()
    batch = episode() if isinstance(model, ProtoNet | SiameseNetwork) else MultiTaskBatch(
        episode().query_x[0], {"a": torch.tensor([0, 1]), "b": torch.tensor([1, 0])})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(model, batch, precision="bf16-true")
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(("args", "expected"), [
    (("--model.ways=5",), "error: model.ways=5 contradicts data.episodes.train_ways=20: state it once, in the data "
                          "(remove model.ways; the model takes it from the data), or make the two equal."),
    (("--model.image_shape=[1,32,32]",), "error: model.image_shape=[1, 32, 32] contradicts the data's image "
                                         "shape=[1, 28, 28]: state it once, in the data (remove model.image_shape; "
                                         "the model takes it from the data), or make the two equal."),
])
def test_model_ways_or_image_shape_contradicting_the_data_fail_before_any_data(args, expected, tmp_path, capsys,
                                                                               monkeypatch):
    """ways and the image shape are stated once, in the data; a model value that contradicts it names both values
    before anything is read or trained."""
    from lightning_mtl.cli import run

    fewshot = load_recipe("fewshot")
    monkeypatch.setattr(sys, "argv", ["fewshot.py"])
    monkeypatch.setenv("LIGHTNING_MTL_DATA", str(tmp_path / "no_data_here"))
    config = REPO / "recipes" / "configs" / "omniglot" / "maml_20w1s_quick.yaml"
    with pytest.raises(SystemExit) as info:
        run(lambda: fewshot.main(["fit", "--config", str(config), *args, "--trainer.logger=false"]))
    assert info.value.code == 2
    lines = [line.strip() for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [expected]
    assert not (tmp_path / "no_data_here").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (("--model.balancer=pcgard",),
     "error: unknown balancing method 'pcgard'; valid names: {balancers} (or the class path of a LossWeighting or "
     "GradientAggregator subclass)"),
    (("--model.balancer=lightning_mtl.mtl.balancing.aggregators.CAGrad", "--model.balancer.init_args.c=abc"),
     "error: model.balancer.c: Expected a <class 'float'>. Got value: abc."),
    (("--model.architecture=MTANN",),
     "error: model.architecture: no class named 'MTANN'; did you mean MTAN? valid names: CGC, CrossStitch, DSelectK, "
     "HardSharing, LTB, MMoE, MTAN, PLE, SoftSharing (or the full class path of your own, e.g. my_module.MyClass)"),
    (("--model.architecture.backbone=Conv44",),
     "error: model.architecture.backbone: no class named 'Conv44'; did you mean Conv4? valid names: ASPP, Conv4, "
     "ConvEncoderDecoder, DeepLabHead, DeepLabResNet50, DropBlock, ResNet12, ResNet18, SegNet, TimmBackbone (or the "
     "full class path of your own, e.g. my_module.MyClass)"),
    (("--model.balancer=cagrad", "--model.balancer.init_args.c=0.3"),
     "'cagrad' is a registered name and takes no arguments; to give arguments, name its class: --model.balancer "
     "CAGrad (or class_path lightning_mtl.mtl.balancing.aggregators.CAGrad in YAML) with "
     "--model.balancer.init_args.<name> <value>"),
])
def test_multitask_balancer_mistakes_are_one_message_before_any_data(args, expected, tmp_path, capsys, monkeypatch):
    """A misspelled balancer, architecture or backbone, a wrong-typed argument, arguments given to a registered name:
    a few lines naming the option and the fix, printed by the recipe's entry point without a traceback (before: 72
    lines, two chained tracebacks and a Namespace dump)."""
    from lightning_mtl.cli import run

    multitask = load_recipe("multitask")
    monkeypatch.setattr(sys, "argv", ["multitask.py"])
    monkeypatch.setenv("LIGHTNING_MTL_DATA", str(tmp_path / "no_data_here"))  # fails before reading data
    config = REPO / "recipes" / "configs" / "multimnist" / "hps_equal_quick.yaml"
    with pytest.raises(SystemExit) as info:
        run(lambda: multitask.main(["fit", "--config", str(config), *args, "--trainer.logger=false"]))
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    assert expand(expected, tmp_path) in lines and len(lines) <= 3, err
    assert "Traceback" not in err
