"""Run a sweep: one recipe, several runs (configs and overrides), each fitted then tested, then its report.

    python recipes/sweep.py recipes/sweeps/multimnist_pareto_quick.yaml            # run what is not done yet
    python recipes/sweep.py recipes/sweeps/multimnist_pareto_quick.yaml --dry-run  # print the commands only
    python recipes/sweep.py recipes/sweeps/multimnist_pareto_quick.yaml --force    # run everything again

A sweep file names the recipe, the default config, the output folder, how many runs go at a time, arguments for
every run, and the runs (a name → a list of arguments, or ``{config: ..., args: [...], test_ckpt: last}``)::

    recipe: multitask                 # recipes/multitask.py
    config: recipes/configs/multimnist/hps_equal_quick.yaml
    out: runs/multimnist_pareto_quick # <out>/<run>/checkpoints, <out>/<run>/test_metrics.json
    jobs: 2                           # runs at a time; each gets (CPU cores // jobs) torch threads
    test_ckpt: best                   # the checkpoint tested: best or last (a run may say otherwise)
    args: [--trainer.max_steps, "600", --trainer.logger, "false"]
    runs:
      equal: [--model.balancer, equal]
      single_task: {config: recipes/configs/multimnist/single_task_quick.yaml}

Every run is ``fit`` then ``test --ckpt_path <test_ckpt>`` with the same arguments, its output in ``<out>/<run>/``
(``--checkpoint.dirpath`` is set by the sweep) and its console output in ``<out>/<run>/sweep.log``. A run whose
``test_metrics.json`` exists is done and skipped (so a stopped sweep continues where it stopped). At the end the
tables and figures of the runs are written to ``<out>/results.md`` and ``<out>/figures/`` (``recipes/report.py``);
``python recipes/report.py runs/`` puts every run, the sweep's included, into ``docs/``. The file is checked before
any run starts.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
KEYS = {"recipe", "config", "out", "jobs", "test_ckpt", "args", "runs"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class SweepRun:
    """One run of a sweep: its name, config, arguments and folder."""

    name: str
    config: Path
    args: list[str]
    folder: Path
    test_ckpt: str = "best"

    @property
    def done(self) -> bool:
        return (self.folder / "test_metrics.json").is_file()


@dataclass
class Sweep:
    recipe: Path
    out: Path
    jobs: int
    runs: list[SweepRun]


def _strings(value, where: str) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of command-line arguments, got {type(value).__name__}")
    return [("null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)) for v in value]


def load_sweep(path: str | Path) -> Sweep:
    """The sweep of a file, checked: the recipe and every config exist, run names are plain folder names.

    Raises:
        FileNotFoundError: the sweep file, its recipe or a config is missing.
        ValueError: a malformed entry (the message names it and says what to write).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sweep file at {path}")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a sweep file is a mapping with the keys {sorted(KEYS)}")
    if unknown := sorted(set(spec) - KEYS):
        raise ValueError(f"{path}: unknown key(s) {unknown}; a sweep file has {sorted(KEYS)}")
    for key in ("recipe", "out", "runs"):
        if key not in spec:
            raise ValueError(f"{path}: missing '{key}' (see recipes/sweep.py's docstring for an example)")
    recipe = HERE / f"{spec['recipe']}.py"
    if not recipe.is_file():
        raise FileNotFoundError(f"{path}: recipe '{spec['recipe']}' is not a recipe (recipes/<recipe>.py); "
                                f"use fewshot or multitask")
    jobs = spec.get("jobs", 1)
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"{path}: jobs must be a positive integer, got {jobs!r}")
    test_ckpt = spec.get("test_ckpt", "best")
    if test_ckpt not in ("best", "last"):
        raise ValueError(f"{path}: test_ckpt must be 'best' or 'last', got {test_ckpt!r}")
    common = _strings(spec.get("args", []), f"{path}: args")
    runs_spec = spec["runs"]
    if not isinstance(runs_spec, dict) or not runs_spec:
        raise ValueError(f"{path}: runs must map run names to argument lists (or {{config: ..., args: [...]}})")
    out = Path(spec["out"])
    runs = []
    for name, entry in runs_spec.items():
        name = str(name)
        if not NAME.match(name):
            raise ValueError(f"{path}: run name {name!r} must be a plain folder name (letters, digits, _ . -)")
        entry = {"args": entry} if isinstance(entry, list) else (entry or {})
        if not isinstance(entry, dict) or set(entry) - {"config", "args", "test_ckpt"}:
            raise ValueError(f"{path}: run {name}: give a list of arguments or {{config: ..., args: [...], "
                             f"test_ckpt: best|last}}")
        run_ckpt = entry.get("test_ckpt", test_ckpt)
        if run_ckpt not in ("best", "last"):
            raise ValueError(f"{path}: run {name}: test_ckpt must be 'best' or 'last', got {run_ckpt!r}")
        config = entry.get("config", spec.get("config"))
        if config is None:
            raise ValueError(f"{path}: run {name} has no config; set the sweep's config or the run's")
        if not Path(config).is_file():
            raise FileNotFoundError(f"{path}: run {name}: config {config} does not exist")
        if any(a.startswith("--checkpoint.dirpath") for a in [*common, *_strings(entry.get("args", []), name)]):
            raise ValueError(f"{path}: run {name}: the sweep sets --checkpoint.dirpath itself (<out>/<run>); drop it")
        runs.append(SweepRun(name, Path(config), [*common, *_strings(entry.get("args", []), f"run {name}")],
                             out / name, run_ckpt))
    return Sweep(recipe, out, jobs, runs)


