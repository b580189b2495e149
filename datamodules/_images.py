"""Image decoding, safe listing of image folders and zip archives, and the uint8 image cache.

The cache is one ``torch.save`` file in the writable cache directory (never the data root, which may be read-only)
holding ``images`` ``(N, C, H, W)`` uint8 (class-major), ``classes`` and ``counts`` (images per class) plus extra
entries of the caller. Its name carries a hash of the sources and the settings; an unreadable cache is rebuilt with a
warning, and a new one is written atomically so that a killed run never leaves a truncated file behind.

Source hashes: a zip archive is hashed by content (one sequential read, small next to decoding it), a folder by the
relative path, size and modification time of each file (reading tens of thousands of files on every run would cost
as much as decoding them; any rewrite of a file changes its mtime, as make and rsync assume).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import uuid
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lightning_mtl.datamodules._download import file_digest

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: no image of a few-shot dataset is this large; bigger zip members are refused (decompression bombs).
MAX_MEMBER_BYTES = 64 << 20


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def decode_image(data: bytes, where: str, size: int, channels: int) -> np.ndarray:
    """``(channels, size, size)`` uint8 array of an encoded image, resized (Lanczos) when needed.

    Raises:
        ValueError: the bytes are not a readable image; the message names ``where``.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.LANCZOS)
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # PIL's UnidentifiedImageError message names an in-memory buffer (an address), not the file
        reason = "not a recognised image format" if isinstance(e, UnidentifiedImageError) else e
        raise ValueError(f"corrupt or unreadable image {where} ({reason}); replace it or remove it from the "
                         f"dataset.") from e
    return array.transpose(2, 0, 1) if channels == 3 else array[None]


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


class FileTree:
    """The regular files of a folder or of a zip archive, by relative POSIX path, read without extracting.

    Entries that could escape the tree or that are not plain files are refused, with an error naming the archive
    and the entry: zip members with absolute paths, drive letters or ``..`` components, symbolic links and device,
    FIFO or socket entries (in zips and folders), members listed twice (which copy is read would be ambiguous) and
    oversized zip members. Zips have no hard links. Hidden files (``.*``, ``__MACOSX``) are skipped. Nothing is
    extracted: members are read in place, and their CRC-32 is checked as they are read.

    Args:
        path: a folder or a ``.zip`` file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None

    def __enter__(self) -> FileTree:
        if self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile as e:
                raise ValueError(f"{self.path} is not a readable zip archive ({e}); pass a folder or a zip. A "
                                 f"truncated (partially downloaded) zip reads like this: replace it.") from e
        return self

    def __exit__(self, *exc) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def _refuse(self, name: str, why: str) -> None:
        raise ValueError(f"{self.path}: refusing {name!r} ({why}); the dataset may be malicious or broken: remove "
                         f"that entry or use a clean copy of the dataset.")

    def files(self) -> list[str]:
        """Sorted relative paths of the regular, non-hidden files."""
        out, seen = [], set()
        if self._zip is not None:
            for info in self._zip.infolist():
                name = info.filename
                parts = name.replace("\\", "/").split("/")
                if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
                    self._refuse(name, "absolute path")
                if ".." in parts:
                    self._refuse(name, "'..' path component")
                mode = info.external_attr >> 16  # Unix st_mode when the zip was made on Unix, else 0
                if stat.S_ISLNK(mode):
                    self._refuse(name, "symbolic link")
                if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                    self._refuse(name, "device, FIFO or socket, not a regular file")
                if name in seen:
                    self._refuse(name, "listed twice in the archive")
                seen.add(name)
                if info.file_size > MAX_MEMBER_BYTES:
                    self._refuse(name, f"{info.file_size} bytes uncompressed, more than any image")
                if not info.is_dir() and not _hidden(name):
                    out.append(name)
        else:
            for folder, dirs, names in os.walk(self.path):
                for n in dirs + names:
                    mode = os.lstat(os.path.join(folder, n)).st_mode
                    if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                        rel = Path(folder, n).relative_to(self.path).as_posix()
                        if stat.S_ISLNK(mode):
                            self._refuse(rel, "symbolic link; replace it with the file or folder it points to")
                        self._refuse(rel, "device, FIFO or socket, not a regular file")
                rel_dir = Path(folder).relative_to(self.path)
                out += [name for n in names if not _hidden(name := (rel_dir / n).as_posix())]
        return sorted(out)

    def read(self, name: str) -> bytes:
        """The bytes of file ``name``.

        Raises:
            ValueError: the zip member is damaged (bad CRC-32, truncated or undecompressable data).
        """
        if self._zip is not None:
            try:
                return self._zip.read(name)
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise ValueError(f"corrupt archive member {self.where(name)} ({e}); the archive is damaged or a "
                                 f"partial download: replace it.") from e
        return (self.path / name).read_bytes()

    def where(self, name: str) -> str:
        """How error messages name file ``name``."""
        return f"{self.path}:{name}" if self._zip is not None else str(self.path / name)

    def digest(self, names: list[str]) -> str:
        """Hash of the archive content, or of the relative paths, sizes and mtimes of the folder's ``names``."""
        if self._zip is not None:
            return file_digest(self.path)
        h = hashlib.sha256()
        for n in names:
            st = (self.path / n).stat()
            h.update(f"{n}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def save_cache(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically: to a hidden temporary file of a random name, then renamed.

    A killed run never leaves a truncated cache at ``path``, and concurrent builders (DDP ranks, or nodes sharing a
    file system) each write their own temporary file; the last rename wins with a complete cache of the same
    sources and settings, and a reader sees either no file or a whole one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_cache(path: Path, what: str) -> dict | None:
    """The cache at ``path``; ``None`` when absent, or unreadable or inconsistent (with a warning: it is rebuilt)."""
    try:
        payload = torch.load(path, weights_only=True)
        images, counts = payload["images"], payload["counts"]
        if images.dtype != torch.uint8 or images.ndim != 4 or sum(counts) != images.shape[0]:
            raise ValueError("inconsistent cache contents")
        if len(counts) != len(payload["classes"]):
            raise ValueError("inconsistent class list")
        return payload
    except FileNotFoundError:
        return None
    except Exception as e:  # a truncated or foreign file: rebuild rather than fail
        warnings.warn(f"{what} cache {path} is unreadable ({e}); rebuilding it.", stacklevel=1)
        return None


def pack(groups: dict[str, list[np.ndarray]], **extra) -> dict:
    """A cache payload from ``(C, H, W)`` images grouped by class, in the order of ``groups``."""
    images = np.stack([img for imgs in groups.values() for img in imgs])  # (N, C, H, W)
    return {"images": torch.from_numpy(images), "classes": list(groups),
            "counts": [len(v) for v in groups.values()], **extra}
