"""recipes/report.py: tables and figures generated from a runs folder (a fixture folder in the recipes' layout)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("report_recipe", REPO / "recipes" / "report.py")
report = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = report  # its dataclass looks its module up
spec.loader.exec_module(report)


def write_run(root: Path, group: str, name: str, metrics: dict, model: dict, record: dict | None = None) -> None:
    folder = root / group / name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "test_metrics.json").write_text(json.dumps(metrics))
    config = {"model": model, "trainer": {"precision": "32"}}
    (folder / "checkpoints" / "config.yaml").write_text(yaml.safe_dump(config))
    if record is not None:
        (folder / "checkpoints" / "run.json").write_text(json.dumps(record))


def mtl_metrics(acc: dict[str, float]) -> dict:
    return {**{f"test/{t}/acc": a for t, a in acc.items()}, "higher_is_better": {f"{t}/acc": True for t in acc}}


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    mtl = {"class_path": "lightning_mtl.mtl.MultiTaskModule",
           "init_args": {"architecture": {"class_path": "lightning_mtl.mtl.architectures.HardSharing"},
                         "balancer": "equal"}}
    record = {"global_step": 1500, "fit_seconds": 615.0, "precision": "32-true", "hardware": "2 CPU cores",
              "commit": "abc1234", "command": "python recipes/multitask.py fit --config x.yaml"}
    write_run(root, "alphabets", "single_task_quick", mtl_metrics({"a": 0.8, "b": 0.9, "c": 0.5}), mtl, record)
    write_run(root, "alphabets", "hps_quick", mtl_metrics({"a": 0.88, "b": 0.81, "c": 0.5}), mtl, record)
    write_run(root, "alphabets", "subset_quick", mtl_metrics({"a": 0.84}), mtl)
    protonet = {"class_path": "lightning_mtl.meta.ProtoNet", "init_args": {}}
    write_run(root, "omniglot", "protonet_quick", {"test/acc": 0.97, "test/acc_ci95": 0.004, "test/episodes": 1000},
              protonet, {**record, "command": "python recipes/fewshot.py fit"})
    write_run(root, "omniglot", "maml_quick", {"test/acc": 0.95, "test/acc_ci95": 0.006, "test/episodes": 1000},
              {"class_path": "lightning_mtl.meta.MAML", "init_args": {"meta_balancer": "pcgrad"}})
    return root


def test_tables_are_computed_from_the_runs(runs, tmp_path):
    out = tmp_path / "docs" / "results.md"
    report.report(runs, out, tmp_path / "docs" / "figures")
    text = out.read_text()
    # mean error of hps: 1 - (0.88 + 0.81 + 0.5) / 3 = 27.00%; Δm = 100/3 (0.08/0.8 - 0.09/0.9 + 0) = 0.00
    assert "| `hps_quick` | MultiTaskModule, HardSharing, equal | 3 | 27.00% | 26.67% | +0.00 | 1500 | 10 min 15 s " \
           "| 32-true | 2 CPU cores | abc1234 |" in text
    # a run on a subset of the tasks is compared with single-task on those tasks: 100 * (0.84 - 0.8) / 0.8 = +5.00
    assert "| `subset_quick` | MultiTaskModule, HardSharing, equal | 1 | 16.00% | 20.00% | +5.00 | - | - | 32 |" in text
    assert "| `protonet_quick` | ProtoNet | 97.00% | ± 0.40% | 1000 | 1500 | 10 min 15 s | 32-true |" in text
    assert "| `maml_quick` | MAML, pcgrad | 95.00% | ± 0.60% | 1000 | - | - | 32 |" in text
    assert "    python recipes/multitask.py fit --config x.yaml" in text
    for name in ("alphabets_per_task_error", "alphabets_delta_m", "omniglot_accuracy"):
        assert (tmp_path / "docs" / "figures" / f"{name}.png").stat().st_size > 1000
        assert f"(figures/{name}.png)" in text


def test_figures_have_the_expected_axes_and_series(runs, tmp_path):
    made = report.report(runs, tmp_path / "results.md", tmp_path / "figures")
    per_task, delta, accuracy = (fig.axes[0] for fig in (*made["alphabets"], *made["omniglot"]))
    assert per_task.get_ylabel() == "test error (%)" and per_task.get_xlabel() == "task"
    assert [t.get_text() for t in per_task.get_legend().get_texts()] == ["hps_quick", "single_task_quick",
                                                                        "subset_quick"]
    assert [t.get_text() for t in per_task.get_xticklabels()] == ["a", "b", "c"]
    assert len(per_task.patches) == 3 + 3 + 1  # one bar per (run, task)
    heights = sorted(round(p.get_height(), 6) for p in per_task.patches)
    assert heights == sorted([12.0, 19.0, 50.0, 20.0, 10.0, 50.0, 16.0])
    assert delta.get_ylabel().startswith("Δm% vs single-task")
    assert [round(p.get_height(), 6) for p in delta.patches] == [0.0, 0.0, 5.0]
    assert accuracy.get_ylabel() == "test accuracy (%), 95% CI"
    line = accuracy.lines[0]
    assert list(line.get_ydata()) == pytest.approx([95.0, 97.0])  # runs sorted by name: maml, protonet


def test_an_empty_runs_folder_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `fit` then `test` first"):
        report.report(tmp_path, tmp_path / "results.md", None)