def commands(sweep: Sweep, run: SweepRun) -> list[list[str]]:
    """The ``fit`` and ``test`` command lines of ``run``."""
    base = ["--config", str(run.config), *run.args, "--checkpoint.dirpath", str(run.folder / "checkpoints")]
    recipe = os.path.relpath(sweep.recipe)  # as a user types it (the runs record their command line)
    return [[sys.executable, recipe, "fit", *base],
            [sys.executable, recipe, "test", *base, "--ckpt_path", run.test_ckpt]]


def execute(sweep: Sweep, run: SweepRun, threads: int) -> tuple[str, bool, float]:
    """Fit then test ``run`` (console output to ``<run>/sweep.log``); its name, success and seconds."""
    run.folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.time()
    with (run.folder / "sweep.log").open("w") as log:
        for command in commands(sweep, run):
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
                return run.name, False, time.time() - started
    return run.name, True, time.time() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="the sweep file (e.g. recipes/sweeps/multimnist_pareto_quick.yaml)")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the sweep file's)")
    parser.add_argument("--force", action="store_true", help="run again the runs that are already done")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    jobs = args.jobs or sweep.jobs
    threads = max(1, (os.cpu_count() or 1) // jobs)
    todo = [r for r in sweep.runs if args.force or not r.done]
    if args.dry_run:
        for run in todo:
            for command in commands(sweep, run):
                print(f"OMP_NUM_THREADS={threads} " + shlex.join(command))
        return 0
    print(f"{len(todo)} of {len(sweep.runs)} runs to do, {jobs} at a time, {threads} threads each", flush=True)
    failed = []
    with ThreadPoolExecutor(jobs) as pool:
        for future in as_completed([pool.submit(execute, sweep, run, threads) for run in todo]):
            name, ok, seconds = future.result()
            print(f"{name}: {'done' if ok else 'FAILED'} in {seconds / 60:.1f} min", flush=True)
            if not ok:
                failed.append(name)
    if failed:
        logs = ", ".join(str(sweep.out / n / "sweep.log") for n in failed)
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; see {logs}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(HERE))
    from report import report

    report(sweep.out, sweep.out / "results.md", sweep.out / "figures")
    print(f"report: {sweep.out / 'results.md'} and {sweep.out / 'figures'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
