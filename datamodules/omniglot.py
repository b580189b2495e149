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
source archives and the settings, so changed sources or settings produce a new cache. Decoding and caching live in
``_omniglot_archives.py``, shared with :class:`~lightning_mtl.datamodules.OmniglotAlphabets`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np

from lightning_mtl.datamodules._episodic import EpisodeSettings, EpisodicImages
from lightning_mtl.datamodules._omniglot_archives import DRAWINGS_PER_CHARACTER, OmniglotArchives
from lightning_mtl.datamodules._paths import resolve_cache_dir, resolve_data_root
from lightning_mtl.datamodules.episodes import EpisodeSampler

# Vinyals split lists as published with Snell et al.'s prototypical-networks code.
SPLIT_URL = "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/omniglot/splits/vinyals/{split}.txt"
SPLIT_SHA256 = {
    "train": "984522c194c30fb678ce53304a160a42faf5403ad4f9a67010f32dd3a35738e0",
    "val": "11f99e54faee3e26f53d3231c1cceac5bf7b8730e9be31cb6dab256551dc0c1a",
    "test": "845264cc5c156180828ccf17915668b17ee21424d0170df6e7d81676aa5d1204",
    "trainval": "5276ae50c755596d0bff7f2284e85625695549a85ee6e36b6491ad1e5d1cc26a",
}
_SPLIT_LINE = re.compile(r"^(?P<char>[^/]+/character\d+)/rot(?P<rot>000|090|180|270)$")


class OmniglotEpisodes(EpisodicImages):
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
        family_episodes: draw every episode's classes from one alphabet (uniform over the alphabets with enough
            characters) and label the episode with it (``Episode.family``, the alphabet's index among the split's
            alphabets): the task families of TR-MAML and of per-alphabet evaluation (``val/worst_family_acc``).
        episodes: shapes, counts and seeds of the episodes: see :class:`~lightning_mtl.datamodules.EpisodeSettings`.
    """

    @classmethod
    def image_shape_for(cls, init_args: dict) -> tuple[int, int, int]:
        """``(C, image_size, image_size)``: see :meth:`EpisodicImages.image_shape_for`."""
        return cls._square(init_args, 1)

    def __init__(
        self,
        root: str | None = None,
        protocol: Literal["vinyals", "lake"] = "vinyals",
        train_split: Literal["train", "trainval"] = "train",
        image_size: int = 28,
        cache_dir: str | None = None,
        download: bool = True,
        family_episodes: bool = False,
        episodes: EpisodeSettings | None = None,
    ) -> None:
        super().__init__(episodes)
        if protocol not in ("vinyals", "lake"):
            raise ValueError(f"protocol must be 'vinyals' or 'lake', got {protocol!r}")
        if train_split not in ("train", "trainval"):
            raise ValueError(f"train_split must be 'train' or 'trainval', got {train_split!r}")
        if image_size <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        e = self.episodes
        for stage, shots, queries in (("train", e.train_shots, e.train_queries),
                                      ("eval", e.eval_shots, e.eval_queries)):
            if shots + queries > DRAWINGS_PER_CHARACTER:
                raise ValueError(
                    f"episodes.{stage}_shots + episodes.{stage}_queries = {shots} + {queries} = {shots + queries} "
                    f"exceeds the {DRAWINGS_PER_CHARACTER} drawings of each Omniglot character; lower them to sum to "
                    f"at most {DRAWINGS_PER_CHARACTER}."
                )
        self.save_hyperparameters()
        self.root = resolve_data_root(root)
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.archives = OmniglotArchives(self.root, self.cache_dir, image_size, download)

    # ------------------------------------------------------------------ sources
    @property
    def omniglot_dir(self) -> Path:
        return self.archives.omniglot_dir

    def _split_file(self, split: str) -> Path:
        return self.omniglot_dir / "splits" / "vinyals" / f"{split}.txt"

    def _needed_splits(self) -> tuple[str, ...]:
        return (self.hparams.train_split, "val", "test")

    def cache_path(self) -> Path:
        """The decoded-image cache of the current sources and settings."""
        return self.archives.cache_path()

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        self.archives.check_root()
        extra = []
        if self.hparams.protocol == "vinyals":
            extra = [(SPLIT_URL.format(split=s), SPLIT_SHA256[s], "sha256", self._split_file(s))
                     for s in self._needed_splits()]
        self.archives.fetch_missing(extra)
        self.archives.prepare()

    def split_families(self, payload: dict, split: str) -> np.ndarray:
        """The alphabet of every class of ``split`` (in the order of :meth:`_split_classes`), as indices into the
        split's sorted alphabet names (:meth:`family_names`)."""
        alphabets = [c.split("/")[0] for c in self._split_names(payload, split)]
        names = sorted(set(alphabets))
        return np.asarray([names.index(a) for a in alphabets], dtype=np.int64)

    def family_names(self, stage: str) -> list[str]:
        """The alphabets of ``stage``, in the order of ``Episode.family`` indices (after :meth:`setup`)."""
        hp = self.hparams
        split = {"train": hp.train_split if hp.protocol == "vinyals" else "train"}.get(stage, stage)
        return sorted({c.split("/")[0] for c in self._split_names(self.archives.load(), split)})

    def _split_names(self, payload: dict, split: str) -> list[str]:
        """``Alphabet/characterNN`` of every class of ``split``, in the order of :meth:`_split_classes`."""
        if self.hparams.protocol == "lake":
            background = np.asarray(payload["background"])
            keep = background if split in ("train", "val") else ~background
            return [c for c, k in zip(payload["characters"], keep, strict=True) if k]
        return [_SPLIT_LINE.match(line)["char"] for line in self._split_file(split).read_text().split()
                if _SPLIT_LINE.match(line)]

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
        self.archives.check_root()
        payload = self.archives.load()
        hp = self.hparams
        train_split = hp.train_split if hp.protocol == "vinyals" else "train"
        splits = {"train": train_split, "val": "val", "test": "test"}
        for stage_name, split in splits.items():
            ways, shots, queries, batch = self.episodes.shape(stage_name)
            families = self.split_families(payload, split) if hp.family_episodes else None
            self.samplers[stage_name] = EpisodeSampler(self._split_classes(payload, split), ways, shots, queries,
                                                       batch, name=f"Omniglot {hp.protocol}/{split}",
                                                       families=families)
