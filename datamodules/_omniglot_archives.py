"""The Omniglot archives under a data root, decoded once into a uint8 cache shared by the Omniglot datamodules.

Layout under the data root::

    omniglot/images_background.zip   (or the extracted folder omniglot/images_background/)
    omniglot/images_evaluation.zip   (or omniglot/images_evaluation/)

Images are resized (Lanczos) to ``image_size`` and inverted so strokes are 255 on a 0 background, then cached as one
``(characters, 20, 1, H, W)`` uint8 tensor; the cache file name carries a hash of the source archives (by content)
or folders (by path, size and mtime) and the settings, so changed sources or settings produce a new cache, and every
datamodule with the same ``image_size`` reuses the same file. A cache that is unreadable or inconsistent is rebuilt
with a warning; caches are written atomically (see :func:`~lightning_mtl.datamodules._images.save_cache`).

Archives are read in place, never extracted, through :class:`~lightning_mtl.datamodules._images.FileTree`, which
refuses members with ``..`` or absolute paths, links and special files. Files already present are used as they are
(rebuilt or repacked copies of Omniglot differ byte-wise from the official archives); only downloads are checked
against the official checksums, and a truncated or damaged archive fails on its zip directory or member CRCs.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lightning_mtl.datamodules._download import DownloadError, download_file, file_digest
from lightning_mtl.datamodules._images import FileTree, save_cache

ARCHIVES = ("images_background", "images_evaluation")
DRAWINGS_PER_CHARACTER = 20
# Official archives (github.com/brendenlake/omniglot) and their md5 digests.
ARCHIVE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{name}.zip"
ARCHIVE_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
CACHE_VERSION = 1

#: a file to fetch when missing: (url, checksum, algorithm, destination)
ExtraFile = tuple[str, str, str, Path]


class OmniglotArchives:
    """The two Omniglot archives of a data root and their decoded cache.

    Args:
        root: data root holding ``omniglot/``.
        cache_dir: writable directory of the decoded cache.
        image_size: side of the square images after resizing.
        download: fetch missing archives from their official URLs (checksums verified).
    """

    def __init__(self, root: Path, cache_dir: Path, image_size: int, download: bool) -> None:
        self.root, self.cache_dir, self.image_size, self.download = root, cache_dir, image_size, download

    @property
    def omniglot_dir(self) -> Path:
        return self.root / "omniglot"

    def source(self, name: str) -> Path | None:
        """The archive ``name`` as a zip file or an extracted folder; ``None`` when neither exists."""
        for candidate in (self.omniglot_dir / f"{name}.zip", self.omniglot_dir / name):
            if candidate.exists():
                return candidate
        return None

    def check_root(self) -> None:
        """A missing data root is created when downloading is on (the downloads fill it); otherwise an error says
        where the archives go."""
        if not self.root.is_dir() and self.download:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise FileNotFoundError(f"Omniglot data root {self.root} does not exist and cannot be created ({e}). "
                                        f"Pass --data.root or set $LIGHTNING_MTL_DATA to a writable folder.") from e
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Omniglot data root {self.root} does not exist. Pass --data.root, set $LIGHTNING_MTL_DATA, or create "
                f"{self.root}/omniglot/ holding images_background.zip and images_evaluation.zip."
            )

    def fetch_missing(self, extra: Sequence[ExtraFile] = ()) -> None:
        """Download the missing archives and ``extra`` files, or say what to place where.

        Raises:
            FileNotFoundError: files are missing and ``download`` is off or the download failed.
        """
        missing = [(ARCHIVE_URL.format(name=n), ARCHIVE_MD5[n], "md5", self.omniglot_dir / f"{n}.zip")
                   for n in ARCHIVES if self.source(n) is None]
        missing += [f for f in extra if not f[3].exists()]
        if not missing:
            return
        wanted = "\n".join(f"  {dest}  (from {url})" for url, _, _, dest in missing)
        if not self.download:
            raise FileNotFoundError(f"Omniglot files are missing and download=False. Place them here:\n{wanted}")
        try:
            for url, checksum, algorithm, dest in missing:
                download_file(url, dest, checksum=checksum, algorithm=algorithm)
        except (DownloadError, PermissionError) as e:
            raise FileNotFoundError(
                f"Omniglot files are missing and could not be downloaded ({e}). Place them here:\n{wanted}"
            ) from e

    def _sources_digest(self) -> str:
        """Hash of the source archives (content) or folders (relative paths, sizes, mtimes) and the settings."""
        h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "size": self.image_size}).encode())
        for name in ARCHIVES:
            src = self.source(name)
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
        return self.cache_dir / f"omniglot-{self.image_size}px-{self._sources_digest()}.pt"

    def prepare(self) -> None:
        """Decode the archives into the cache unless a readable cache of the same sources and settings exists."""
        path = self.cache_path()
        if self._load_cache(path) is None:
            self._build_cache(path)

    def load(self) -> dict:
        """The cache: ``images`` ``(characters, 20, 1, H, W)`` uint8, ``characters`` (``Alphabet/characterNN``,
        background archive first, then sorted) and ``background`` (one bool per character).

        Raises:
            RuntimeError: no cache yet (``prepare`` was not called).
        """
        payload = self._load_cache(self.cache_path())
        if payload is None:
            raise RuntimeError(f"no Omniglot cache at {self.cache_path()}: call prepare_data() before setup().")
        return payload

    def _iter_drawings(self, name: str) -> Iterator[tuple[str, str, bytes]]:
        """(``Alphabet/characterNN``, file name, PNG bytes) for every drawing of one archive or folder.

        :class:`FileTree` refuses unsafe members (``..``, absolute paths, links) before any becomes a character name.
        """
        src = self.source(name)
        assert src is not None
        in_zip = src.is_file()
        with FileTree(src) as tree:
            for member in tree.files():
                parts = member.split("/")
                if not member.endswith(".png") or (not in_zip and len(parts) != 3):
                    continue
                if in_zip and (len(parts) != 4 or parts[0] != name):
                    raise ValueError(
                        f"{src}: unexpected member {member!r}; expected "
                        f"{name}/<Alphabet>/characterNN/<drawing>.png (the official archive layout)."
                    )
                yield f"{parts[-3]}/{parts[-2]}", tree.where(member), tree.read(member)

    def _decode(self, data: bytes, where: str) -> np.ndarray:
        size = self.image_size
        try:
            with Image.open(io.BytesIO(data)) as img:
                img = img.convert("L").resize((size, size), Image.Resampling.LANCZOS)
                return 255 - np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            # PIL's UnidentifiedImageError message names an in-memory buffer (an address), not the file
            reason = "not a recognised image format" if isinstance(e, UnidentifiedImageError) else e
            raise ValueError(f"corrupt or unreadable image {where} ({reason}); replace it with the original "
                             f"file.") from e

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
        save_cache(path, payload)  # atomic: a killed run never leaves a truncated cache behind

    def _load_cache(self, path: Path) -> dict | None:
        try:
            payload = torch.load(path, weights_only=True)  # refuses pickled code: a cache is never trusted blindly
            images, size = payload["images"], self.image_size
            if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (DRAWINGS_PER_CHARACTER, 1, size, size) \
                    or not len(payload["characters"]) == len(payload["background"]) == images.shape[0]:
                raise ValueError("inconsistent cache contents")
            return payload
        except FileNotFoundError:
            return None
        except Exception as e:  # a truncated or foreign file: rebuild rather than fail
            warnings.warn(f"Omniglot cache {path} is unreadable ({e}); rebuilding it.", stacklevel=1)
            return None
