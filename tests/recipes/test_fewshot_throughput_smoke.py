"""The few-shot throughput benchmark (recipes/benchmarks/fewshot_throughput.py) runs end to end with its learn2learn
peers, so the comparison in docs/benchmarks.md cannot rot. Not a timing gate: a few steps, random images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "recipes" / "benchmarks" / "fewshot_throughput.py"


@pytest.mark.parametrize("layout", ["l2l", "same"])
def test_benchmark_runs_against_learn2learn(layout, l2l, tmp_path):
    env = {**os.environ, "LIGHTNING_MTL_DATA": str(tmp_path / "no-data"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "3", "--warmup", "1", "--repeats", "1", "--precision", "32",
         "--l2l-layout", layout, "--json", str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "using random images" in proc.stdout
    results = json.loads(out.read_text())
    assert results["l2l_layout"] == layout
    runs = {r["method"].split()[0]: r for r in results["runs"]}
    assert set(runs) == {"ProtoNet", "MAML"}
    for run in runs.values():
        for key in ("raw_ms", "lightning_ms", "learn2learn_ms", "speedup_vs_learn2learn", "episodes_per_s"):
            assert run[key] > 0, (key, run)
