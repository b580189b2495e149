"""Δm%: the average relative change of each task's test metrics against a baseline run.

    python recipes/delta_m.py --baseline runs/single/test_metrics.json pcgrad=runs/pcgrad/test_metrics.json
    python recipes/delta_m.py --baseline base.json method.json --metric err --lower-is-better
    python recipes/delta_m.py --baseline base.json method.json --average tasks      # LibMTL's averaging

Maninis, Radosavovic & Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR 2019, arXiv:1904.08918::

    Δm% = 100 / N * sum_i (-1)^{l_i} (M_m,i - M_b,i) / M_b,i,     l_i = 1 if lower is better for metric i

Sign convention: POSITIVE Δm% means BETTER than the baseline (usually the single-task models). A higher-is-better
metric contributes (M_m - M_b) / M_b, a lower-is-better one (M_b - M_m) / M_b. (Liu et al. and Navon et al.
print the opposite sign, ``-Δm`` with lower better; the numbers are the same up to that sign.)

How the terms are averaged when a task has several metrics (NYUv2's depth has two, its normals five):

* ``--average metrics`` (default): the mean over every metric of every task, each metric counting once: the form of
  Liu et al. (CAGrad, NeurIPS 2021), Navon et al. (Nash-MTL, ICML 2022) and Liu et al. (FAMO, NeurIPS 2023), whose
  NYUv2 Δm% averages 9 numbers.
* ``--average tasks``: the mean over tasks of the mean over that task's metrics, each task counting once: LibMTL's
  ``count_improvement``.

With one metric per task both are Maninis et al.'s formula.

Each run is a metrics file: the ``test_metrics.json`` that the recipes' ``test`` writes (``{"test/<task>/<metric>":
value}`` and, under ``"higher_is_better"``, each metric's direction, so no direction is guessed), another JSON
object of numbers, or Lightning's CSVLogger ``metrics.csv`` (the last non-empty value of each column). Runs on the
command line are ``PATH`` or ``LABEL=PATH``. Without ``--metric`` every metric whose direction the baseline file states
is compared; ``--metric NAME`` compares only ``test/<task>/NAME`` of every task, in the direction the file states,
else higher-is-better unless ``--lower-is-better``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Literal

#: the entry of ``test_metrics.json`` that maps ``"<task>/<metric>"`` to whether higher is better
DIRECTIONS_KEY = "higher_is_better"


def delta_m(
    method: dict[str, float],
    baseline: dict[str, float],
    higher_is_better: dict[str, bool],
    average: Literal["metrics", "tasks"] = "metrics",
) -> float:
    """Δm% of ``method`` against ``baseline``, positive when better (see the module docstring).

    Args:
        method: metric → the method's value; a metric is named ``"<task>"`` or ``"<task>/<metric>"``.
        baseline: metric → the baseline's value, on the same metrics.
        higher_is_better: metric → its direction.
        average: ``"metrics"``: every metric counts once; ``"tasks"``: metrics are averaged within their task (the
            part of the name before the first ``/``) first, then over tasks.

    Returns:
        The mean signed relative change, in percent.

    Raises:
        ValueError: if the two runs do not cover the same metrics, a metric has no direction, a value is not finite,
            a baseline value is zero (the relative change is undefined) or ``average`` is unknown.
    """
    if set(method) != set(baseline):
        only_method, only_base = sorted(set(method) - set(baseline)), sorted(set(baseline) - set(method))
        parts = ([f"task(s) {only_method} only in the method run"] if only_method else []) + (
            [f"task(s) {only_base} only in the baseline run"] if only_base else [])
        raise ValueError(f"the runs cover different tasks: {'; '.join(parts)}")
    if not method:
        raise ValueError("no tasks to compare")
    if missing := sorted(set(method) - set(higher_is_better)):
        raise ValueError(f"no metric direction (higher_is_better) for task(s) {missing}")
    if average not in ("metrics", "tasks"):
        raise ValueError(f"average must be 'metrics' or 'tasks', got {average!r}")
    groups: dict[str, list[float]] = {}
    for key in sorted(method):
        m, b = float(method[key]), float(baseline[key])
        if not (math.isfinite(m) and math.isfinite(b)):
            raise ValueError(f"task {key!r}: non-finite metric (method {m}, baseline {b})")
        if b == 0:
            raise ValueError(f"task {key!r}: the baseline metric is 0, so its relative change is undefined")
        change = (m - b) / b if higher_is_better[key] else (b - m) / b
        groups.setdefault(key.split("/")[0] if average == "tasks" else key, []).append(change)
    return 100.0 * sum(sum(g) / len(g) for g in groups.values()) / len(groups)


def read_metrics(path: str | Path) -> dict[str, float]:
    """All final values of a CSVLogger ``metrics.csv`` (last non-empty entry per column) or a JSON metrics object
    (its ``"higher_is_better"`` entry, read by :func:`read_directions`, left out).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if a JSON file is not an object of numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{\"test/<task>/<metric>\": value}}")
        try:
            return {str(k): float(v) for k, v in data.items() if v is not None and k != DIRECTIONS_KEY}
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: every value must be a number ({e})") from e
    last: dict[str, float] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):  # rows are logging events; a column is empty where it was not logged
            last.update({k: float(v) for k, v in row.items() if k is not None and v not in (None, "")})
    return last


