"""The dense-step benchmark (recipes/benchmarks/dense_step.py) runs a SegNet-MTAN step on NYUv2's three tasks end to
end on a tiny size, in a subprocess per configuration on the CPU, and reports time and memory it measured."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from lightning_mtl.mtl.tasks import DepthTask, NormalTask, SegmentationTask

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "recipes" / "benchmarks" / "dense_step.py"


def load_script():
    spec = importlib.util.spec_from_file_location("dense_step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_reports_time_and_memory(tmp_path, capsys):
    out = tmp_path / "out" / "dense_step.json"
    bench = load_script()
    results = bench.main(["--height", "32", "--width", "48", "--steps", "1", "--warmup", "0", "--methods", "upgrad",
                          "--levels", "representation", "--precisions", "32-true", "--threads", "1",
                          "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    (row,) = results["runs"]
    assert (row["precision"], row["method"], row["level"]) == ("32-true", "upgrad", "representation")
    assert len(row["step_ms"]) == 1 and row["warmup_ms"] == [] and row["ms_per_step"] == row["step_ms"][0] > 0
    # measured in the child: its own resident set, reset at train start; training adds at least the gradients and
    # Adam's two moments of MTAN-SegNet's ~42M float32 parameters (3 x 160 MiB)
    assert row["peak_reset"] and math.isfinite(row["memory_mb"])
    assert row["memory_mb"] == pytest.approx(row["peak_mb"] - row["base_mb"]) and row["memory_mb"] > 400
    table = capsys.readouterr().out
    assert "VmHWM" in table and "upgrad" in table and "representation" in table and "+mem MB" in table
    (rendered,) = results["tables"]  # what docs/benchmarks.md shows, with the command that made it
    assert rendered["rows"] == [["32-true", "upgrad", "representation", row["ms_per_step"], None, row["base_mb"],
                                 row["peak_mb"], row["memory_mb"]]]  # no equal run: no ratio
    assert results["record"]["command"].endswith(f"--json {out}")


def test_arguments_are_checked_and_loss_weightings_have_no_level():
    bench = load_script()
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "2", "--warmup", "2"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--height", "16"])
    with pytest.raises(ValueError, match="pcgrad"):  # an unknown balancer lists the valid ones
        bench.parse_args(["--methods", "pcgard"])
    assert bench.levels_of("equal", ["parameter", "representation"]) == ["-"]
    assert bench.levels_of("pcgrad", ["parameter", "representation"]) == ["parameter", "representation"]


def test_batches_hold_valid_nyuv2_targets():
    bench = load_script()
    args = bench.parse_args(["--height", "32", "--width", "48", "--steps", "2", "--warmup", "1"])
    tasks = {"segmentation": SegmentationTask(bench.CLASSES), "depth": DepthTask(), "normal": NormalTask()}
    batches = bench.make_batches(args)
    assert len(batches) == 2 and batches[0].x.shape == (2, 3, 32, 48)
    for batch in batches:
        for task, target in batch.targets.items():
            tasks[task].check_target(target)  # the tasks' own checks accept them
        labels, depth, normal = (batch.targets[t] for t in ("segmentation", "depth", "normal"))
        assert labels.min() == -1 and labels.max() == bench.CLASSES - 1
        assert 0 < (depth == 0).float().mean() < 0.1 and depth.max() < 10
        norms = normal.norm(dim=1)
        assert 0 < (norms == 0).float().mean() < 0.1
        assert ((norms - 1).abs() < 1e-5).logical_or(norms == 0).all()
