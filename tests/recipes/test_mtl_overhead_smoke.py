"""The MTL overhead benchmark (recipes/benchmarks/mtl_overhead.py) runs end to end on tiny settings, its architecture
rows compare with hard sharing, every backbone copy runs once per step, and LibMTL's rows appear when it imports."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_mtl.mtl.architectures import list_architectures
from lightning_mtl.mtl.architectures.base import Architecture

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "recipes" / "benchmarks" / "mtl_overhead.py"
K, EXPERTS, STAGES = 2, 2, 4  # tasks, shared experts, Conv-4's stages (one task expert per task)
# copies of the backbone (or of a stage) that each architecture holds, at K tasks
COPIES = {"HardSharing": 1, "MTAN": 1, "SoftSharing": K, "CrossStitch": K * STAGES, "MMoE": EXPERTS,
          "DSelectK": EXPERTS, "CGC": EXPERTS + K, "PLE": STAGES * (EXPERTS + K), "LTB": STAGES * K}


def load_script():
    spec = importlib.util.spec_from_file_location("mtl_overhead_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_methods_architectures_and_peers(tmp_path, capsys):
    out = tmp_path / "out" / "overhead.json"
    threads = torch.get_num_threads()
    try:  # one thread: fast and steady even when other jobs share the cores
        results = load_script().main([
            "--tasks", str(K), "--backbone", "conv4", "--methods", "equal", "pcgrad", "--torchjd", "upgrad",
            "--hidden", "8", "--batch-size", "8", "--steps", "3", "--warmup", "1", "--repeats", "1",
            "--experts", str(EXPERTS), "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    runs = {(r["loop"], r["method"], r["level"], r["architecture"]): r for r in results["runs"]}
    for run in runs.values():
        assert run["tasks"] == K and math.isfinite(run["ms_per_step"]) and run["ms_per_step"] > 0
    hard = {key[:3] for key in runs if key[3] == "HardSharing" and key[0] != "libmtl"}
    assert hard == {("ours", "equal", "-"), ("ours", "pcgrad", "parameter"), ("ours", "pcgrad", "representation"),
                    ("ours", "upgrad", "parameter"), ("ours", "upgrad", "representation"),
                    ("torch", "equal", "-"), ("torchjd", "upgrad", "mtl_backward")}
    assert runs[("ours", "equal", "-", "HardSharing")]["ratio_vs_equal"] == 1
    assert runs[("ours", "upgrad", "parameter", "HardSharing")]["ratio_vs_torchjd"] > 0

    # every architecture at equal weighting, against hard sharing on the same Conv-4; each copy ran once
    assert results["skipped"] == []
    assert runs[("ours", "equal", "-", "HardSharing")]["ratio_vs_hard"] == 1
    for name in list_architectures():
        row = runs[("ours", "equal", "-", name)]
        assert math.isfinite(row["ratio_vs_hard"]) and row["ratio_vs_hard"] > 0
        assert row["ratio_vs_hard"] == pytest.approx(row["ms_per_step"] / runs[("ours", "equal", "-",
                                                                                 "HardSharing")]["ms_per_step"])
        counts = row["shared_forwards_per_step"]
        assert counts and set(counts.values()) == {1}, (name, counts)
        if name in COPIES:
            assert len(counts) == COPIES[name], (name, sorted(counts))
    assert sorted(runs[("ours", "equal", "-", "CrossStitch")]["shared_forwards_per_step"]) == [
        f"columns.{t}.{s}" for t in range(K) for s in range(STAGES)]

    # LibMTL: EW and PCGrad on HPS, MMoE and CGC, with our ratio against each, whenever it can be imported
    libmtl = results["libmtl"]
    if importlib.util.find_spec("LibMTL") is None:
        assert not libmtl["available"] and libmtl["reason"]
    assert libmtl["available"] == any(key[0] == "libmtl" for key in runs)
    if libmtl["available"]:
        for arch in ("HardSharing", "MMoE", "CGC"):
            for method, level in (("equal", "-"), ("pcgrad", "parameter")):
                assert ("libmtl", method, level, arch) in runs
                ratio = runs[("ours", method, level, arch)]["ratio_vs_libmtl"]
                assert math.isfinite(ratio) and ratio > 0
    table = capsys.readouterr().out
    assert "ours/torchjd" in table and "torchjd:upgrad" in table and "torch:equal" in table and "vs hard" in table
    assert ("ours/libmtl" in table) == libmtl["available"]

    # the tables docs/benchmarks.md renders hold the same rows, with the command that made them
    assert results["record"]["command"].endswith(f"--json {out}") and "mtl_overhead.py" in results["record"]["command"]
    titles = [t["title"] for t in results["tables"]]
    assert titles[:2] == ["Balancing methods on hard sharing: step time", "Architectures at equal weighting: step time"]
    assert len(titles) == 2 + libmtl["available"]
    methods, archs = results["tables"][:2]
    assert len(methods["rows"]) == len(hard) and {r[0] for r in methods["rows"]} >= {"torch:equal", "torchjd:upgrad"}
    assert [r[0] for r in archs["rows"]] == [key[3] for key in runs if key[0] == "ours" and key[1] == "equal"]
    assert all(r[4].startswith("1 (") for r in archs["rows"])
    jd = runs[("ours", "upgrad", "parameter", "HardSharing")]["ratio_vs_torchjd"]
    assert results["headline"][0] == [f"aggregators on hard sharing, K = {K}: step against torchjd's",
                                      f"upgrad {jd:.2f}×"]
    assert len(results["headline"]) == 1 + libmtl["available"]


class _Twice(Architecture):
    """Recomputes the backbone for every task: what the shared-forward check must catch."""

    def __init__(self, tasks: list[str], backbone: nn.Module) -> None:
        super().__init__(tasks)
        self.backbone = backbone

    def represent(self, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        return {t: self.backbone(x) for t in tasks}


def test_forward_counter_catches_recomputation_and_mtan_skips_the_mlp():
    bench = load_script()
    args = bench.parse_args(["--backbone", "mlp", "--hidden", "8", "--experts", "2"])
    signatures = bench.copy_signatures(bench.make_backbone("mlp", 8))
    x = torch.randn(4, 1, 28, 28)
    for arch, expected in ((_Twice(["a", "b", "c"], bench.make_backbone("mlp", 8)), {"backbone": 3}),
                           (bench.make_architecture(args, "HardSharing")(["a", "b", "c"]), {"backbone": 1}),
                           (bench.make_architecture(args, "CrossStitch")(["a", "b"]),
                            {f"columns.{t}.{s}": 1 for t in range(2) for s in range(3)})):
        with bench.ForwardCounter(bench.backbone_copies(arch, signatures)) as counter:
            arch(x)
        assert counter.counts == expected
    with pytest.raises(ValueError, match="feature maps"):  # MTAN attends to (C, H, W) maps, which the MLP lacks
        bench.make_architecture(args, "MTAN")(["a", "b"])
