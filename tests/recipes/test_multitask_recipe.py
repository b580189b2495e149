"""The multi-task recipe: every config parses; quick configs run a step on real data (MultiMNIST from the real
MNIST t10k files, Omniglot alphabets); fit then test with best/last checkpoints."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "multitask.py"
CONFIGS = sorted((REPO / "recipes" / "configs").glob("omniglot_alphabets/*.yaml")) + sorted(
    (REPO / "recipes" / "configs").glob("multimnist/*.yaml"))
METHODS = ["single_task", "hps_equal", "hps_uw", "hps_gradnorm", "hps_famo", "hps_pcgrad", "hps_mgda_ub",
           "hps_upgrad", "soft_sharing"]


def load_recipe():
    spec = importlib.util.spec_from_file_location("multitask_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


multitask = load_recipe()


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(RECIPE)])


@pytest.fixture
def data_env(omniglot_root, cache_dir, monkeypatch):
    if not (omniglot_root / "mnist" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("real MNIST t10k files absent under the data root")
    monkeypatch.setenv("LIGHTNING_MTL_DATA", str(omniglot_root))
    monkeypatch.setenv("LIGHTNING_MTL_CACHE", str(cache_dir))


def test_every_method_has_full_and_quick_configs_per_dataset():
    names = {(c.parent.name, c.stem) for c in CONFIGS}
    for dataset in ("omniglot_alphabets", "multimnist"):
        for method in METHODS:
            assert (dataset, method) in names and (dataset, f"{method}_quick") in names
    for config in CONFIGS:
        assert config.read_text().startswith("# python recipes/multitask.py fit --config "), config


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        multitask.main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: lightning_mtl.mtl.MultiTaskModule" in capsys.readouterr().out


def test_unknown_balancer_lists_valid_names(data_env):
    config = REPO / "recipes" / "configs" / "multimnist" / "hps_equal_quick.yaml"
    with pytest.raises(ValueError, match="unknown balancing method 'pcgard'; valid names: .*upgrad"):
        multitask.main(["fit", "--config", str(config), "--model.balancer=pcgard", "--trainer.fast_dev_run=true"])


@pytest.mark.parametrize("method", METHODS)
def test_multimnist_quick_fast_dev_run(method, data_env, tmp_path):
    config = REPO / "recipes" / "configs" / "multimnist" / f"{method}_quick.yaml"
    with pytest.warns(UserWarning, match="train-images"):  # the real data has no training images: it says so
        cli = multitask.main(["fit", "--config", str(config), "--trainer.fast_dev_run=true",
                              "--trainer.max_time=null", "--trainer.logger=false", "--data.batch_size=16",
                              f"--checkpoint.dirpath={tmp_path}/ckpt"])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert {"val/left/acc", "val/right/acc", "val/metric_mean"} <= set(cli.trainer.callback_metrics)


@pytest.mark.parametrize("method", ["hps_pcgrad", "hps_mgda_ub", "single_task"])
def test_omniglot_alphabets_quick_fast_dev_run(method, data_env, tmp_path):
    config = REPO / "recipes" / "configs" / "omniglot_alphabets" / f"{method}_quick.yaml"
    cli = multitask.main(["fit", "--config", str(config), "--trainer.fast_dev_run=true", "--trainer.max_time=null",
                          "--trainer.logger=false", "--data.batch_size=4", f"--checkpoint.dirpath={tmp_path}/ckpt"])
    metrics = cli.trainer.callback_metrics
    assert len(cli.model.task_names) == 50 and torch.isfinite(metrics["train/loss"])
    assert "val/error_mean" in metrics and 0 <= metrics["val/error_mean"] <= 1


def test_fit_then_test_best_and_last(data_env, tmp_path):
    config = REPO / "recipes" / "configs" / "multimnist" / "hps_upgrad_quick.yaml"
    args = ["--config", str(config), "--trainer.max_steps=6", "--trainer.val_check_interval=3",
            "--trainer.max_time=null", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}/logs",
            "--trainer.enable_progress_bar=false", "--data.batch_size=32", f"--checkpoint.dirpath={tmp_path}/ckpt"]
    with pytest.warns(UserWarning, match="train-images"):
        multitask.main(["fit", *args])
    for ckpt in ("best", "last"):
        with pytest.warns(UserWarning, match="train-images"):
            test = multitask.main(["test", *args, f"--ckpt_path={ckpt}"])
        metrics = test.trainer.callback_metrics
        assert {"test/left/acc", "test/right/acc", "test/metric_mean", "test/error_mean"} <= set(metrics)
    written = json.loads((tmp_path / "test_metrics.json").read_text())
    assert written["test/left/acc"] == pytest.approx(float(metrics["test/left/acc"]))
