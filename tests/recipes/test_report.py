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


def write_run(root: Path, group: str, name: str, metrics: dict, model: dict, record: dict | None = None,
              history: list[dict] | None = None) -> None:
    folder = root / group / name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "test_metrics.json").write_text(json.dumps(metrics))
    config = {"model": model, "trainer": {"precision": "32"}}
    (folder / "checkpoints" / "config.yaml").write_text(yaml.safe_dump(config))
    if record is not None:
        (folder / "checkpoints" / "run.json").write_text(json.dumps(record))
    if history is not None:
        (folder / "checkpoints" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))


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
    # tested without a fit of its own (a frozen pre-trained embedding): test.json is its record
    write_run(root, "omniglot", "embedding_quick", {"test/acc": 0.94, "test/acc_ci95": 0.004, "test/episodes": 1000},
              {"class_path": "lightning_mtl.meta.EmbeddingBaseline", "init_args": {}})
    test_record = {"subcommand": "test", "ckpt_path": None, "precision": "32-true", "hardware": "2 CPU cores",
                   "torch_threads": 2, "commit": "def5678", "command": "python recipes/fewshot.py test --config e.yaml"}
    (root / "omniglot" / "embedding_quick" / "checkpoints" / "test.json").write_text(json.dumps(test_record))
    return root


