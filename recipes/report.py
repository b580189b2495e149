"""Results generated from runs: the tables of ``docs/results.md`` and their figures, from a runs folder.

    python recipes/report.py runs/                          # writes docs/results.md and docs/figures/*.png
    python recipes/report.py runs/ --out /tmp/results.md --figures /tmp/figures
    python recipes/report.py runs/ --readme README.md       # and the summary tables of the README
    python recipes/report.py runs/ --benchmarks /tmp/bench.md  # the benchmarks page elsewhere (default docs/)

A run is a folder holding ``test_metrics.json`` (written by ``test``) beside its ``checkpoints/`` (``config.yaml``,
the resolved configuration; ``run.json``, the record of the fit: command, hardware, precision, torch threads, commit,
steps, wall time; ``test.json``, the record of the test, which stands for the fit's in a run tested without one;
``metrics.jsonl``, the metric history of the fit: :mod:`lightning_mtl.history`). Runs are grouped by
their parent folder (``runs/<dataset>/<config>``); a group is multi-task when its metrics carry directions
(``higher_is_better``), few-shot when they hold ``test/acc``.

* multi-task groups: mean test error over the tasks (``1 - accuracy`` of every ``<task>/acc``) and Δm% against the
  group's ``single_task*`` run on every metric the two share (Maninis et al. 2019, every metric once, positive =
  better; ``recipes/delta_m.py``); figures ``<group>_per_task_error.png`` and ``<group>_delta_m.png``;
* two-task groups with fixed-weight runs (``FixedWeighting``, e.g. ``recipes/sweep.py``'s Pareto sweep): the Pareto
  front, ``<group>_pareto.png``: test error of one task against the other, the fixed-weight runs as the reference
  curve and every other run as a labelled point;
* task-gradient conflict, where the runs logged ``diag/*`` (``diagnostics_every``; a ``meta_balancer``'s episode
  gradients too): the mean cosine over training per run (table column and ``<group>_conflict.png``) and the K x K
  cosine heatmap at the end of training (``<group>_<run>_heatmap.png``, at most 16 tasks);
* few-shot groups: test accuracy ± 95% CI over the fixed test episodes (and the worst task family's accuracy where
  the episodes carry families), ``<group>_accuracy.png``; validation accuracy against training time per run,
  ``<group>_val_curve.png``.

Benchmarks: every ``<runs>/benchmarks/*.json`` written by a script of ``recipes/benchmarks/`` with ``--json`` (its
``record``: command, commit, hardware, versions, date; its ``tables``; its ``headline``) becomes a section of
``docs/benchmarks.md``, and its headline a row of the README's speed table.

Every number in the tables comes from the files of a run; nothing is typed by hand. Runs made before ``run.json``
existed show the steps of their last checkpoint and "-" where the record is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from delta_m import delta_m  # noqa: E402

from lightning_mtl.figures import _pyplot  # noqa: E402
from lightning_mtl.history import read_history  # noqa: E402


def hardware_cell(record: dict) -> str:
    """``record``'s hardware with its torch threads (a run's ``run.json`` or a benchmark's ``record``)."""
    hardware, threads = record.get("hardware", "-"), record.get("torch_threads")
    return hardware if threads is None else f"{hardware}, {threads} thread{'s' if threads != 1 else ''}"


