"""A tiny Omniglot in the official layout (two zip archives, one alphabet each) with Vinyals-style split lists, shared
by the datamodule tests."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def omniglot_png(seed: int, size: int = 105) -> bytes:
    """A random binary ``size`` x ``size`` PNG like Omniglot's (mode "1", ~90% white)."""
    img = Image.fromarray((np.random.default_rng(seed).random((size, size)) > 0.1).astype(np.uint8) * 255).convert("1")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_fake_omniglot(root: Path, chars_per_archive: int = 3, image_size: int = 105) -> Path:
    """Write ``root/omniglot/images_{background,evaluation}.zip`` and ``splits/vinyals/*.txt``; returns ``root``.

    Each archive holds one alphabet ("Alpha", "Beta") of ``chars_per_archive`` characters with 20 drawings each; every
    character gives four rotation classes. Of the ``8 * chars_per_archive`` classes, the first half is "train", the
    next four "val", the rest "test", and "trainval" is train + val.
    """
    folder = root / "omniglot"
    (folder / "splits" / "vinyals").mkdir(parents=True)
    lines = []
    for archive, alphabet in (("images_background", "Alpha"), ("images_evaluation", "Beta")):
        with zipfile.ZipFile(folder / f"{archive}.zip", "w") as zf:
            for c in range(1, chars_per_archive + 1):
                for d in range(1, 21):
                    zf.writestr(f"{archive}/{alphabet}/character{c:02d}/{c:04d}_{d:02d}.png",
                                omniglot_png(c * 100 + d, image_size))
                lines += [f"{alphabet}/character{c:02d}/rot{r:03d}" for r in (0, 90, 180, 270)]
    train, val = len(lines) // 2, 4
    splits = {"train": lines[:train], "val": lines[train:train + val], "test": lines[train + val:],
              "trainval": lines[:train + val]}
    for split, chosen in splits.items():
        (folder / "splits" / "vinyals" / f"{split}.txt").write_text("\n".join(chosen) + "\n")
    return root