def mtl_model(balancer) -> dict:
    return {"class_path": "lightning_mtl.mtl.MultiTaskModule",
            "init_args": {"architecture": {"class_path": "lightning_mtl.mtl.architectures.HardSharing"},
                          "balancer": balancer}}


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A two-task sweep: three fixed-weight runs, two methods with conflict diagnostics, a single-task run."""
    root = tmp_path / "runs"
    fixed = lambda w: {"class_path": "lightning_mtl.mtl.balancing.FixedWeighting",  # noqa: E731
                       "init_args": {"weights": w}}
    for name, w, acc in (("fixed_0.2", [0.4, 1.6], (0.90, 0.96)), ("fixed_0.5", [1.0, 1.0], (0.94, 0.94)),
                         ("fixed_0.8", [1.6, 0.4], (0.96, 0.89))):
        write_run(root, "pareto", name, mtl_metrics({"left": acc[0], "right": acc[1]}), mtl_model(fixed(w)))
    diag = lambda step, c: {"step": step, "seconds": step / 10, "diag/cos_mean": c,  # noqa: E731
                            "diag/cos/left|right": c, "diag/conflict_frac": float(c < 0)}
    write_run(root, "pareto", "pcgrad", mtl_metrics({"left": 0.95, "right": 0.95}), mtl_model("pcgrad"),
              history=[diag(100, -0.2), {"step": 150, "seconds": 15.0, "train/loss": 1.0}, diag(200, 0.4)])
    write_run(root, "pareto", "upgrad", mtl_metrics({"left": 0.93, "right": 0.97}), mtl_model("upgrad"),
              history=[diag(100, 0.0), diag(200, 0.2)])
    write_run(root, "pareto", "single_task", mtl_metrics({"left": 0.95, "right": 0.95}), mtl_model("equal"))
    curve = [{"step": 500, "seconds": 60.0, "val/acc": 0.90}, {"step": 1000, "seconds": 120.0, "val/acc": 0.93}]
    write_run(root, "alphabets_fewshot", "tr_maml", {"test/acc": 0.9, "test/acc_ci95": 0.01, "test/episodes": 100,
                                                     "test/worst_family_acc": 0.7},
              {"class_path": "lightning_mtl.meta.TRMAML"}, history=curve)
    write_run(root, "alphabets_fewshot", "maml", {"test/acc": 0.92, "test/acc_ci95": 0.01, "test/episodes": 100},
              {"class_path": "lightning_mtl.meta.MAML"}, history=curve[:1])
    for name, acc in (("maml-pcgrad", 0.91), ("maml-upgrad", 0.945)):  # within / beyond the joint interval 1.41 pt
        write_run(root, "alphabets_fewshot", name, {"test/acc": acc, "test/acc_ci95": 0.01, "test/episodes": 100},
                  {"class_path": "lightning_mtl.meta.MAML", "init_args": {"meta_balancer": name[5:]}})
    return root


def test_pareto_front_conflict_and_curves_from_a_sweep(sweep, tmp_path):
    made = report.report(sweep, tmp_path / "results.md", tmp_path / "figures")
    text = (tmp_path / "results.md").read_text()
    assert set(made["pareto"]) == {"per_task_error", "delta_m", "pareto", "conflict", "pcgrad_heatmap",
                                   "upgrad_heatmap"}
    pareto = made["pareto"]["pareto"].axes[0]
    assert (pareto.get_xlabel(), pareto.get_ylabel()) == ("left test error (%)", "right test error (%)")
    front = pareto.lines[0]  # the fixed-weight runs in the order of the left task's weight share
    assert front.get_label() == "fixed weights"
    assert list(front.get_xdata()) == pytest.approx([10.0, 6.0, 4.0])
    assert list(front.get_ydata()) == pytest.approx([4.0, 6.0, 11.0])
    assert [t.get_text() for t in pareto.texts] == ["0.20", "0.50", "0.80"]
    points = {line.get_label(): (line.get_xdata()[0], line.get_ydata()[0]) for line in pareto.lines[1:]}
    assert points == {"pcgrad": pytest.approx((5.0, 5.0)), "single_task": pytest.approx((5.0, 5.0)),
                      "upgrad": pytest.approx((7.0, 3.0))}
    # mean cosine over the logged diagnostics: pcgrad (-0.2 + 0.4) / 2, upgrad (0 + 0.2) / 2; none elsewhere
    assert text.count("mean gradient cosine |") == 1
    for name in ("pcgrad", "upgrad"):
        assert (f"| `{name}` | MultiTaskModule, HardSharing, {name} | 2 | 5.00% | 5.00% | +0.00 | - | - | 32 | - | - "
                f"| +0.100 |") in text
    assert "| `fixed_0.2` | MultiTaskModule, HardSharing, FixedWeighting | 2 | 7.00% | 5.00% |" in text
    conflict = made["pareto"]["conflict"].axes[0]
    assert [line.get_label() for line in conflict.lines if not line.get_label().startswith("_")] == ["pcgrad",
                                                                                                    "upgrad"]
    assert list(conflict.lines[0].get_xdata()) == [100, 200]
    heatmap = made["pareto"]["pcgrad_heatmap"].axes[0]
    assert heatmap.get_title() == "pareto/pcgrad\ntask-gradient cosine, step 200"
    assert heatmap.images[0].get_array().flatten().tolist() == pytest.approx([1.0, 0.4, 0.4, 1.0])
    assert [t.get_text() for t in heatmap.get_xticklabels()] == ["left", "right"]
    # few-shot: the worst family's column, "-" where a run has no families, and the validation curves
    assert "| `tr_maml` | TRMAML | 90.00% | ± 1.00% | 100 | - | - | 32 | - | - | 70.00% | - |" in text
    assert "| `maml` | MAML | 92.00% | ± 1.00% | 100 | - | - | 32 | - | - | - | - |" in text
    # a variant against its base run: the difference and whether it exceeds the two intervals together
    assert "| `maml-pcgrad` | MAML, pcgrad | 91.00% |" in text
    assert "| -1.00 pt vs `maml`, within the intervals |" in text
    assert "| +2.50 pt vs `maml`, better |" in text
    curve = made["alphabets_fewshot"]["val_curve"].axes[0]
    assert curve.get_xlabel() == "training time (min)" and curve.get_ylabel() == "validation accuracy (%)"
    assert [list(line.get_ydata()) for line in curve.lines] == [pytest.approx([90.0]), pytest.approx([90.0, 93.0])]
    assert [line.get_label() for line in curve.lines] == ["maml", "tr_maml"]  # runs without a history draw nothing
    for group, kinds in made.items():
        for kind in kinds:
            assert (tmp_path / "figures" / f"{group}_{kind}.png").stat().st_size > 1000


def test_dense_groups_score_every_metric_with_its_direction(tmp_path):
    root = tmp_path / "runs"
    metrics = lambda acc, mae: {"test/cls/acc": acc, "test/depth/mae": mae,  # noqa: E731
                                "higher_is_better": {"cls/acc": True, "depth/mae": False}}
    write_run(root, "dense", "single_task", metrics(0.5, 0.2), mtl_model("equal"))
    write_run(root, "dense", "mtan", metrics(0.55, 0.3), mtl_model("equal"))
    report.report(root, tmp_path / "results.md", None)
    # Δm = 100 / 2 * ((0.55 - 0.5) / 0.5 - (0.3 - 0.2) / 0.2) = 100 / 2 * (0.1 - 0.5) = -20.00; error of cls only
    assert "| `mtan` | MultiTaskModule, HardSharing, equal | 2 | 45.00% | 50.00% | -20.00 |" in (
        tmp_path / "results.md").read_text()


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
    assert ("| `embedding_quick` | EmbeddingBaseline | 94.00% | ± 0.40% | 1000 | - | test only | 32-true "
            "| 2 CPU cores, 2 threads | def5678 |") in text
    assert "    python recipes/fewshot.py test --config e.yaml" in text
    assert "    python recipes/multitask.py fit --config x.yaml" in text
    for name in ("alphabets_per_task_error", "alphabets_delta_m", "omniglot_accuracy"):
        assert (tmp_path / "docs" / "figures" / f"{name}.png").stat().st_size > 1000
        assert f"(figures/{name}.png)" in text


def test_figures_have_the_expected_axes_and_series(runs, tmp_path):
    made = report.report(runs, tmp_path / "results.md", tmp_path / "figures")
    assert set(made["alphabets"]) == {"per_task_error", "delta_m"} and set(made["omniglot"]) == {"accuracy"}
    per_task, delta, accuracy = (fig.axes[0] for fig in (*made["alphabets"].values(), *made["omniglot"].values()))
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
    assert list(line.get_ydata()) == pytest.approx([94.0, 95.0, 97.0])  # by name: embedding, maml, protonet


def test_an_empty_runs_folder_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `fit` then `test` first"):
        report.report(tmp_path, tmp_path / "results.md", None)


def test_readme_summary_block_is_replaced_and_the_rest_kept(sweep, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- report:summary -->\nold\n<!-- /report:summary -->\n\nafter\n")
    report.main([str(sweep), "--out", str(tmp_path / "results.md"), "--figures", "", "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# title\n\n<!-- report:summary -->\n")
    assert text.endswith("<!-- /report:summary -->\n\nafter\n")
    assert "old" not in text
    # the best Δm% of the two-task group: fixed_0.2 = 100 / 2 (-0.05 / 0.95 + 0.01 / 0.95) = -2.11; upgrad and
    # pcgrad 0.00 (the first of equals), against a single-task mean error of 5.00%
    assert "| `pareto` (6) | 2 | 5.00% | `pcgrad` | +0.00 | - |" in text
    assert "| `alphabets_fewshot` (4) | `maml-upgrad` | MAML, upgrad | 94.50% ± 1.00% | - | - | - | - |" in text
    readme.write_text("# no block\n")
    with pytest.raises(ValueError, match="has no <!-- report:summary -->"):
        report.main([str(sweep), "--out", str(tmp_path / "results.md"), "--figures", "", "--readme", str(readme)])


def test_code_revision_names_the_commit_and_marks_changed_library_files(tmp_path):
    """run.json's commit: the checkout's short hash, "-dirty" when a tracked file of the library differs from it
    (an untracked file or a change outside the library's folders does not count), None outside a checkout."""
    import shutil
    import subprocess

    from lightning_mtl.records import code_revision

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    assert code_revision(tmp_path) is None
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "lightning_mtl").mkdir()
    (tmp_path / "lightning_mtl" / "m.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("a\n")
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert code_revision(tmp_path) == head
    (tmp_path / "notes.txt").write_text("b\n")
    (tmp_path / "lightning_mtl" / "new.py").write_text("")
    assert code_revision(tmp_path) == head
    (tmp_path / "lightning_mtl" / "m.py").write_text("x = 2\n")
    assert code_revision(tmp_path) == head + "-dirty"


def test_benchmark_results_become_the_benchmarks_page_and_the_readme_speed_rows(sweep, tmp_path):
    """runs/benchmarks/*.json (a benchmark script's --json) → docs/benchmarks.md sections with the command, commit and
    hardware above the tables, and the headline as README rows; a file without a record stops the report."""
    from lightning_mtl.records import provenance, table, write_json

    record = {**provenance(["recipes/benchmarks/fewshot_throughput.py", "--json", "x.json"]), "commit": "abc1234"}
    write_json(sweep / "benchmarks" / "fewshot_throughput.json", {
        "record": record, "runs": [],
        "tables": [table("Training step", ["method", "ours / raw", "peak MB", "passed"],
                         [["ProtoNet | 60-way", 0.98612, None, True], ["MAML", 1234.5678, float("nan"), False]],
                         note="Median of 2 repeats.")],
        "headline": [["ProtoNet, 32: training step", "0.99× the raw loop's time"]]})
    readme, page = tmp_path / "README.md", tmp_path / "docs" / "benchmarks.md"
    readme.write_text("<!-- report:summary -->\n<!-- /report:summary -->\n")
    report.main([str(sweep), "--out", str(tmp_path / "results.md"), "--figures", "", "--readme", str(readme),
                 "--benchmarks", str(page)])
    text = page.read_text()
    assert text.startswith("# Benchmarks\n") and "do not edit by hand" in text
    assert "## fewshot_throughput\n\n    python recipes/benchmarks/fewshot_throughput.py --json x.json\n" in text
    assert f"Commit `abc1234`; {record['hardware']}, {record['torch_threads']} thread" in text
    assert ("### Training step\n\n| method | ours / raw | peak MB | passed |\n|---|---|---|---|\n"
            "| ProtoNet \\| 60-way | 0.986 | - | yes |\n| MAML | 1,234.6 | - | no |\n\nMedian of 2 repeats.\n") in text
    assert (f"| `fewshot_throughput` | ProtoNet, 32: training step | 0.99× the raw loop's time | {record['hardware']}"
            in readme.read_text())
    with pytest.raises(ValueError, match="row has 2 cells for 3 columns"):
        table("t", ["a", "b", "c"], [[1, 2]])
    (sweep / "benchmarks" / "old.json").write_text(json.dumps({"runs": []}))  # a script's output of before
    with pytest.raises(ValueError, match="old.json has no 'record' and 'tables'"):
        report.main([str(sweep), "--out", str(tmp_path / "results.md"), "--figures", "", "--benchmarks", str(page)])


@pytest.mark.parametrize("n", [3, 14, 25])
def test_every_series_of_a_figure_has_a_style_of_its_own(n):
    """14 methods in one figure (matplotlib's default cycle repeats after 10): no two share colour and line style."""
    styles = report.series_styles(n)
    assert len(styles) == n and len(set(styles)) == n
    assert len({colour for colour, _ in styles}) == min(n, 10 if n <= 10 else 20)


def test_an_installed_copy_inside_another_repository_names_no_commit(tmp_path, monkeypatch):
    """site-packages inside a user's own git repository: that repository's commit is not the library's code."""
    import shutil
    import subprocess

    import lightning_mtl.records as records

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    site = tmp_path / ".venv" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(records, "REPOSITORY", site)
    assert records.code_revision() is None
    assert records.code_revision(REPO) is not None or not (REPO / ".git").exists()


@pytest.mark.parametrize(("value", "spec", "text"), [
    (-0.0010, "+.3f", "-0.001"), (-0.0004, "+.3f", "+0.000"), (-0.004, "+.2f", "+0.00"), (0.0071, "+.3f", "+0.007"),
    (17.404, ".2f", "17.40"), (None, ".2f", "-")])
def test_table_numbers_keep_their_sign_at_their_precision(value, spec, text):
    """A small mean cosine keeps its sign at three decimals (it was rounded to zero at two); only a value that rounds
    to zero at the table's precision is written as zero, without a minus sign."""
    assert report._fmt(value, spec) == text
