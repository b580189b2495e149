"""Checksummed downloads: a temporary file, verified, then renamed, so a partial file is never taken for a whole one.

A file already at the destination is never overwritten: it is returned when its digest matches and refused otherwise
(it was not written by :func:`download_file`, so it may be someone's own copy, and the data root may be read-only).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
import uuid
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

    The bytes go to a hidden ``.<name>.*.part`` file beside ``dest`` that is renamed to ``dest`` only once complete
    and verified, and removed on any failure, so an interrupted download never leaves a file at ``dest``. When
    ``dest`` already exists with the expected digest it is returned without downloading.

    Raises:
        DownloadError: the URL could not be fetched, the transfer ended early, the digest differs from ``checksum``,
            or ``dest`` already exists with another digest (it is left untouched).
    """
    if dest.is_file():
        digest = file_digest(dest, algorithm)
        if digest == checksum:
            return dest
        raise DownloadError(
            f"{dest} already exists with {algorithm} {digest}, expected {checksum} (a partial or altered copy?); it "
            f"was left untouched. Delete it to download {url} again."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    # a random name opened exclusively (unlike mkstemp it keeps the umask's permissions): concurrent downloads of the
    # same file, even from other hosts on a shared file system, each write their own
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    try:
        h, received = hashlib.new(algorithm), 0
        with open(tmp, "xb") as out, urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            announced = response.headers.get("Content-Length")
            while block := response.read(1 << 20):
                h.update(block)
                out.write(block)
                received += len(block)
        # http.client ends a read early without an error when the connection drops: compare with the announced size
        if announced is not None and announced.isdigit() and received != int(announced):
            raise DownloadError(
                f"{url}: the transfer stopped after {received} of {announced} bytes; the partial file was discarded. "
                f"Try again, or place the file at {dest} by hand."
            )
        if h.hexdigest() != checksum:
            raise DownloadError(
                f"{url} downloaded with {algorithm} {h.hexdigest()}, expected {checksum}; the file was discarded. "
                f"Download it by hand and place it at {dest}."
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as e:
        raise DownloadError(f"could not download {url} ({e}); place the file at {dest} by hand.") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest
