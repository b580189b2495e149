"""recipes/benchmarks/gpu_check.sh (the one-run GPU check of issue #18) runs end to end on the CPU with tiny settings
and writes summary.md with the device in every table row; without a CUDA device it stops at once unless
ACCELERATOR=cpu. Not a timing gate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "recipes" / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1",
            "LIGHTNING_MTL_DATA": str(tmp_path / "no-data"), "TMPDIR": str(tmp_path), **extra}


def test_cpu_run_writes_a_summary_with_the_device_in_every_row(tmp_path):
    tiny = {"ACCELERATOR": "cpu", "STEPS": "3", "WARMUP": "1", "REPEATS": "1", "PRECISIONS": "32",
            "METHODS": "maml", "MAML_META_BATCH": "2", "MTL_TASKS": "2", "MTL_METHODS": "equal",
            "MTL_TORCHJD": "upgrad", "MTL_STEPS": "3", "MTL_WARMUP": "1", "MTL_REPEATS": "1",
            "MTL_EXTRA": "--hidden 16 --batch-size 8 --threads 1"}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env(tmp_path, **tiny), cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["env.txt", "mtl.txt", "mtl_k2.json", "summary.md", "throughput.json", "throughput.txt"]
    assert not list(tmp_path.glob("gpu_check.*"))  # its temporary folder is removed
    throughput = json.loads((out / "throughput.json").read_text())
    device = throughput["device"]
    assert device.startswith("CPU") and throughput["complete"]
    assert [(r["meta_batch"], r["precision"]) for r in throughput["runs"]] == [(2, "32")]
    assert json.loads((out / "mtl_k2.json").read_text())["device"] == device

    summary = (out / "summary.md").read_text()
    assert summary == proc.stdout[-len(summary):]  # printed at the end
    assert f"# GPU check (issue #18): {device}" in summary and "exit status 0; mtl_overhead.py K=2 0." in summary
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| method")
            and not line.startswith("| verdict")]
    fewshot = [r for r in rows if r.startswith("| MAML")]
    targets = [r for r in rows if r.startswith("| **")]
    mtl = [r for r in rows if r.split(" | ")[2:3] == ["2"]]  # K column
    assert len(fewshot) == 1 and fewshot[0].startswith("| MAML 2nd order 5-way 1-shot 15-query | 2 | 32 |")
    assert len(targets) == 3  # ratio, learn2learn speed-up (n.a. without it), bf16 memory (n.a. on CPU)
    assert {r.split(" | ")[0] for r in mtl} >= {"| equal", "| upgrad", "| torch:equal", "| torchjd:upgrad"}
    assert rows == fewshot + targets + mtl
    assert all(r.endswith(f"| {device} |") for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_stops_at_once(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], env=env(tmp_path, ACCELERATOR="cuda"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "ACCELERATOR=cpu" in proc.stderr
    assert not (tmp_path / "out" / "throughput.json").exists()
