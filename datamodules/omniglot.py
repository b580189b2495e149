"""Omniglot (Lake et al., Science 2015) as N-way K-shot episodes.

Protocols:
    * ``vinyals`` (Vinyals et al., NeurIPS 2016; split files of Snell et al., NeurIPS 2017): classes are
      (character, rotation) pairs listed in ``splits/vinyals/{train,val,test,trainval}.txt``, 4112 / 688 / 1692 /
      4800 classes (1028 / 172 / 423 / 1200 characters x 4 rotations of 0, 90, 180, 270 degrees).
    * ``lake`` (Lake et al. 2015): the 964 characters of the 30 background alphabets train, the 659 characters of the
      20 evaluation alphabets test, no rotations. The protocol has no validation alphabets, so validation episodes
      are drawn from the training characters (a fit monitor; select checkpoints with ``last`` for this protocol).

Layout under the data root (``--data.root`` → ``$LIGHTNING_MTL_DATA`` → ``./data``)::

    omniglot/images_background.zip   (or the extracted folder omniglot/images_background/)
    omniglot/images_evaluation.zip   (or omniglot/images_evaluation/)
    omniglot/splits/vinyals/{train,val,test,trainval}.txt

Images are decoded once in ``prepare_data``, resized (Lanczos) to ``image_size`` and inverted so strokes are 255 on
a 0 background, and cached as one uint8 tensor in the cache directory; the cache file name carries a hash of the
source archives and the settings, so changed sources or settings produce a new cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader

from lightning_mtl.datamodules._download import DownloadError, download_file, file_digest
from lightning_mtl.datamodules._paths import resolve_cache_dir, resolve_data_root
from lightning_mtl.datamodules.episodes import EpisodeSampler, EpisodeStream, FixedEpisodes

ARCHIVES = ("images_background", "images_evaluation")
DRAWINGS_PER_CHARACTER = 20
# Official archives (github.com/brendenlake/omniglot) and their md5 digests.
ARCHIVE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{name}.zip"
ARCHIVE_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
# Vinyals split lists as published with Snell et al.'s prototypical-networks code.
SPLIT_URL = "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/omniglot/splits/vinyals/{split}.txt"
SPLIT_SHA256 = {
    "train": "984522c194c30fb678ce53304a160a42faf5403ad4f9a67010f32dd3a35738e0",
    "val": "11f99e54faee3e26f53d3231c1cceac5bf7b8730e9be31cb6dab256551dc0c1a",
    "test": "845264cc5c156180828ccf17915668b17ee21424d0170df6e7d81676aa5d1204",
    "trainval": "5276ae50c755596d0bff7f2284e85625695549a85ee6e36b6491ad1e5d1cc26a",
}
CACHE_VERSION = 1
_SPLIT_LINE = re.compile(r"^(?P<char>[^/]+/character\d+)/rot(?P<rot>000|090|180|270)$")


class OmniglotEpisodes(L.LightningDataModule):
    """Omniglot N-way K-shot Q-query episodes.

    Args:
        root: data root holding ``omniglot/``; ``None`` → ``$LIGHTNING_MTL_DATA`` → ``./data``.
        protocol: ``"vinyals"`` (character x rotation classes from the split lists) or ``"lake"``
            (background alphabets train, evaluation alphabets test).
        train_split: classes to train on under ``vinyals``: ``"train"`` or ``"trainval"`` (final runs).
        image_size: side of the square images after resizing.
        cache_dir: writable directory for the decoded cache; ``None`` → ``$LIGHTNING_MTL_CACHE`` →
            ``~/.cache/lightning_mtl``.
        download: fetch missing archives and split lists from their official URLs (checksums verified).
        train_ways: classes per training episode.
        train_shots: support examples per class in training episodes.
        train_queries: query examples per class in training episodes.
        eval_ways: classes per validation / test episode.
        eval_shots: support examples per class in validation / test episodes.
        eval_queries: query examples per class in validation / test episodes.
        meta_batch_size: training episodes per step.
        eval_meta_batch_size: evaluation episodes per batch (affects speed only, never the episodes).
        val_episodes: size of the fixed validation set.
        test_episodes: size of the fixed test set.
        seed: seed of the training episode streams.
        eval_seed: seed of the fixed validation and test sets; keep it fixed to compare models.
        num_workers: dataloader worker processes.
    """

    def __init__(
        self,
        root: str | None = None,
        protocol: Literal["vinyals", "lake"] = "vinyals",
        train_split: Literal["train", "trainval"] = "train",
        image_size: int = 28,
        cache_dir: str | None = None,
        download: bool = True,
        train_ways: int = 5,
        train_shots: int = 1,
        train_queries: int = 15,
        eval_ways: int = 5,
        eval_shots: int = 1,
        eval_queries: int = 15,
        meta_batch_size: int = 1,
        eval_meta_batch_size: int = 16,
        val_episodes: int = 600,
        test_episodes: int = 1000,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if protocol not in ("vinyals", "lake"):
            raise ValueError(f"protocol must be 'vinyals' or 'lake', got {protocol!r}")
        if train_split not in ("train", "trainval"):
            raise ValueError(f"train_split must be 'train' or 'trainval', got {train_split!r}")
        if image_size <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        shots_queries = (("train", train_shots, train_queries), ("eval", eval_shots, eval_queries))
        for stage, shots, queries in shots_queries:
            if shots + queries > DRAWINGS_PER_CHARACTER:
                raise ValueError(
                    f"{stage}_shots + {stage}_queries = {shots} + {queries} = {shots + queries} exceeds the "
                    f"{DRAWINGS_PER_CHARACTER} drawings of each Omniglot character; lower them to sum to at most "
                    f"{DRAWINGS_PER_CHARACTER}."
                )
        self.save_hyperparameters()
        self.root = resolve_data_root(root)
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.samplers: dict[str, EpisodeSampler] = {}

    # ------------------------------------------------------------------ sources
    @property
    def omniglot_dir(self) -> Path:
        return self.root / "omniglot"

    def _source(self, name: str) -> Path | None:
        for candidate in (self.omniglot_dir / f"{name}.zip", self.omniglot_dir / name):
            if candidate.exists():
                return candidate
        return None

    def _split_file(self, split: str) -> Path:
        return self.omniglot_dir / "splits" / "vinyals" / f"{split}.txt"

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Omniglot data root {self.root} does not exist. Pass --data.root, set $LIGHTNING_MTL_DATA, or create "
                f"{self.root}/omniglot/ holding images_background.zip and images_evaluation.zip."
            )

    def _fetch_missing(self) -> None:
        """Download what is missing (archives, and split lists for ``vinyals``), or say what to place where."""
        missing = [(n, ARCHIVE_URL.format(name=n), ARCHIVE_MD5[n], "md5", self.omniglot_dir / f"{n}.zip")
                   for n in ARCHIVES if self._source(n) is None]
        if self.hparams.protocol == "vinyals":
            missing += [(s, SPLIT_URL.format(split=s), SPLIT_SHA256[s], "sha256", self._split_file(s))
                        for s in self._needed_splits() if not self._split_file(s).exists()]
        if not missing:
            return
        wanted = "\n".join(f"  {dest}  (from {url})" for _, url, _, _, dest in missing)
        if not self.hparams.download:
            raise FileNotFoundError(f"Omniglot files are missing and download=False. Place them here:\n{wanted}")
        try:
            for _, url, checksum, algorithm, dest in missing:
                download_file(url, dest, checksum=checksum, algorithm=algorithm)
        except (DownloadError, PermissionError) as e:
            raise FileNotFoundError(
                f"Omniglot files are missing and could not be downloaded ({e}). Place them here:\n{wanted}"
            ) from e

    def _needed_splits(self) -> tuple[str, ...]:
        return (self.hparams.train_split, "val", "test")

    def _sources_digest(self) -> str:
        """Hash of the source archives (content) or folders (relative paths, sizes, mtimes) and the settings."""
        h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "size": self.hparams.image_size}).encode())
        for name in ARCHIVES:
            src = self._source(name)
            assert src is not None
            if src.is_file():
                h.update(file_digest(src).encode())
            else:
                for p in sorted(src.rglob("*.png")):
                    st = p.stat()
                    h.update(f"{p.relative_to(src)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def cache_path(self) -> Path:
        """The decoded-image cache of the current sources and settings."""
        return self.cache_dir / f"omniglot-{self.hparams.image_size}px-{self._sources_digest()}.pt"

    # ------------------------------------------------------------------ decoding
    def _iter_drawings(self, name: str) -> Iterator[tuple[str, str, bytes]]:
        """(``Alphabet/characterNN``, file name, PNG bytes) for every drawing of one archive or folder."""
        src = self._source(name)
        assert src is not None
        if src.is_file():
            with zipfile.ZipFile(src) as zf:
                for info in zf.infolist():
                    parts = info.filename.split("/")
                    if info.is_dir() or not info.filename.endswith(".png"):
                        continue
                    if len(parts) != 4 or parts[0] != name:
                        raise ValueError(
                            f"{src}: unexpected member {info.filename!r}; expected "
                            f"{name}/<Alphabet>/characterNN/<drawing>.png (the official archive layout)."
                        )
                    yield f"{parts[1]}/{parts[2]}", f"{src}:{info.filename}", zf.read(info)
        else:
            for p in sorted(src.glob("*/*/*.png")):
                yield f"{p.parent.parent.name}/{p.parent.name}", str(p), p.read_bytes()

    def _decode(self, data: bytes, where: str) -> np.ndarray:
        size = self.hparams.image_size
        try:
            with Image.open(io.BytesIO(data)) as img:
                img = img.convert("L").resize((size, size), Image.Resampling.LANCZOS)
                return 255 - np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"corrupt or unreadable image {where} ({e}); replace it with the original file.") from e

    def _build_cache(self, path: Path) -> None:
        characters: dict[str, list[tuple[str, np.ndarray]]] = {}
        archive_of: dict[str, str] = {}
        for name in ARCHIVES:
            for char, where, data in self._iter_drawings(name):
                characters.setdefault(char, []).append((where, self._decode(data, where)))
                archive_of[char] = name
        if not characters:
            raise ValueError(f"no Omniglot drawings found under {self.omniglot_dir}; check the archives.")
        names = sorted(characters, key=lambda c: (archive_of[c], c))
        for char in names:
            if len(characters[char]) != DRAWINGS_PER_CHARACTER:
                raise ValueError(
                    f"Omniglot character {char} has {len(characters[char])} drawings, expected "
                    f"{DRAWINGS_PER_CHARACTER}; the archive is incomplete, replace it with the official one."
                )
        images = np.stack([np.stack([img for _, img in sorted(characters[c])]) for c in names])
        payload = {
            "images": torch.from_numpy(images).unsqueeze(2),  # (characters, 20, 1, H, W) uint8
            "characters": names,
            "background": [archive_of[c] == "images_background" for c in names],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: a killed run never leaves a truncated cache behind

    def _load_cache(self, path: Path) -> dict | None:
        try:
            payload = torch.load(path, weights_only=True)
            if payload["images"].dtype != torch.uint8 or len(payload["characters"]) != payload["images"].shape[0]:
                raise ValueError("inconsistent cache contents")
            return payload
        except FileNotFoundError:
            return None
        except Exception as e:  # a truncated or foreign file: rebuild rather than fail
            warnings.warn(f"Omniglot cache {path} is unreadable ({e}); rebuilding it.", stacklevel=2)
            return None

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        self._check_root()
        self._fetch_missing()
        path = self.cache_path()
        if self._load_cache(path) is None:
            self._build_cache(path)

    def _split_classes(self, payload: dict, split: str) -> np.ndarray:
        """``(classes, 20, 1, H, W)`` images of one split (rotations applied)."""
        images = payload["images"].numpy()
        index = {c: i for i, c in enumerate(payload["characters"])}
        if self.hparams.protocol == "lake":
            background = np.asarray(payload["background"])
            return images[background] if split in ("train", "val") else images[~background]
        path = self._split_file(split)
        if not path.exists():
            raise FileNotFoundError(f"missing Vinyals split list {path}; place {split}.txt there (or enable download).")
        out = []
        for n, line in enumerate(path.read_text().split(), start=1):
            m = _SPLIT_LINE.match(line)
            if m is None:
                raise ValueError(f"{path}:{n}: malformed line {line!r}; expected Alphabet/characterNN/rotDDD.")
            if m["char"] not in index:
                raise ValueError(
                    f"{path}:{n}: character {m['char']} is not in the Omniglot archives under {self.omniglot_dir}; "
                    f"fix the split list or use the complete archives."
                )
            out.append(np.rot90(images[index[m["char"]]], k=int(m["rot"]) // 90, axes=(-2, -1)))
        return np.ascontiguousarray(np.stack(out))

    def setup(self, stage: str | None = None) -> None:
        if self.samplers:
            return
        self._check_root()
        payload = self._load_cache(self.cache_path())
        if payload is None:
            raise RuntimeError(f"no Omniglot cache at {self.cache_path()}: call prepare_data() before setup().")
        hp = self.hparams
        train_split = hp.train_split if hp.protocol == "vinyals" else "train"
        splits = {"train": train_split, "val": "val", "test": "test"}
        for stage_name, split in splits.items():
            classes = self._split_classes(payload, split)
            train = stage_name == "train"
            self.samplers[stage_name] = EpisodeSampler(
                classes,
                ways=hp.train_ways if train else hp.eval_ways,
                shots=hp.train_shots if train else hp.eval_shots,
                queries=hp.train_queries if train else hp.eval_queries,
                meta_batch_size=hp.meta_batch_size if train else hp.eval_meta_batch_size,
                name=f"Omniglot {hp.protocol}/{split}",
            )

    def num_classes(self, stage: str) -> int:
        """Number of classes of ``stage`` (``"train"``, ``"val"`` or ``"test"``) after :meth:`setup`."""
        return self.samplers[stage].num_classes

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)

    def _loader(self, dataset) -> DataLoader:
        workers = self.hparams.num_workers
        # batch_size=None: the datasets yield whole meta-batches, so no collation happens.
        return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        rank, _ = self._rank()
        return self._loader(EpisodeStream(self.samplers["train"], self.hparams.seed, rank=rank))

    def _eval_dataloader(self, stage: str) -> DataLoader:
        rank, world = self._rank()
        count = self.hparams.val_episodes if stage == "val" else self.hparams.test_episodes
        return self._loader(FixedEpisodes(self.samplers[stage], count, self.hparams.eval_seed, stage, rank, world))

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")
