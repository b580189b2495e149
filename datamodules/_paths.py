"""Where data and caches live.

Data root: an explicit ``root`` argument, else ``$LIGHTNING_MTL_DATA``, else ``./data``.
Cache dir: an explicit ``cache_dir`` argument, else ``$LIGHTNING_MTL_CACHE``, else ``~/.cache/lightning_mtl``.
The data root may be read-only (CI mounts the shared data without write bits), so caches never go there.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "LIGHTNING_MTL_DATA"
CACHE_ENV = "LIGHTNING_MTL_CACHE"


def resolve_data_root(root: str | os.PathLike | None) -> Path:
    """The data root: ``root``, else ``$LIGHTNING_MTL_DATA``, else ``./data``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path("data")


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The writable cache directory: ``cache_dir``, else ``$LIGHTNING_MTL_CACHE``, else ``~/.cache/lightning_mtl``."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lightning_mtl"
