"""The installed layout: `datamodules/` is importable only as `lightning_mtl.datamodules`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning_mtl.datamodules

REPO = Path(__file__).resolve().parents[1]
PROBE = "import importlib.util as u; print(u.find_spec('datamodules'), u.find_spec('lightning_mtl.datamodules').name)"


def test_datamodules_installed_under_lightning_mtl(tmp_path):
    assert Path(lightning_mtl.datamodules.__file__).resolve() == REPO / "datamodules" / "__init__.py"
    # run outside the checkout so the current directory cannot supply a top-level `datamodules`
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "lightning_mtl.datamodules"]
