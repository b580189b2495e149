"""Δm% (recipes/delta_m.py): the formula on a hand-computed example, its sign convention, metrics-file parsing and
its errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "recipes" / "delta_m.py"


def load_script():
    spec = importlib.util.spec_from_file_location("delta_m_recipe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dm = load_script()

DIRECTIONS = {"seg": True, "depth": False}  # accuracy (higher is better), absolute error (lower is better)
BASELINE = {"seg": 0.80, "depth": 0.50}


def test_hand_computed_example():
    # seg: (0.88 - 0.80) / 0.80 = +0.10; depth: (0.50 - 0.40) / 0.50 = +0.20; 100 / 2 * (0.10 + 0.20) = 15
    assert dm.delta_m({"seg": 0.88, "depth": 0.40}, BASELINE, DIRECTIONS) == pytest.approx(15.0)
    # seg: (0.76 - 0.80) / 0.80 = -0.05; depth: (0.50 - 0.55) / 0.50 = -0.10; 100 / 2 * -0.15 = -7.5
    assert dm.delta_m({"seg": 0.76, "depth": 0.55}, BASELINE, DIRECTIONS) == pytest.approx(-7.5)
    # a trade-off: seg +0.10, depth -0.20
    assert dm.delta_m({"seg": 0.88, "depth": 0.60}, BASELINE, DIRECTIONS) == pytest.approx(-5.0)


def test_sign_convention_positive_is_better():
    better = {"seg": 0.90, "depth": 0.30}  # higher accuracy and lower error
    assert dm.delta_m(better, BASELINE, DIRECTIONS) > 0
    assert dm.delta_m(BASELINE, better, DIRECTIONS) < 0
    assert dm.delta_m(BASELINE, BASELINE, DIRECTIONS) == 0


def test_mismatched_tasks_are_named():
    with pytest.raises(ValueError, match=r"\['normals'\] only in the method run"):
        dm.delta_m({**BASELINE, "normals": 0.3}, BASELINE, {**DIRECTIONS, "normals": False})
    with pytest.raises(ValueError, match=r"\['depth'\] only in the baseline run"):
        dm.delta_m({"seg": 0.9}, BASELINE, DIRECTIONS)
    with pytest.raises(ValueError, match=r"no metric direction .*\['depth'\]"):
        dm.delta_m(BASELINE, BASELINE, {"seg": True})


def test_zero_baseline_metric():
    with pytest.raises(ValueError, match="'depth': the baseline metric is 0"):
        dm.delta_m(BASELINE, {"seg": 0.8, "depth": 0.0}, DIRECTIONS)


def write_csv(path: Path, final: dict[str, float]) -> Path:
    """A CSVLogger-like metrics.csv: training and validation rows, then the test row with the final values."""
    columns = ["epoch", "step", "train/loss", "val/a/acc", *final]
    rows = [{"epoch": 0, "step": 9, "train/loss": 1.2}, {"epoch": 0, "step": 9, "val/a/acc": 0.5},
            {"epoch": 0, "step": 19, "train/loss": 0.9, **{k: 0.01 for k in final}},  # stale values, overwritten
            {"epoch": 1, "step": 20, **final}, {"epoch": 1, "step": 20, "train/loss": 0.8}]
    lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_last_non_empty_value(tmp_path):
    path = write_csv(tmp_path / "metrics.csv", {"test/a/acc": 0.75, "test/b/acc": 0.6, "test/a/loss": 0.7})
    metrics = dm.read_metrics(path)
    assert metrics["train/loss"] == 0.8 and metrics["test/a/acc"] == 0.75
    assert dm.task_metrics(metrics, "acc") == {"a": 0.75, "b": 0.6}
    assert dm.task_metrics(metrics, "loss") == {"a": 0.7}


def test_json_and_cli_table(tmp_path, capsys):
    base = write_csv(tmp_path / "metrics.csv", {"test/a/acc": 0.5, "test/b/acc": 0.8})
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"test/a/acc": 0.6, "test/b/acc": 0.8, "test/metric_mean": 0.7}))
    assert dm.task_metrics(dm.read_metrics(run), "acc") == {"a": 0.6, "b": 0.8}
    rows = dm.main(["--baseline", f"single={base}", f"mtl={run}"])
    assert rows["single"]["delta_m"] == 0 and rows["mtl"]["delta_m"] == pytest.approx(10.0)  # (+0.2 + 0) / 2
    assert rows["mtl"]["mean"] == pytest.approx(0.7)
    out = capsys.readouterr().out
    assert "mtl" in out and "+10.00" in out and "Δm% > 0 is better" in out
    # as error rates (lower is better) the same numbers are worse than the baseline
    assert dm.main(["--baseline", str(base), str(run), "--lower-is-better"])[str(run)]["delta_m"] < 0


def test_cli_errors(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"test/a/acc": 0.5, "test/b/acc": 0.8}))
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"test/a/acc": 0.6, "test/c/acc": 0.8}))
    with pytest.raises(SystemExit, match=r"\['c'\] only in the method run.*\['b'\] only in the baseline run"):
        dm.main(["--baseline", str(base), str(run)])
    with pytest.raises(SystemExit, match="no test/<task>/f1 values"):
        dm.main(["--baseline", str(base), str(run), "--metric", "f1"])
    with pytest.raises(SystemExit, match="no metrics file"):
        dm.main(["--baseline", str(tmp_path / "missing.csv"), str(run)])


def test_averaging_over_metrics_or_over_tasks():
    # depth has two metrics: abs err 0.50 -> 0.40 (+0.20), rel err 0.20 -> 0.22 (-0.10); seg mIoU 0.40 -> 0.44 (+0.10)
    base = {"seg/miou": 0.40, "depth/abs_err": 0.50, "depth/rel_err": 0.20}
    method = {"seg/miou": 0.44, "depth/abs_err": 0.40, "depth/rel_err": 0.22}
    directions = {"seg/miou": True, "depth/abs_err": False, "depth/rel_err": False}
    # each metric once (Nash-MTL): (0.10 + 0.20 - 0.10) / 3 = 6.67%; each task once (LibMTL): (0.10 + 0.05) / 2 = 7.5%
    assert dm.delta_m(method, base, directions, "metrics") == pytest.approx(100 * 0.20 / 3)
    assert dm.delta_m(method, base, directions, "tasks") == pytest.approx(7.5)
    with pytest.raises(ValueError, match="average must be 'metrics' or 'tasks'"):
        dm.delta_m(method, base, directions, "mean")


def test_directions_stated_by_the_recipe_are_used(tmp_path):
    """test_metrics.json carries each metric's direction: no --lower-is-better to remember, and every metric counts."""
    def run(name: str, seg: float, err: float) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"test/seg/miou": seg, "test/depth/abs_err": err, "test/seg/loss": 1.0,
                                    "higher_is_better": {"seg/miou": True, "depth/abs_err": False}}))
        return path

    base, better = run("base", 0.40, 0.50), run("better", 0.44, 0.40)
    assert dm.read_directions(base) == {"seg/miou": True, "depth/abs_err": False}
    assert "higher_is_better" not in dm.read_metrics(base)
    rows = dm.main(["--baseline", str(base), f"m={better}"])
    assert rows["m"]["delta_m"] == pytest.approx(15.0)  # (+0.10 + 0.20) / 2: the lower error counts as better
    only_seg = dm.main(["--baseline", str(base), f"m={better}", "--metric", "miou"])
    assert only_seg["m"]["delta_m"] == pytest.approx(10.0)
