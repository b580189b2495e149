"""Checksummed downloads: a temporary file, verified, then renamed, so a partial file is never taken for a whole one."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path


class DownloadError(RuntimeError):
    """A download failed or its checksum did not match."""


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_file(url: str, dest: Path, *, checksum: str, algorithm: str = "sha256", timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` and verify its ``algorithm`` digest before the file appears at ``dest``.

    Raises:
        DownloadError: the URL could not be fetched, or the digest differs from ``checksum``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.new(algorithm)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            while block := response.read(1 << 20):
                h.update(block)
                out.write(block)
        if h.hexdigest() != checksum:
            raise DownloadError(
                f"{url} downloaded with {algorithm} {h.hexdigest()}, expected {checksum}; the file was discarded. "
                f"Download it by hand and place it at {dest}."
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DownloadError(f"could not download {url} ({e}); place the file at {dest} by hand.") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest
