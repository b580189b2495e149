"""What a measurement records about itself, so that a report can say how each number was made.

A recipe writes ``run.json`` for a fit and ``test.json`` for a test (:func:`provenance` with the run's steps or the
checkpoint tested); a benchmark script writes its results with a ``record`` block (:func:`provenance`) and the
``tables`` a reader sees (:func:`table`), which ``recipes/report.py`` renders into ``docs/benchmarks.md``::

    results = {"record": provenance(), "tables": [table("Step time", ["method", "ms"], [["equal", 3.2]])]}
    write_json("runs/benchmarks/mtl_overhead.json", results)
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["code_revision", "hardware", "provenance", "table", "write_json"]

REPOSITORY = Path(__file__).resolve().parent.parent


def code_revision(root: str | Path | None = None,
                  paths: tuple[str, ...] = ("lightning_mtl", "datamodules", "recipes")) -> str | None:
    """The short commit of the checkout at ``root`` (default: the library's own), with ``-dirty`` when tracked files
    under ``paths`` differ from it: the code a run is about to use. ``None`` without git or outside a source checkout
    (an installed wheel, whose site-packages may lie inside a user's own repository: that commit is not ours)."""
    if root is None:
        if not (REPOSITORY / "pyproject.toml").is_file():
            return None
        root = REPOSITORY

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or None
        changed = commit is not None and bool(git("status", "--porcelain", "--untracked-files=no", "--", *paths))
    except (OSError, subprocess.SubprocessError):
        return None
    return None if commit is None else commit + ("-dirty" if changed else "")


def hardware(accelerator: str | None = None) -> str:
    """The device in words: the CUDA card's name when ``accelerator`` is ``"cuda"`` (or, when it is ``None``, when
    CUDA is available), else the CPU cores."""
    if accelerator == "cuda" or (accelerator is None and torch.cuda.is_available()):
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"


def provenance(argv: Sequence[str] | None = None, accelerator: str | None = None) -> dict:
    """The command (``argv``, default ``sys.argv``), commit, hardware, torch threads, versions and UTC time of a
    measurement."""
    import lightning

    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv else None
    if script is not None and script.is_relative_to(REPOSITORY):
        argv[0] = script.relative_to(REPOSITORY).as_posix()
    return {"command": shlex.join(["python", *argv]), "commit": code_revision(), "hardware": hardware(accelerator),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "lightning": lightning.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], note: str = "") -> dict:
    """One table of a benchmark's results, as ``recipes/report.py`` renders it: a float cell is written with up to
    3 decimals, ``None`` as ``-``."""
    rows = [list(r) for r in rows]
    for r in rows:
        if len(r) != len(columns):
            raise ValueError(f"table {title!r}: a row has {len(r)} cells for {len(columns)} columns: {r}")
    return {"title": title, "columns": list(columns), "rows": rows, "note": note}


def write_json(path: str | Path, results: dict) -> None:
    """Written whole to a temporary file, then moved: a run killed mid-write leaves the previous version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
