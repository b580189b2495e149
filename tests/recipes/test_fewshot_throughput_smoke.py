"""The few-shot throughput benchmark (recipes/benchmarks/fewshot_throughput.py) runs end to end with its learn2learn
peers, so the README's comparison cannot rot. Not a timing gate: a few steps, random images."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "recipes" / "benchmarks" / "fewshot_throughput.py"


def load_script():
    spec = importlib.util.spec_from_file_location("fewshot_throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("layout", ["l2l", "same"])
def test_benchmark_runs_against_learn2learn(layout, l2l, tmp_path):
    env = {**os.environ, "LIGHTNING_MTL_DATA": str(tmp_path / "no-data"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "bench.json"
    # one layout also measures two MAML meta-batch sizes (learn2learn's loop and the raw loop over more tasks)
    sizes = ["--maml-meta-batch", "2", "3"] if layout == "l2l" else []
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "3", "--warmup", "1", "--repeats", "1", "--precision", "32",
         "--l2l-layout", layout, "--json", str(out), *sizes],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "using random images" in proc.stdout
    results = json.loads(out.read_text())
    assert results["l2l_layout"] == layout and results["complete"]
    device = results["device"]
    assert device.startswith("CPU")
    runs = {(r["method"].split()[0], r["meta_batch"]): r for r in results["runs"]}
    expected_sizes = (2, 3) if sizes else (4,)
    assert set(runs) == {("ProtoNet", 1), *(("MAML", m) for m in expected_sizes)}
    for (method, meta_batch), run in runs.items():
        for key in ("raw_ms", "lightning_ms", "learn2learn_ms", "speedup_vs_learn2learn", "episodes_per_s"):
            assert run[key] > 0, (key, run)
        assert run["device"] == device and run["precision"] == "32"
        assert run["peak_mem_mb"] is None and run["raw_peak_mem_mb"] is None  # measured on CUDA only
        if method == "MAML":
            assert run["method"].endswith(f"meta-batch {meta_batch}")
            assert run["episodes_per_s"] == pytest.approx(meta_batch / (run["lightning_ms"] / 1e3))
    # every printed row names the device; the targets block ends the output
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("ProtoNet ", "MAML "))]
    assert len(rows) == len(runs) and all(line.rstrip().endswith(device) for line in rows)
    if sizes:
        assert any("meta-batch 2 " in line for line in rows) and any("meta-batch 3 " in line for line in rows)
    verdicts = [c["verdict"] for c in results["targets"]]
    assert len(verdicts) == len(runs) + (len(runs) - 1) + 1  # ratio per row, speed-up per MAML row, memory
    assert set(verdicts) <= {"PASS", "FAIL", "n.a."} and verdicts[-1] == "n.a."  # no CUDA memory on CPU
    assert "targets (issue #18 item 5" in proc.stdout
    # what docs/benchmarks.md shows: the command and commit beside the same rows
    assert results["record"]["command"].startswith("python ") and "--json" in results["record"]["command"]
    assert results["record"]["hardware"].endswith(")") and results["record"]["date"]
    steps, targets = results["tables"]
    assert len(steps["rows"]) == len(runs) and all(len(r) == len(steps["columns"]) for r in steps["rows"])
    assert [r[4] for r in steps["rows"]] == [r["ratio"] for r in results["runs"]]
    assert [r[4] for r in targets["rows"]] == verdicts
    assert [h[0] for h in results["headline"]] == [f"{m}: training step" for m in dict.fromkeys(
        r["method"] for r in results["runs"])]  # one README row per method, its precisions in it
    assert all(h[1].startswith("32: ") and "learn2learn's speed" in h[1] for h in results["headline"])


def test_targets_come_from_the_measured_rows():
    bench = load_script()

    def row(method, precision, ratio, speedup, peak):
        return {"method": method, "precision": precision, "ratio": ratio, "speedup_vs_learn2learn": speedup,
                "peak_mem_mb": peak}

    m32, m4 = bench.maml_label(32), bench.maml_label(4)
    runs = [row("ProtoNet 60-way 1-shot 5-query", "32", 1.01, 2.0, 100.0), row(m4, "32", 1.04, 3.5, 50.0),
            row(m32, "32", 1.0, None, 1000.0), row(m32, "bf16-mixed", 0.99, 2.9, 550.0)]
    checks = {(c["target"].split()[0], c["row"]): c for c in bench.check_targets(runs)}
    verdict = {key: c["verdict"] for key, c in checks.items()}
    assert verdict[("ours", "ProtoNet 60-way 1-shot 5-query, 32")] == "PASS"
    assert verdict[("ours", f"{m4}, 32")] == "FAIL"
    assert verdict[("2nd-order", f"{m4}, 32")] == "PASS"
    assert verdict[("2nd-order", f"{m32}, 32")] == "n.a."  # learn2learn not run
    assert verdict[("2nd-order", f"{m32}, bf16-mixed")] == "FAIL"
    assert not any(key == ("2nd-order", "ProtoNet 60-way 1-shot 5-query, 32") for key in checks)
    memory = checks[("bf16-mixed", m32)]
    assert memory["verdict"] == "PASS" and memory["value"] == pytest.approx(0.55)
    runs[-1]["peak_mem_mb"] = 700.0
    assert bench.check_targets(runs)[-1]["verdict"] == "FAIL"
    runs[-1]["peak_mem_mb"] = float("nan")  # not CUDA
    assert bench.check_targets(runs)[-1]["verdict"] == "n.a."
    assert bench.check_targets(runs[:3])[-1]["verdict"] == "n.a."  # no bf16-mixed row at meta-batch 32
    with bench.PeakMemory("cpu") as peak:
        pass
    assert math.isnan(peak.mb)