@dataclass
class Run:
    """One tested run: its metrics, configuration and fit record."""

    group: str
    name: str
    metrics: dict
    config: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    history: list[dict] = field(default_factory=list)

    @property
    def multitask(self) -> bool:
        return bool(self.metrics.get("higher_is_better"))

    def accuracies(self) -> dict[str, float]:
        """``task → test accuracy`` of a multi-task run."""
        return {k[len("test/"):-len("/acc")]: float(v) for k, v in self.metrics.items()
                if k.startswith("test/") and k.endswith("/acc") and k.count("/") == 2}

    def fixed_weights(self) -> list[float] | None:
        """The task weights of a ``FixedWeighting`` run (``None`` for any other balancer)."""
        balancer = ((self.config.get("model") or {}).get("init_args") or {}).get("balancer")
        if isinstance(balancer, dict) and str(balancer.get("class_path", "")).endswith("FixedWeighting"):
            weights = (balancer.get("init_args") or {}).get("weights")
            return None if weights is None else [float(w) for w in weights]
        return None

    def conflict(self) -> tuple[float | None, dict[str, float]]:
        """Mean ``diag/cos_mean`` over the fit's logged diagnostics, and the last row's ``cos/<a>|<b>`` values."""
        rows = [r for r in self.history if "diag/cos_mean" in r]
        if not rows:
            return None, {}
        last = {k[len("diag/"):]: v for k, v in rows[-1].items() if k.startswith("diag/cos/")}
        return sum(r["diag/cos_mean"] for r in rows) / len(rows), last

    def hardware(self) -> str:
        """Where the fit ran, with its torch threads (``run.json``; ``test.json`` for a run tested without a fit)."""
        return hardware_cell(self.record)

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
        checkpoints = folder / "checkpoints"
        config = yaml.safe_load((checkpoints / "config.yaml").read_text()) if (checkpoints / "config.yaml").is_file() \
            else {}
        # the fit's record; a run tested without a fit of its own (a frozen pre-trained embedding) has its test's
        record = next((json.loads(path.read_text()) for path in (checkpoints / "run.json", checkpoints / "test.json")
                       if path.is_file()), {})
        if "global_step" not in record and (checkpoints / "last.ckpt").is_file():
            import torch

            state = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
            record = {**record, "global_step": int(state.get("global_step", 0)), "from_checkpoint": True}
        # runs directly under root (a sweep's folder) form the group named after it
        group = folder.parent.relative_to(root).as_posix() if folder.parent != Path(root) else Path(root).resolve().name
        history = read_history(checkpoints / "metrics.jsonl")
        runs.append(Run(group, folder.name, json.loads(metrics_file.read_text()), config, record, history))
    return sorted(runs, key=lambda r: (r.group, r.name))


def directional_metrics(run: Run) -> tuple[dict[str, float], dict[str, bool]]:
    """``<task>/<metric>`` → test value and → higher-is-better, for every metric whose direction the run states."""
    directions = {str(k): bool(v) for k, v in (run.metrics.get("higher_is_better") or {}).items()}
    values = {k: float(run.metrics[f"test/{k}"]) for k in directions if f"test/{k}" in run.metrics}
    return values, {k: directions[k] for k in values}


def multitask_rows(runs: list[Run]) -> list[dict]:
    """Per run: tasks, mean test error over its accuracy tasks, Δm% vs the group's single-task run on every metric
    the run has (when the single-task run has them all), mean task-gradient cosine over training."""
    baseline = next((r for r in runs if r.name.startswith("single_task")), None)
    base_values = directional_metrics(baseline)[0] if baseline is not None else {}
    rows = []
    for run in runs:
        acc = run.accuracies()
        values, directions = directional_metrics(run)
        tasks = {k.split("/")[0] for k in values} or set(acc)
        row = {"run": run, "tasks": len(tasks), "error": 100 * (1 - sum(acc.values()) / len(acc)) if acc else None,
               "delta_m": None, "baseline_error": None, "cos_mean": run.conflict()[0]}
        if values and set(values) <= set(base_values):
            try:
                row["delta_m"] = delta_m(values, {k: base_values[k] for k in values}, directions)
            except ValueError:  # a zero or non-finite baseline value: Δm% is undefined
                row["delta_m"] = None
            if acc and all(f"{t}/acc" in base_values for t in acc):
                row["baseline_error"] = 100 * (1 - sum(base_values[f"{t}/acc"] for t in acc) / len(acc))
        rows.append(row)
    return rows


def _fit_cells(run: Run) -> tuple[str, str, str]:
    record = run.record
    steps = f"{record['global_step']}" + ("*" if record.get("from_checkpoint") else "") if "global_step" in record \
        else "-"
    seconds = record.get("fit_seconds")
    fit = (f"{int(seconds // 60)} min {int(seconds % 60):02d} s" if seconds is not None
           else "test only" if record.get("subcommand") == "test" else "-")
    trainer = run.config.get("trainer") or {}
    precision = str(record.get("precision") or trainer.get("precision") or "-")
    return steps, fit, precision