def read_directions(path: str | Path) -> dict[str, bool]:
    """``"<task>/<metric>"`` → higher-is-better, as the recipes' ``test_metrics.json`` states; empty for other files."""
    path = Path(path)
    if path.suffix != ".json":
        return {}
    data = json.loads(path.read_text())
    directions = data.get(DIRECTIONS_KEY, {}) if isinstance(data, dict) else {}
    return {str(k): bool(v) for k, v in directions.items()}


def task_metrics(metrics: dict[str, float], metric: str, source: str = "run") -> dict[str, float]:
    """Task name → value of every ``test/<task>/<metric>`` key.

    Raises:
        ValueError: if no key has that form.
    """
    suffix = f"/{metric}"
    found = {k[len("test/"): -len(suffix)]: v for k, v in metrics.items()
             if k.startswith("test/") and k.endswith(suffix) and len(k) > len("test/") + len(suffix)}
    if not found:
        keys = sorted(k for k in metrics if k.startswith("test/"))
        raise ValueError(f"{source}: no test/<task>/{metric} values (test keys: {keys or 'none'}); run "
                         f"trainer.test first or choose another --metric")
    return found


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="method runs: PATH or LABEL=PATH (test_metrics.json, .json, .csv)")
    parser.add_argument("--baseline", required=True, help="baseline run: PATH or LABEL=PATH")
    parser.add_argument("--metric", default=None,
                        help="compare only test/<task>/METRIC (default: every metric with a stated direction, "
                             "else acc)")
    parser.add_argument("--lower-is-better", action="store_true",
                        help="the metric is error-like (for files that state no direction)")
    parser.add_argument("--average", choices=("metrics", "tasks"), default="metrics",
                        help="metrics: each metric counts once (Nash-MTL, CAGrad); tasks: each task counts once "
                             "(LibMTL)")
    args = parser.parse_args(argv)

    def split(spec: str) -> tuple[str, str]:
        label, _, path = ("", "", spec) if Path(spec).is_file() or "=" not in spec else spec.partition("=")
        return label or path, path

    def select(path: str, directions: dict[str, bool]) -> dict[str, float]:
        metrics = read_metrics(path)
        if args.metric is None and directions:  # every metric whose direction is stated
            values = {k: metrics[f"test/{k}"] for k in directions if f"test/{k}" in metrics}
            if not values:
                raise ValueError(f"{path}: none of the metrics {sorted(directions)} has a test value")
            return values
        return task_metrics(metrics, args.metric or "acc", path)

    try:
        base_label, base_path = split(args.baseline)
        stated = read_directions(base_path)
        baseline = select(base_path, stated)
        if args.metric is None and stated:
            directions = {k: stated[k] for k in baseline}
        else:
            metric = args.metric or "acc"
            directions = {t: stated.get(f"{t}/{metric}", not args.lower_is_better) for t in baseline}
        rows = {base_label: {"delta_m": 0.0, "mean": sum(baseline.values()) / len(baseline)}}
        for spec in args.runs:
            label, path = split(spec)
            values = select(path, stated if args.metric is None else {})
            try:
                rows[label] = {"delta_m": delta_m(values, baseline, directions, args.average),
                               "mean": sum(values.values()) / len(values)}
            except ValueError as e:
                raise ValueError(f"{label} vs baseline {base_label}: {e}") from e
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"delta_m: error: {e}") from e
    width = max(len(label) for label in rows)
    shown_metric = args.metric or ("each stated metric" if stated and args.metric is None else "acc")
    arrows = "".join(sorted({"↑" if d else "↓" for d in directions.values()}))
    print(f"{len(baseline)} metrics, {shown_metric} ({arrows}), averaged over {args.average}; Δm% > 0 is better "
          f"than the baseline {base_label}")
    print(f"{'run':<{width}s} {'Δm%':>8s} {'mean':>12s}")
    for label, row in rows.items():
        shown = round(row["delta_m"], 2) or 0.0  # no "-0.00" for a rounding-level difference
        print(f"{label:<{width}s} {shown:+8.2f} {row['mean']:12.4f}")
    return rows


if __name__ == "__main__":
    main()
