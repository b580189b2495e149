"""Images decoded per sample from a folder or a zip archive, for datasets too large to hold decoded in memory.

A :class:`LazyImages` dataset holds only file names and targets; each ``__getitem__`` reads one file (a zip member is
read in place, never extracted) and decodes it with :func:`~lightning_mtl.datamodules._images.decode_image`
(RGB, resized to ``image_size`` x ``image_size`` by Lanczos). DataLoader workers each open their own handle on the
source: a zip file object shared across a ``fork`` would share one file offset between processes and return mixed
bytes. Nothing is written anywhere, so the data root may be read-only.

Optional cache: the first ``cache_images`` distinct images a process decodes are kept, decoded, in that process (no
eviction: under shuffled access every policy hits with probability ``cache_images / len(dataset)``, and keeping the
first ones never churns). Memory is bounded by ``processes x cache_images x 3 x image_size**2`` bytes per dataset,
where the processes are the loader's workers (kept alive between epochs by ``persistent_workers``) or the main process.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_mtl.datamodules._images import FileTree, decode_image


class LazyImages(Dataset):
    """``(uint8 image (3, S, S), target)`` samples decoded on access.

    Args:
        source: a folder or a ``.zip`` archive.
        names: relative paths (zip member names) of the images, already listed safely by
            :class:`~lightning_mtl.datamodules._images.FileTree`.
        targets: ``(N,)`` labels (samples ``(x, y)``), or ``{task: (N,) labels}`` (samples ``(x, {task: y})``).
        image_size: side ``S`` of the square images after resizing.
        cache_images: decoded images each process keeps (0: none).

    Raises:
        ValueError: targets of another length than ``names``, or a negative ``cache_images``.
    """

    def __init__(
        self, source: Path, names: list[str], targets: Tensor | dict[str, Tensor], image_size: int,
        cache_images: int = 0,
    ) -> None:
        lengths = {len(y) for y in targets.values()} if isinstance(targets, dict) else {len(targets)}
        if lengths != {len(names)}:
            raise ValueError(f"{len(names)} images but targets of lengths {sorted(lengths)}")
        if cache_images < 0:
            raise ValueError(f"cache_images must be >= 0, got {cache_images}")
        self.source, self.names, self.targets = source, names, targets
        self.image_size, self.cache_images = image_size, cache_images
        self._tree: FileTree | None = None
        self._pid: int | None = None
        self._cache: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict:
        # workers started by spawn / forkserver receive a pickled copy: without the open archive or the cache
        state = dict(self.__dict__)
        state.update(_tree=None, _pid=None, _cache={})
        return state

    def _open(self) -> FileTree:
        if self._pid != os.getpid():  # a new process (a forked worker inherits the parent's handle): reopen
            self._tree = FileTree(self.source).__enter__()
            self._pid, self._cache = os.getpid(), {}
        return self._tree

    def image(self, i: int) -> Tensor:
        """Image ``i`` as ``(3, S, S)`` uint8."""
        tree = self._open()
        if (cached := self._cache.get(i)) is not None:
            return cached
        name = self.names[i]
        # a contiguous, writable copy: PIL's buffer is read-only and the transpose would follow into every batch
        x = torch.from_numpy(np.ascontiguousarray(decode_image(tree.read(name), tree.where(name), self.image_size, 3)))
        if len(self._cache) < self.cache_images:
            self._cache[i] = x
        return x

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor | dict[str, Tensor]]:
        if isinstance(self.targets, dict):
            return self.image(i), {task: y[i] for task, y in self.targets.items()}
        return self.image(i), self.targets[i]