def series_styles(n: int) -> list[tuple]:
    """``n`` distinguishable (colour, line style) pairs: tab10's colours up to 10 series, tab20's up to 20, then
    tab20 again with other line styles (matplotlib's default cycle repeats its 10 colours)."""
    plt = _pyplot()
    colours = plt.get_cmap("tab10" if n <= 10 else "tab20").colors
    return [(colours[i % len(colours)], ("-", "--", ":", "-.")[i // len(colours) % 4]) for i in range(n)]


def multitask_figures(group: str, rows: list[dict]):
    """Per-task test error of every run, and Δm% per run: two matplotlib figures."""
    plt = _pyplot()
    tasks = sorted({t for row in rows for t in row["run"].accuracies()})
    per_task, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(tasks) * len(rows) / 2), 4))
    width = 0.8 / max(len(rows), 1)
    for i, (row, (colour, _)) in enumerate(zip(rows, series_styles(len(rows)), strict=True)):
        acc = row["run"].accuracies()
        xs = [j + i * width for j, t in enumerate(tasks) if t in acc]
        ax.bar(xs, [100 * (1 - acc[t]) for t in tasks if t in acc], width=width, color=colour,
               hatch="//" if i >= 20 else None, label=row["run"].name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=90, fontsize=6)
    ax.set_xlabel("task")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{group}: per-task test error")
    ax.legend(fontsize=6, ncol=1 + len(rows) // 12)
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


def pareto_tasks(runs: list[Run]) -> list[str] | None:
    """The two tasks of a group that has a Pareto front to draw (two accuracy tasks, two or more fixed-weight runs)."""
    tasks = sorted({t for r in runs for t in r.accuracies()})
    fixed = [r for r in runs if r.fixed_weights() is not None and set(r.accuracies()) == set(tasks)]
    return tasks if len(tasks) == 2 and len(fixed) >= 2 else None


def pareto_figure(group: str, runs: list[Run], tasks: list[str]):
    """Test error of ``tasks[0]`` against ``tasks[1]``: the fixed-weight runs joined in the order of the first task's
    weight share (the reference front), every other run with both tasks as a labelled point."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 5))
    errors = {r.name: [100 * (1 - r.accuracies()[t]) for t in tasks] for r in runs if set(r.accuracies()) == set(tasks)}
    fixed = sorted((r for r in runs if r.fixed_weights() is not None and r.name in errors),
                   key=lambda r: r.fixed_weights()[0] / sum(r.fixed_weights()))
    ax.plot([errors[r.name][0] for r in fixed], [errors[r.name][1] for r in fixed], "o--", color="gray",
            label="fixed weights")
    for r in fixed:
        w = r.fixed_weights()
        ax.annotate(f"{w[0] / sum(w):.2f}", errors[r.name], textcoords="offset points", xytext=(4, -10), fontsize=7,
                    color="gray")
    colours = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # grey is the reference's
    points = [r for r in runs if r.fixed_weights() is None and r.name in errors]
    for i, r in enumerate(points):
        ax.plot(*errors[r.name], "osD^v"[i // len(colours) % 5], color=colours[i % len(colours)], label=r.name)
    ax.set_xlabel(f"{tasks[0]} test error (%)")
    ax.set_ylabel(f"{tasks[1]} test error (%)")
    ax.set_title(f"{group}: Pareto front")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def history_figure(group: str, runs: list[Run], key: str, x: str, labels: tuple[str, str, str], scale: float = 1.0,
                   x_scale: float = 1.0, marker: str | None = None):
    """``scale * key`` against ``x_scale * x`` over the fit's logged rows (``metrics.jsonl``), one line per run that
    logged ``key``; ``labels``: x label, y label, title after the group."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 4))
    drawn = [(r, rows) for r in runs if (rows := [row for row in r.history if key in row])]
    for (r, rows), (colour, line) in zip(drawn, series_styles(len(drawn)), strict=True):
        ax.plot([x_scale * row[x] for row in rows], [scale * row[key] for row in rows], marker=marker, linestyle=line,
                color=colour, markersize=3, label=r.name)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(f"{group}: {labels[2]}", fontsize=10)
    ax.legend(fontsize=6, ncol=1 + len(drawn) // 10)
    figure.tight_layout()
    return figure


def conflict_figure(group: str, runs: list[Run]):
    """Mean pairwise task-gradient cosine (``diag/cos_mean``) against the training step, one line per run."""
    figure = history_figure(group, runs, "diag/cos_mean", "step",
                            ("training step", "mean task-gradient cosine", "gradient conflict"))
    figure.axes[0].axhline(0, color="black", linewidth=0.8)
    return figure


def heatmap_figure(group: str, run: Run):
    """The K x K task-gradient cosines of the fit's last diagnostics (drawn by
    :func:`lightning_mtl.figures.conflict_heatmap`)."""
    from lightning_mtl.figures import conflict_heatmap

    _, last = run.conflict()
    tasks: list[str] = []  # in the order of the pairs (0|1, 0|2, ..., 1|2, ...): the model's task order
    for pair in last:
        tasks += [t for t in pair[len("cos/"):].split("|") if t not in tasks]
    step = next(row["step"] for row in reversed(run.history) if "diag/cos_mean" in row)
    figure = conflict_heatmap(last, tasks, step)
    figure.axes[0].set_title(f"{group}/{run.name}\ntask-gradient cosine, step {step}", fontsize=9)
    return figure


def fewshot_figure(group: str, runs: list[Run]):
    """Test accuracy ± 95% CI of every run: a matplotlib figure."""
    plt = _pyplot()
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


def val_curve_figure(group: str, runs: list[Run]):
    """Validation accuracy against the fit's wall-clock time, one line per run (from ``metrics.jsonl``)."""
    return history_figure(group, runs, "val/acc", "seconds", ("training time (min)", "validation accuracy (%)",
                          "validation accuracy against time"), scale=100, x_scale=1 / 60, marker="o")


def _fmt(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``; "-" for ``None``, and a value that rounds to zero at that precision written
    as zero (no "-0.00")."""
    if value is None:
        return "-"
    text = format(value, spec)
    return format(0.0, spec) if float(text) == 0 else text


def multitask_table(runs: list[Run], rows: list[dict]) -> list[str]:
    conflict = any(row["cos_mean"] is not None for row in rows)
    header = ("| run | model | tasks | mean test error | single-task on the same tasks | Δm% | steps | fit time "
              "| precision | hardware | commit |" + (" mean gradient cosine |" if conflict else ""))
    lines = [header, "|" + "---|" * (12 if conflict else 11)]
    for row in rows:
        run = row["run"]
        steps, fit, precision = _fit_cells(run)
        line = (f"| `{run.name}` | {run.describe()} | {row['tasks']} | {_fmt(row['error'], '.2f')}% | "
                f"{_fmt(row['baseline_error'], '.2f')}% | {_fmt(row['delta_m'], '+.2f')} | {steps} | {fit} "
                f"| {precision} | {run.hardware()} | {run.record.get('commit', '-')} |")
        lines.append(line + (f" {_fmt(row['cos_mean'], '+.3f')} |" if conflict else ""))
    commands = [f"    {r.record['command']}" for r in runs if r.record.get("command")]
    return lines + (["", "Commands:", "", *commands] if commands else [])


def against_base(run: Run, runs: list[Run]) -> str | None:
    """A variant ``<base>-<change>`` (e.g. ``maml-pcgrad``, the folder a recipe gives another model or balancer on
    a config) against its base run ``<base>`` of the same group: the accuracy difference in points and whether it
    exceeds the two 95% intervals together (``None`` when the group has no such base run)."""
    if "-" not in run.name:
        return None
    base = next((r for r in runs if r.name == run.name.rsplit("-", 1)[0]), None)
    if base is None:
        return None
    diff = 100 * (run.metrics["test/acc"] - base.metrics["test/acc"])
    ci = 100 * (run.metrics.get("test/acc_ci95", 0.0) ** 2 + base.metrics.get("test/acc_ci95", 0.0) ** 2) ** 0.5
    verdict = "within the intervals" if abs(diff) <= ci else ("better" if diff > 0 else "worse")
    return f"{diff:+.2f} pt vs `{base.name}`, {verdict}"


def fewshot_table(runs: list[Run]) -> list[str]:
    families = any("test/worst_family_acc" in r.metrics for r in runs)
    variants = {r.name: against_base(r, runs) for r in runs}
    compared = any(v is not None for v in variants.values())
    lines = ["| run | model | test accuracy | 95% CI | episodes | steps | fit time | precision | hardware | commit |"
             + (" worst family |" if families else "") + (" against its base run |" if compared else ""),
             "|" + "---|" * (10 + families + compared)]
    for run in runs:
        steps, fit, precision = _fit_cells(run)
        line = (f"| `{run.name}` | {run.describe()} | {100 * run.metrics['test/acc']:.2f}% | "
                f"± {100 * run.metrics.get('test/acc_ci95', 0.0):.2f}% | {int(run.metrics.get('test/episodes', 0))} | "
                f"{steps} | {fit} | {precision} | {run.hardware()} | "
                f"{run.record.get('commit', '-')} |")
        worst = run.metrics.get("test/worst_family_acc")
        line += (f" {100 * worst:.2f}% |" if worst is not None else " - |") if families else ""
        lines.append(line + (f" {variants[run.name] or '-'} |" if compared else ""))
    commands = [f"    {r.record['command']}" for r in runs if r.record.get("command")]
    return lines + (["", "Commands:", "", *commands] if commands else [])


def report(root: str | Path, out: str | Path, figures: str | Path | None) -> dict[str, dict]:
    """Write the tables to ``out`` and the figures (PNG) into ``figures``; returns ``{group: {kind: figure}}``
    (kinds: ``per_task_error``, ``delta_m``, ``pareto``, ``conflict``, ``<run>_heatmap``, ``accuracy``,
    ``val_curve``)."""
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no run with a test_metrics.json under {root}; run `fit` then `test` first.")
    out = Path(out)
    figure_dir = Path(figures) if figures is not None else None
    lines = ["# Results", "", f"Generated by `python recipes/report.py {Path(root).as_posix()}` from the runs' own "
             "files (`test_metrics.json`, `checkpoints/config.yaml`, `checkpoints/run.json`, "
             "`checkpoints/test.json`, `checkpoints/metrics.jsonl`); do not edit by hand. Steps marked * are those of "
             "the run's last checkpoint (a run without `run.json`); \"test only\": a model tested without a fit of its "
             "own (the record is the test's).", ""]
    made: dict[str, dict] = {}
    for group in sorted({r.group for r in runs}):
        members = [r for r in runs if r.group == group]
        lines += [f"## {group}", ""]
        multitask = [r for r in members if r.multitask]
        fewshot = [r for r in members if not r.multitask and "test/acc" in r.metrics]
        figs: dict = {}
        if multitask:
            rows = multitask_rows(multitask)
            lines += multitask_table(multitask, rows)
            figs["per_task_error"], figs["delta_m"] = multitask_figures(group, rows)
            if (tasks := pareto_tasks(multitask)) is not None:
                figs["pareto"] = pareto_figure(group, multitask, tasks)
        if fewshot:
            lines += ["", *fewshot_table(fewshot)]
            figs["accuracy"] = fewshot_figure(group, fewshot)
            if any("val/acc" in row for r in fewshot for row in r.history):
                figs["val_curve"] = val_curve_figure(group, fewshot)
        if any(r.conflict()[0] is not None for r in members):
            figs["conflict"] = conflict_figure(group, members)
            for r in members:
                if r.conflict()[1]:
                    figs[f"{r.name}_heatmap"] = heatmap_figure(group, r)
        lines.append("")
        if figure_dir is not None:  # each figure under its group's tables, written and closed at once
            figure_dir.mkdir(parents=True, exist_ok=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            for kind, fig in figs.items():
                path = figure_dir / f"{group.replace('/', '_')}_{kind}.png"
                fig.savefig(path, dpi=120)
                try:
                    link = path.resolve().relative_to(out.parent.resolve()).as_posix()
                except ValueError:
                    link = path.resolve().as_posix()
                lines.append(f"![{group} {kind}]({link})")
            lines += [""] if figs else []
            made[group] = figs
        for fig in figs.values():
            _pyplot().close(fig)  # the figure objects stay readable (returned); pyplot forgets them
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return made


@dataclass
class Benchmark:
    """One benchmark's results file (``<runs>/benchmarks/<name>.json``)."""

    name: str
    record: dict
    tables: list[dict]
    headline: list[list[str]]

    def hardware(self) -> str:
        """Where the benchmark ran, with its torch threads (its ``record``)."""
        return hardware_cell(self.record)


def find_benchmarks(root: str | Path) -> list[Benchmark]:
    """Every ``<root>/benchmarks/*.json`` with a ``record`` and ``tables``, sorted by name.

    Raises:
        ValueError: a JSON there lacks them (written by a benchmark script from before they existed: rerun it).
    """
    folder = Path(root) / "benchmarks"
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not {"record", "tables"} <= set(data):
            raise ValueError(f"{path} has no 'record' and 'tables': not written by a current recipes/benchmarks/ "
                             f"script with --json; rerun the benchmark (its command is in the script's docstring) "
                             f"or move the file out of {folder}.")
        found.append(Benchmark(path.stem, data["record"], data["tables"], data.get("headline") or []))
    return found


def cell(value: object) -> str:
    """A table cell: floats to 3 decimals (1 from 100 up), ``None`` and NaN as ``-``, booleans as yes / no."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{1 if abs(value) >= 100 else 3}f}"
    return str(value).replace("|", "\\|")


def markdown_table(columns: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(map(cell, row)) + " |" for row in rows)]


def benchmarks_page(benchmarks: list[Benchmark], source: str) -> list[str]:
    """``docs/benchmarks.md``: per benchmark its command, commit, hardware and date, then its tables."""
    lines = ["# Benchmarks", "", f"Generated by `python recipes/report.py {source}` from the files the benchmark "
             f"scripts of `recipes/benchmarks/` write with `--json` into `{source}/benchmarks/`; do not edit by hand. "
             "Speed is compared as ratios measured within one run (the same process, data and alternating repeats), "
             "so that the machine's load cancels; absolute times depend on the machine and its load. Rerun a section's "
             "command to measure today's code.", ""]
    for bench in benchmarks:
        r = bench.record
        lines += [f"## {bench.name}", "", f"    {r.get('command', '-')}", "",
                  f"Commit `{r.get('commit') or '-'}`; {bench.hardware()}; Python {r.get('python', '-')}, torch "
                  f"{r.get('torch', '-')}, Lightning {r.get('lightning', '-')}; {r.get('date', '-')}.", ""]
        for t in bench.tables:
            lines += [f"### {t['title']}", "", *markdown_table(t["columns"], t["rows"]), ""]
            lines += [t["note"], ""] if t.get("note") else []
    return lines


README_BEGIN, README_END = "<!-- report:summary -->", "<!-- /report:summary -->"


def summary(runs: list[Run], benchmarks: list[Benchmark] = ()) -> list[str]:
    """One table per half for the README: per multi-task group its single-task error and the best Δm% run; per
    few-shot group its most accurate run, with the accuracy ± CI (and worst family); then the benchmarks' headlines
    (speed ratios measured within one run)."""
    lines = ["Multi-task (Δm% against one network per task, every metric once; positive = better):", "",
             "| runs | tasks | single-task error (classification tasks) | best run | its Δm% | hardware |",
             "|---|---|---|---|---|---|"]
    for group in sorted({r.group for r in runs if r.multitask}):
        rows = multitask_rows([r for r in runs if r.group == group and r.multitask])
        scored = [row for row in rows if row["delta_m"] is not None and not row["run"].name.startswith("single_task")]
        base = next((row for row in rows if row["run"].name.startswith("single_task")), None)
        if not scored or base is None:
            continue
        best = max(scored, key=lambda row: round(row["delta_m"], 6))  # ties (to rounding): the first by name
        lines.append(f"| `{group}` ({len(rows)}) | {best['tasks']} | {_fmt(base['error'], '.2f')}% | "
                     f"`{best['run'].name}` | {_fmt(best['delta_m'], '+.2f')} | "
                     f"{best['run'].hardware()} |")
    lines += ["", "Few-shot (test accuracy ± 95% CI over the fixed test episodes; the best run of each group):", "",
              "| runs | best run | model | test accuracy | worst family | steps | fit time | hardware |",
              "|" + "---|" * 8]
    for group in sorted({r.group for r in runs if not r.multitask and "test/acc" in r.metrics}):
        members = [r for r in runs if r.group == group and not r.multitask and "test/acc" in r.metrics]
        run = max(members, key=lambda r: round(r.metrics["test/acc"], 6))  # ties: the first by name
        steps, fit, _ = _fit_cells(run)
        worst = run.metrics.get("test/worst_family_acc")
        lines.append(f"| `{group}` ({len(members)}) | `{run.name}` | {run.describe()} | "
                     f"{100 * run.metrics['test/acc']:.2f}% ± {100 * run.metrics.get('test/acc_ci95', 0.0):.2f}% | "
                     f"{'-' if worst is None else f'{100 * worst:.2f}%'} | {steps} | {fit} | "
                     f"{run.hardware()} |")
    headlines = [(b, h) for b in benchmarks for h in b.headline]
    if headlines:
        lines += ["", "Speed (ratios within one run; every row's command in docs/benchmarks.md):", "",
                  "| benchmark | measured | result | hardware |", "|---|---|---|---|"]
        lines += [f"| `{b.name}` | {cell(what)} | {cell(result)} | {b.hardware()} |" for b, (what, result) in headlines]
    return lines


def update_readme(path: str | Path, runs: list[Run], source: str, benchmarks: list[Benchmark] = ()) -> None:
    """Replace what stands between the README's ``<!-- report:summary -->`` markers by :func:`summary`.

    Raises:
        ValueError: the file lacks the markers (they say where the tables go).
    """
    path = Path(path)
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_BEGIN} ... {README_END} block; add the two lines where the summary "
                         f"tables go.")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    block = [README_BEGIN, f"<!-- generated by `python recipes/report.py {source} --readme {path.name}`; do not edit "
             f"-->", *summary(runs, benchmarks), README_END]
    path.write_text(head + "\n".join(block) + tail)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", help="the runs folder (e.g. runs/)")
    parser.add_argument("--out", default="docs/results.md", help="the Markdown file to write")
    parser.add_argument("--figures", default="docs/figures", help="folder of the PNG figures; '' for none")
    parser.add_argument("--benchmarks", default="docs/benchmarks.md", help="the benchmarks page, written when "
                        "<runs>/benchmarks/ holds results; '' for none")
    parser.add_argument("--readme", default=None, help="also write the summary tables into this file's "
                        "<!-- report:summary --> block (e.g. README.md)")
    args = parser.parse_args(argv)
    source = Path(args.runs).as_posix().rstrip("/")
    benchmarks = find_benchmarks(args.runs)  # read first: a stale file stops the report before it writes anything
    made = report(args.runs, args.out, args.figures or None)
    if args.benchmarks and benchmarks:
        Path(args.benchmarks).parent.mkdir(parents=True, exist_ok=True)
        Path(args.benchmarks).write_text("\n".join(benchmarks_page(benchmarks, source)))
    if args.readme:
        update_readme(args.readme, find_runs(args.runs), source, benchmarks)
    return made


if __name__ == "__main__":
    main()
