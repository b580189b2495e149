"""Δm%: the average relative change of each task's test metric against a baseline run.

    python recipes/delta_m.py --baseline runs/single/metrics.csv pcgrad=runs/pcgrad/metrics.csv upgrad=runs/up.json
    python recipes/delta_m.py --baseline base.json method.json --metric err --lower-is-better

Maninis, Radosavovic & Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR 2019, arXiv:1904.08918, in the
form of Liu et al. (CAGrad, NeurIPS 2021) and Navon et al. (Nash-MTL, ICML 2022)::

    Δm% = 100 / T * sum_t (-1)^{l_t} (M_m,t - M_b,t) / M_b,t,     l_t = 1 if lower is better for task t

Sign convention: POSITIVE Δm% means BETTER than the baseline (usually the single-task models). A higher-is-better
metric contributes (M_m - M_b) / M_b, a lower-is-better one (M_b - M_m) / M_b. (Liu et al. and Navon et al.
print the opposite sign, ``-Δm`` with lower better; the numbers are the same up to that sign.)

Each run is a metrics file: Lightning's CSVLogger ``metrics.csv`` (the last non-empty value of each column
``test/<task>/<metric>``) or a JSON object ``{"test/<task>/<metric>": value}``. Runs on the command line are
``PATH`` or ``LABEL=PATH``. One ``--metric`` is read for every task, higher-is-better unless ``--lower-is-better``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path


def delta_m(method: dict[str, float], baseline: dict[str, float], higher_is_better: dict[str, bool]) -> float:
    """Δm% of ``method`` against ``baseline``, positive when better (see the module docstring).

    Args:
        method: task name → the method's metric.
        baseline: task name → the baseline's metric on the same tasks.
        higher_is_better: task name → direction of that task's metric.

    Returns:
        The mean over tasks of the signed relative change, in percent.

    Raises:
        ValueError: if the two runs do not cover the same tasks, a task has no direction, a metric is not finite or
            a baseline metric is zero (the relative change is undefined).
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
    total = 0.0
    for task in sorted(method):
        m, b = float(method[task]), float(baseline[task])
        if not (math.isfinite(m) and math.isfinite(b)):
            raise ValueError(f"task {task!r}: non-finite metric (method {m}, baseline {b})")
        if b == 0:
            raise ValueError(f"task {task!r}: the baseline metric is 0, so its relative change is undefined")
        total += (m - b) / b if higher_is_better[task] else (b - m) / b
    return 100.0 * total / len(method)


def read_metrics(path: str | Path) -> dict[str, float]:
    """All final values of a CSVLogger ``metrics.csv`` (last non-empty entry per column) or a JSON metrics object.

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
            return {str(k): float(v) for k, v in data.items() if v is not None}
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: every value must be a number ({e})") from e
    last: dict[str, float] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):  # rows are logging events; a column is empty where it was not logged
            last.update({k: float(v) for k, v in row.items() if k is not None and v not in (None, "")})
    return last


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
    parser.add_argument("runs", nargs="+", help="method runs: PATH or LABEL=PATH (metrics.csv or .json)")
    parser.add_argument("--baseline", required=True, help="baseline run: PATH or LABEL=PATH")
    parser.add_argument("--metric", default="acc", help="metric read for every task: test/<task>/<metric>")
    parser.add_argument("--lower-is-better", action="store_true", help="the metric is error-like (lower is better)")
    args = parser.parse_args(argv)

    def load(spec: str) -> tuple[str, dict[str, float]]:
        label, _, path = ("", "", spec) if Path(spec).is_file() or "=" not in spec else spec.partition("=")
        return label or path, task_metrics(read_metrics(path), args.metric, path)

    try:
        base_label, baseline = load(args.baseline)
        directions = dict.fromkeys(baseline, not args.lower_is_better)
        rows = {base_label: {"delta_m": 0.0, "mean": sum(baseline.values()) / len(baseline)}}
        for spec in args.runs:
            label, values = load(spec)
            try:
                rows[label] = {"delta_m": delta_m(values, baseline, directions),
                               "mean": sum(values.values()) / len(values)}
            except ValueError as e:
                raise ValueError(f"{label} vs baseline {base_label}: {e}") from e
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"delta_m: error: {e}") from e
    width = max(len(label) for label in rows)
    arrow = "↓" if args.lower_is_better else "↑"
    print(f"{len(baseline)} tasks, metric {args.metric} ({arrow}); Δm% > 0 is better than the baseline {base_label}")
    print(f"{'run':<{width}s} {'Δm%':>8s} {'mean ' + args.metric:>12s}")
    for label, row in rows.items():
        shown = round(row["delta_m"], 2) or 0.0  # no "-0.00" for a rounding-level difference
        print(f"{label:<{width}s} {shown:+8.2f} {row['mean']:12.4f}")
    return rows


if __name__ == "__main__":
    main()
