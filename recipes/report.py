"""Results generated from runs: the tables of ``docs/results.md`` and their figures, from a runs folder.

    python recipes/report.py runs/                          # writes docs/results.md and docs/figures/*.png
    python recipes/report.py runs/ --out /tmp/results.md --figures /tmp/figures

A run is a folder holding ``test_metrics.json`` (written by ``test``) beside its ``checkpoints/`` (``config.yaml``,
the resolved configuration, and ``run.json``, the record of the fit: command, hardware, precision, torch threads,
commit, steps, wall time). Runs are grouped by their parent folder (``runs/<dataset>/<config>``); a group is
multi-task when its metrics carry directions (``higher_is_better``), few-shot when they hold ``test/acc``.

* multi-task groups: mean test error over the tasks (``1 - accuracy`` of every ``<task>/acc``) and Δm% against the
  group's ``single_task*`` run on the tasks the run has (Maninis et al. 2019, every metric once, positive = better;
  ``recipes/delta_m.py``); figures ``<group>_per_task_error.png`` and ``<group>_delta_m.png``;
* few-shot groups: test accuracy ± 95% CI over the fixed test episodes; figure ``<group>_accuracy.png``.

Every number in the tables comes from the files of a run; nothing is typed by hand. Runs made before ``run.json``
existed show the steps of their last checkpoint and "-" where the record is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from delta_m import delta_m  # noqa: E402


@dataclass
class Run:
    """One tested run: its metrics, configuration and fit record."""

    group: str
    name: str
    metrics: dict
    config: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    @property
    def multitask(self) -> bool:
        return bool(self.metrics.get("higher_is_better"))

    def accuracies(self) -> dict[str, float]:
        """``task → test accuracy`` of a multi-task run."""
        return {k[len("test/"):-len("/acc")]: float(v) for k, v in self.metrics.items()
                if k.startswith("test/") and k.endswith("/acc") and k.count("/") == 2}

    def describe(self) -> str:
        """The model in a few words: class, architecture, balancer (from the resolved configuration)."""
        model = self.config.get("model") or {}
        args = model.get("init_args") or {}
        parts = [str(model.get("class_path", "?")).rsplit(".", 1)[-1]]
        for key in ("architecture", "backbone", "balancer", "meta_balancer"):
            value = args.get(key)
            if isinstance(value, dict) and value.get("class_path"):
                parts.append(str(value["class_path"]).rsplit(".", 1)[-1])
            elif isinstance(value, str):
                parts.append(value)
        return ", ".join(parts)


def find_runs(root: str | Path) -> list[Run]:
    """Every run under ``root`` (a folder with ``test_metrics.json``), sorted by group and name."""
    runs = []
    for metrics_file in sorted(Path(root).rglob("test_metrics.json")):
        folder = metrics_file.parent
        config, record = {}, {}
        for name, target in (("config.yaml", "config"), ("run.json", "record")):
            path = folder / "checkpoints" / name
            if path.is_file():
                text = path.read_text()
                value = yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)
                config, record = (value, record) if target == "config" else (config, value)
        if "global_step" not in record and (folder / "checkpoints" / "last.ckpt").is_file():
            import torch

            state = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            record = {**record, "global_step": int(state.get("global_step", 0)), "from_checkpoint": True}
        group = folder.parent.relative_to(root).as_posix() if folder.parent != Path(root) else "."
        runs.append(Run(group, folder.name, json.loads(metrics_file.read_text()), config, record))
    return sorted(runs, key=lambda r: (r.group, r.name))


def multitask_rows(runs: list[Run]) -> list[dict]:
    """Per run: tasks, mean test error, Δm% vs the group's single-task run (on the run's own tasks)."""
    baseline = next((r for r in runs if r.name.startswith("single_task")), None)
    rows = []
    for run in runs:
        acc = run.accuracies()
        row = {"run": run, "tasks": len(acc), "error": 100 * (1 - sum(acc.values()) / len(acc)) if acc else None,
               "delta_m": None, "baseline_error": None}
        if baseline is not None and acc:
            base = baseline.accuracies()
            if set(acc) <= set(base):
                directions = {f"{t}/acc": True for t in acc}
                row["delta_m"] = delta_m({f"{t}/acc": acc[t] for t in acc}, {f"{t}/acc": base[t] for t in acc},
                                         directions)
                row["baseline_error"] = 100 * (1 - sum(base[t] for t in acc) / len(acc))
        rows.append(row)
    return rows


def _fit_cells(run: Run) -> tuple[str, str, str]:
    record = run.record
    steps = f"{record['global_step']}" + ("*" if record.get("from_checkpoint") else "") if record else "-"
    seconds = record.get("fit_seconds")
    fit = f"{int(seconds // 60)} min {int(seconds % 60):02d} s" if seconds is not None else "-"
    trainer = run.config.get("trainer") or {}
    precision = str(record.get("precision") or trainer.get("precision") or "-")
    return steps, fit, precision


def multitask_figures(group: str, rows: list[dict]):
    """Per-task test error of every run, and Δm% per run: two matplotlib figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for row in rows for t in row["run"].accuracies()})
    per_task, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(tasks) * len(rows) / 2), 4))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        acc = row["run"].accuracies()
        xs = [j + i * width for j, t in enumerate(tasks) if t in acc]
        ax.bar(xs, [100 * (1 - acc[t]) for t in tasks if t in acc], width=width, label=row["run"].name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=90, fontsize=6)
    ax.set_xlabel("task")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{group}: per-task test error")
    ax.legend(fontsize=6)
    per_task.tight_layout()
    scored = [row for row in rows if row["delta_m"] is not None]
    bars, ax = plt.subplots(figsize=(6, 4))
    ax.bar([row["run"].name for row in scored], [row["delta_m"] for row in scored],
           color=["tab:green" if row["delta_m"] >= 0 else "tab:red" for row in scored])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("run")
    ax.set_ylabel("Δm% vs single-task (positive = better)")
    ax.set_title(f"{group}: Δm%")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    bars.tight_layout()
    return per_task, bars


