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
# quick configs of the other architectures, at equal weighting (hard and soft sharing: hps_equal, soft_sharing)
ARCHITECTURES = ["cross_stitch", "mtan", "mmoe", "cgc", "ple", "dselect_k", "ltb"]


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
    assert written["higher_is_better"] == {"left/acc": True, "right/acc": True}


def test_every_architecture_has_quick_configs_on_both_datasets():
    from lightning_mtl.mtl.architectures import list_architectures

    names = {(c.parent.name, c.stem) for c in CONFIGS}
    for dataset in ("omniglot_alphabets", "multimnist"):
        for arch in ARCHITECTURES:
            assert (dataset, f"{arch}_quick") in names
    in_configs = {line.split("architectures.")[1].strip() for c in CONFIGS for line in c.read_text().splitlines()
                  if "class_path: lightning_mtl.mtl.architectures." in line}
    assert in_configs == set(list_architectures()), "an architecture without a quick config"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_multimnist_architecture_quick_fast_dev_run(arch, data_env, tmp_path):
    config = REPO / "recipes" / "configs" / "multimnist" / f"{arch}_quick.yaml"
    with pytest.warns(UserWarning, match="train-images"):
        cli = multitask.main(["fit", "--config", str(config), "--trainer.fast_dev_run=true",
                              "--trainer.max_time=null", "--trainer.logger=false", "--data.batch_size=8",
                              f"--checkpoint.dirpath={tmp_path}/ckpt"])
    assert type(cli.model.architecture).__module__.endswith(arch)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert {"val/left/acc", "val/right/acc"} <= set(cli.trainer.callback_metrics)


@pytest.mark.parametrize("arch", ["mtan", "mmoe", "cross_stitch"])
def test_omniglot_alphabets_architecture_quick_fast_dev_run(arch, data_env, tmp_path):
    """Per-task inputs (one batch per alphabet) through each kind of architecture, with a gradient aggregator; three
    alphabets keep it fast (the 50-alphabet configs differ only in data.alphabets)."""
    config = REPO / "recipes" / "configs" / "omniglot_alphabets" / f"{arch}_quick.yaml"
    cli = multitask.main(["fit", "--config", str(config), "--trainer.fast_dev_run=true", "--trainer.max_time=null",
                          "--trainer.logger=false", "--data.batch_size=2", f"--checkpoint.dirpath={tmp_path}/ckpt",
                          "--data.alphabets=[Tagalog,Alphabet_of_the_Magi,Greek]", "--model.balancer=pcgrad"])
    assert len(cli.model.task_names) == 3 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_balancer_name_overrides_a_class_path_with_arguments(data_env, tmp_path):
    """The configs' own override example: a registry name replaces GradNorm's class path and its init_args."""
    config = REPO / "recipes" / "configs" / "multimnist" / "hps_gradnorm_quick.yaml"
    with pytest.warns(UserWarning, match="train-images"):
        cli = multitask.main(["fit", "--config", str(config), "--model.balancer", "cagrad",
                              "--trainer.fast_dev_run=true", "--trainer.max_time=null", "--trainer.logger=false",
                              "--data.batch_size=8", f"--checkpoint.dirpath={tmp_path}/ckpt"])
    assert type(cli.model.balancer).__name__ == "CAGrad"


def test_balancer_class_path_arguments_are_validated(capsys):
    config = REPO / "recipes" / "configs" / "multimnist" / "hps_equal_quick.yaml"
    with pytest.raises(SystemExit):
        multitask.main(["fit", "--config", str(config), "--model.balancer=lightning_mtl.mtl.balancing.dwa.DWA",
                        "--model.balancer.temp=2.0"])
    assert "temp" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        multitask.main(["fit", "--config", str(config), "--model.balancer.help",
                        "lightning_mtl.mtl.balancing.dwa.DWA"])
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "--balancer.temperature" in out and "--balancer.period" in out  # each argument, documented


USER_MODULE = '''
"""A user's own architecture, task and balancer, outside the package."""
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanAbsoluteError

from lightning_mtl.mtl.architectures import Architecture
from lightning_mtl.mtl.balancing import LossWeighting
from lightning_mtl.mtl.tasks import Task


class TwoTowers(Architecture):
    """A shared conv, then one small tower per task."""

    def __init__(self, tasks: list[str], width: int = 8) -> None:
        super().__init__(tasks)
        self.shared = nn.Sequential(nn.Conv2d(1, width, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.towers = nn.ModuleDict({t: nn.Linear(4 * width, width) for t in self.tasks})
        self.calls = 0

    def represent(self, x, tasks):
        self.calls += 1
        z = self.shared(x).flatten(1)
        return {t: torch.tanh(self.towers[t](z)) for t in tasks}

    def task_parameters(self):
        return {t: list(m.parameters()) for t, m in self.towers.items()}


class DigitValue(Task):
    """Regress the digit's value (a user-defined task kind)."""

    def build_head(self, representation_shape):
        return nn.Linear(representation_shape[0], 1)

    def loss(self, output, target):
        return F.mse_loss(output, target.float())

    def metrics(self):
        return {"mae": MeanAbsoluteError()}

    def align(self, output, target):
        return output.squeeze(1)  # (B, 1) -> (B,), the targets' shape

    def check_target(self, target):
        if target.ndim != 1:
            raise ValueError("expected (B,) digits")


class Halves(LossWeighting):
    """0.5 * every loss."""

    def __init__(self, tasks: list[str], factor: float = 0.5) -> None:
        super().__init__(tasks)
        self.factor = factor

    def forward(self, losses, shared_params=None):
        stacked = self._stack_losses(losses)
        self.weights = torch.full_like(stacked, self.factor).detach()
        return self.factor * stacked.sum()
'''


