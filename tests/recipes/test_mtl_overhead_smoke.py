"""The MTL overhead benchmark (recipes/benchmarks/mtl_overhead.py) runs end to end on tiny settings."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "recipes" / "benchmarks" / "mtl_overhead.py"


def load_script():
    spec = importlib.util.spec_from_file_location("mtl_overhead_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_finite_times(tmp_path, capsys):
    out = tmp_path / "out" / "overhead.json"
    threads = torch.get_num_threads()
    try:  # one thread: fast and steady even when other jobs share the cores
        results = load_script().main(["--tasks", "2", "--methods", "equal", "pcgrad", "--torchjd", "upgrad",
                                      "--hidden", "16", "--batch-size", "8", "--steps", "4", "--warmup", "1",
                                      "--repeats", "1", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    runs = {(r["loop"], r["method"], r["level"]): r for r in results["runs"]}
    assert set(runs) == {("ours", "equal", "-"), ("ours", "pcgrad", "parameter"), ("ours", "pcgrad", "representation"),
                         ("ours", "upgrad", "parameter"), ("ours", "upgrad", "representation"),
                         ("torch", "equal", "-"), ("torchjd", "upgrad", "mtl_backward")}
    for run in runs.values():
        assert run["tasks"] == 2 and math.isfinite(run["ms_per_step"]) and run["ms_per_step"] > 0
    assert runs[("ours", "equal", "-")]["ratio_vs_equal"] == 1
    assert runs[("ours", "upgrad", "parameter")]["ratio_vs_torchjd"] > 0
    table = capsys.readouterr().out
    assert "ours/torchjd" in table and "torchjd:upgrad" in table and "torch:equal" in table