def fewshot_figure(group: str, runs: list[Run]):
    """Test accuracy ± 95% CI of every run: a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 4))
    names = [r.name for r in runs]
    ax.errorbar(names, [100 * r.metrics["test/acc"] for r in runs],
                yerr=[100 * r.metrics.get("test/acc_ci95", 0.0) for r in runs], fmt="o", capsize=4)
    ax.set_xlabel("run")
    ax.set_ylabel("test accuracy (%), 95% CI")
    ax.set_title(f"{group}: few-shot test accuracy")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    figure.tight_layout()
    return figure


def report(root: str | Path, out: str | Path, figures: str | Path | None) -> dict[str, list]:
    """Write the tables to ``out`` and the figures (PNG) into ``figures``; returns ``{group: [figures]}``."""
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no run with a test_metrics.json under {root}; run `fit` then `test` first.")
    out = Path(out)
    figure_dir = Path(figures) if figures is not None else None
    lines = ["# Results", "", f"Generated by `python recipes/report.py {Path(root).as_posix()}` from the runs' own "
             "files (`test_metrics.json`, `checkpoints/config.yaml`, `checkpoints/run.json`); do not edit by hand. "
             "Steps marked * are those of the run's last checkpoint (a run without `run.json`).", ""]
    made: dict[str, list] = {}
    for group in sorted({r.group for r in runs}):
        members = [r for r in runs if r.group == group]
        lines += [f"## {group}", ""]
        multitask = [r for r in members if r.multitask]
        fewshot = [r for r in members if not r.multitask and "test/acc" in r.metrics]
        if multitask:
            rows = multitask_rows(multitask)
            lines += ["| run | model | tasks | mean test error | single-task on the same tasks | Δm% | steps "
                      "| fit time | precision | hardware | commit |", "|" + "---|" * 11]
            for row in rows:
                run = row["run"]
                steps, fit, precision = _fit_cells(run)
                fmt = lambda v, spec: "-" if v is None else format(v if round(v, 2) else 0.0, spec)  # noqa: E731
                lines.append(f"| `{run.name}` | {run.describe()} | {row['tasks']} | {fmt(row['error'], '.2f')}% | "
                             f"{fmt(row['baseline_error'], '.2f')}% | {fmt(row['delta_m'], '+.2f')} | {steps} | {fit} "
                             f"| {precision} | {run.record.get('hardware', '-')} | {run.record.get('commit', '-')} |")
            commands = [f"    {r.record['command']}" for r in multitask if r.record.get("command")]
            if commands:
                lines += ["", "Commands:", "", *commands]
            if figure_dir is not None:
                made[group] = list(multitask_figures(group, rows))
        if fewshot:
            lines += ["", "| run | model | test accuracy | 95% CI | episodes | steps | fit time | precision "
                      "| hardware | commit |", "|" + "---|" * 10]
            for run in fewshot:
                steps, fit, precision = _fit_cells(run)
                lines.append(f"| `{run.name}` | {run.describe()} | {100 * run.metrics['test/acc']:.2f}% | "
                             f"± {100 * run.metrics.get('test/acc_ci95', 0.0):.2f}% | "
                             f"{int(run.metrics.get('test/episodes', 0))} | {steps} | {fit} | {precision} | "
                             f"{run.record.get('hardware', '-')} | {run.record.get('commit', '-')} |")
            if figure_dir is not None:
                made.setdefault(group, []).append(fewshot_figure(group, fewshot))
        lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    if figure_dir is not None:
        figure_dir.mkdir(parents=True, exist_ok=True)
        for group, figs in made.items():
            for fig in figs:
                kind = {"per-task test error": "per_task_error", "Δm%": "delta_m",
                        "few-shot test accuracy": "accuracy"}[fig.axes[0].get_title().split(": ", 1)[1]]
                path = figure_dir / f"{group.replace('/', '_')}_{kind}.png"
                fig.savefig(path, dpi=120)
                try:
                    link = path.resolve().relative_to(out.parent.resolve()).as_posix()
                except ValueError:
                    link = path.resolve().as_posix()
                lines.append(f"![{group} {kind}]({link})")
        lines.append("")
    out.write_text("\n".join(lines))
    return made


def main(argv: list[str] | None = None) -> dict[str, list]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", help="the runs folder (e.g. runs/)")
    parser.add_argument("--out", default="docs/results.md", help="the Markdown file to write")
    parser.add_argument("--figures", default="docs/figures", help="folder of the PNG figures; '' for none")
    args = parser.parse_args(argv)
    return report(args.runs, args.out, args.figures or None)


if __name__ == "__main__":
    main()