def test_users_own_architecture_task_and_balancer_run_through_the_recipe(data_env, tmp_path, monkeypatch):
    """Defined outside the package, named by class path in YAML, run by recipes/multitask.py unchanged."""
    (tmp_path / "my_mtl.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "mine.yaml"
    config.write_text(
        (REPO / "recipes" / "configs" / "multimnist" / "hps_equal_quick.yaml").read_text()
        .replace("    num_classes: null   # taken from the datamodule\n",
                 "    tasks:\n"
                 "      left: {class_path: lightning_mtl.mtl.tasks.ClassificationTask, init_args: {num_classes: 10}}\n"
                 "      right: {class_path: my_mtl.DigitValue}\n")
        .replace("      class_path: lightning_mtl.mtl.architectures.HardSharing\n      init_args:\n        backbone:\n"
                 "          class_path: lightning_mtl.nn.Conv4\n          init_args:\n            in_channels: 1\n",
                 "      class_path: my_mtl.TwoTowers\n      init_args:\n        width: 6\n")
        .replace("    balancer: equal\n", "    balancer:\n      class_path: my_mtl.Halves\n      init_args:\n"
                 "        factor: 0.25\n"))
    args = ["--config", str(config), "--trainer.max_steps=2", "--trainer.val_check_interval=2",
            "--trainer.max_time=null", "--trainer.logger=false", "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false", "--data.batch_size=8",
            f"--checkpoint.dirpath={tmp_path}/ckpt"]
    with pytest.warns(UserWarning, match="train-images"):
        cli = multitask.main(["fit", *args])
    model = cli.model
    assert type(model.architecture).__name__ == "TwoTowers" and model.architecture.calls >= 2
    assert type(model.tasks["right"]).__name__ == "DigitValue" and model.balancer.factor == 0.25
    with pytest.warns(UserWarning, match="train-images"):
        multitask.main(["test", *args, "--ckpt_path=last"])
    written = json.loads((tmp_path / "test_metrics.json").read_text())
    # the regression task's error metric is lower-is-better: the file says so, and the monitor negates it
    assert written["higher_is_better"] == {"left/acc": True, "right/mae": False}
    assert "test/right/mae" in written


def test_predict_is_not_offered(capsys):
    with pytest.raises(SystemExit):
        multitask.main(["--help"])
    assert "predict" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        multitask.main(["predict", "--config", str(CONFIGS[0])])
    assert "invalid choice: 'predict'" in capsys.readouterr().err


def test_users_module_in_the_current_folder_needs_no_pythonpath(data_env, tmp_path):
    import os
    import subprocess

    (tmp_path / "my_mtl.py").write_text(USER_MODULE)
    config = tmp_path / "mine.yaml"
    config.write_text((REPO / "recipes" / "configs" / "multimnist" / "hps_equal_quick.yaml").read_text().replace(
        "    balancer: equal\n",
        "    balancer:\n      class_path: my_mtl.Halves\n      init_args:\n        factor: 0.5\n"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(RECIPE), "fit", "--config", str(config), "--trainer.max_steps=1",
                           "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1", "--trainer.logger=false",
                           "--trainer.max_time=null", "--data.batch_size=8", f"--checkpoint.dirpath={tmp_path}/ckpt"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ckpt" / "last.ckpt").exists()


def test_help_lists_what_exists_and_every_data_class_has_its_help(capsys):
    from lightning_mtl.mtl.architectures import list_architectures
    from lightning_mtl.mtl.balancing import list_balancers

    with pytest.raises(SystemExit):
        multitask.main(["--help"])
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert set(list_architectures()) | set(list_balancers()) | {"NYUv2", "CelebA", "Office31", "MultiMNIST",
                                                                "SegmentationTask", "SegNet"} <= listed
    assert len(out.splitlines()) < 120
    for data in ("NYUv2", "Cityscapes", "CelebA", "Office31", "OfficeHome", "MultiMNIST", "OmniglotAlphabets",
                 "DenseImageTasks"):
        with pytest.raises(SystemExit) as info:
            multitask.main(["fit", "--data.help", data])
        assert info.value.code == 0 and "--data.batch_size" in capsys.readouterr().out, data


@pytest.mark.parametrize("recipe", ["multitask", "fewshot"])
def test_one_nonfinite_option_for_both_halves(recipe, capsys, monkeypatch):
    """`--nonfinite.mode skip|raise|off` is the same option in both recipes (the multi-task module applies the
    trainer's NonFiniteGuard policy itself)."""
    spec = importlib.util.spec_from_file_location(f"{recipe}_r", REPO / "recipes" / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [f"{recipe}.py"])
    config = REPO / "recipes" / "configs" / ("multimnist/hps_equal_quick.yaml" if recipe == "multitask"
                                             else "omniglot/protonet_5w1s_quick.yaml")
    with pytest.raises(SystemExit) as info:
        module.main(["fit", "--config", str(config), "--nonfinite.mode=raise", "--print_config"])
    assert info.value.code == 0
    assert "nonfinite:\n  mode: raise" in capsys.readouterr().out
