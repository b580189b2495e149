"""recipes/sweep.py: a sweep file is checked before anything runs; a small real sweep fits, tests and reports."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("sweep_recipe", REPO / "recipes" / "sweep.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sweep  # its dataclasses look their module up
spec.loader.exec_module(sweep)
CONFIG = "recipes/configs/multimnist/hps_equal_quick.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_the_shipped_sweeps_load_and_name_their_runs():
    for path in sorted((REPO / "recipes" / "sweeps").glob("*.yaml")):
        loaded = sweep.load_sweep(path)
        assert loaded.runs and all(run.folder == loaded.out / run.name for run in loaded.runs)
        assert path.read_text().startswith(f"# python recipes/sweep.py recipes/sweeps/{path.name}")


@pytest.mark.parametrize("text,error", [
    ("recipe: multitask\nruns: {a: []}\n", "missing 'out'"),
    ("recipe: multitasks\nout: o\nruns: {a: []}\n", "is not a recipe"),
    (f"recipe: multitask\nout: o\nconfig: {CONFIG}\nruns: {{a: []}}\njob: 2\n", r"unknown key\(s\) \['job'\]"),
    (f"recipe: multitask\nout: o\nconfig: {CONFIG}\njobs: 0\nruns: {{a: []}}\n", "jobs must be a positive"),
    (f"recipe: multitask\nout: o\nconfig: {CONFIG}\nruns: {{../a: []}}\n", "must be a plain folder name"),
    ("recipe: multitask\nout: o\nruns: {a: []}\n", "run a has no config"),
    ("recipe: multitask\nout: o\nconfig: missing.yaml\nruns: {a: []}\n", "config missing.yaml does not exist"),
    (f"recipe: multitask\nout: o\nconfig: {CONFIG}\nruns: {{a: [--checkpoint.dirpath, x]}}\n",
     "sets --checkpoint.dirpath itself"),
    (f"recipe: multitask\nout: o\nconfig: {CONFIG}\ntest_ckpt: worst\nruns: {{a: []}}\n", "'best' or 'last'"),
    (f"recipe: multitask\nout: o\nconfig: {CONFIG}\nruns: {{a: --model.balancer}}\n", "a list of arguments"),
    (f"recipe: multitask\nout: o\nconfig: {CONFIG}\nruns: {{a: {{test_ckpt: first}}}}\n", "run a: test_ckpt must be"),
])
def test_a_malformed_sweep_file_says_what_to_fix(tmp_path, monkeypatch, text, error):
    monkeypatch.chdir(REPO)
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        sweep.load_sweep(write(tmp_path, text))


def test_dry_run_prints_fit_and_test_of_every_run_not_done(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    (out / "done").mkdir(parents=True)
    (out / "done" / "test_metrics.json").write_text("{}")
    head = f"recipe: multitask\nconfig: {CONFIG}\nout: {out}\njobs: 2\nargs: [--trainer.max_time, null]\n"
    path = write(tmp_path, head + "runs:\n  done: []\n  pcgrad: [--model.balancer, pcgrad]\n")
    assert sweep.main([str(path), "--dry-run"]) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert [line[3] for line in lines] == ["fit", "test"]  # the finished run is skipped
    assert lines[0][2] == "recipes/multitask.py"  # relative, as a user types it: the runs record the command
    fit, test = lines
    assert fit[4:] == ["--config", CONFIG, "--trainer.max_time", "null", "--model.balancer", "pcgrad",
                       "--checkpoint.dirpath", str(out / "pcgrad" / "checkpoints")]
    assert test[4:] == [*fit[4:], "--ckpt_path", "best"]
    assert sweep.main([str(path), "--dry-run", "--force"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    path.write_text(head + "runs:\n  a: {args: [--model.balancer, mgda], test_ckpt: last}\n")
    assert sweep.main([str(path), "--dry-run"]) == 0
    assert shlex.split(capsys.readouterr().out.splitlines()[1])[-2:] == ["--ckpt_path", "last"]  # the run's own


def test_a_small_real_sweep_fits_tests_and_reports(omniglot_root, cache_dir, tmp_path, monkeypatch):
    if not (omniglot_root / "mnist" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("real MNIST t10k files absent under the data root")
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("LIGHTNING_MTL_DATA", str(omniglot_root))
    monkeypatch.setenv("LIGHTNING_MTL_CACHE", str(cache_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "pareto"
    fixed = "{class_path: lightning_mtl.mtl.balancing.fixed.FixedWeighting, init_args: {weights: [%s]}}"
    path = write(tmp_path, f"""recipe: multitask
config: {CONFIG}
out: {out}
jobs: 2
args: [--trainer.max_steps, "4", --trainer.max_time, null, --trainer.val_check_interval, "2",
       --trainer.limit_val_batches, "2", --trainer.limit_test_batches, "2", --trainer.log_every_n_steps, "1",
       --trainer.logger, "false", --data.batch_size, "16", --model.diagnostics_every, "1"]
runs:
  fixed_0.25: [--model.balancer, "{fixed % '0.5, 1.5'}"]
  fixed_0.75: [--model.balancer, "{fixed % '1.5, 0.5'}"]
  pcgrad: [--model.balancer, pcgrad]
""")
    assert sweep.main([str(path)]) == 0
    for name in ("fixed_0.25", "fixed_0.75", "pcgrad"):
        assert (out / name / "test_metrics.json").is_file() and (out / name / "checkpoints" / "metrics.jsonl").is_file()
    text = (out / "results.md").read_text()
    assert "## pareto" in text and "| `pcgrad` | MultiTaskModule, HardSharing, pcgrad | 2 |" in text
    assert "mean gradient cosine" in text  # the conflict diagnostics came from the runs' histories
    for kind in ("pareto", "conflict", "pcgrad_heatmap", "per_task_error"):
        assert (out / "figures" / f"pareto_{kind}.png").is_file()
    assert "0 of 3 runs to do" in _rerun(path)  # a finished sweep is not run again


def _rerun(path: Path) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert sweep.main([str(path)]) == 0
    return buffer.getvalue()
