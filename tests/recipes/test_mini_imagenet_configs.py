"""Every Mini-ImageNet config of the few-shot recipe runs a fast_dev_run step (one training meta-batch, one validation
batch) on a tiny fixture in learn2learn's pickle format, since the real images are not available offline.

The configs run as written (84x84 images, their backbones, ways, shots, queries and training inner loops); only the
data location, the split-size check, the meta-batch sizes (1), the evaluation set sizes (1 episode), workers, logger,
checkpoint folder and, for speed on CPU, the evaluation inner steps (at most 2) are overridden. Parsing is covered by
``test_fewshot_recipe.py::test_config_parses``.
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_mtl.datamodules.mini_imagenet import PICKLES

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "fewshot.py"
CONFIGS = sorted((REPO / "recipes" / "configs" / "mini_imagenet").glob("*.yaml"))
#: classes per split and images per class of the fixture: enough for the largest episodes of the configs (30-way
#: ProtoNet and 16-way R2D2 training, 5-shot + 15-query evaluation)
FIXTURE_CLASSES = {"train": 32, "val": 6, "test": 6}
PER_CLASS = 32
#: evaluation inner steps of the smoke run (Reptile's 50 steps at 84x84 would dominate the module's time on CPU)
EVAL_INNER_STEPS = 2


def load_recipe():
    spec = importlib.util.spec_from_file_location("fewshot_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fewshot = load_recipe()


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    """LightningCLI also looks at sys.argv; keep pytest's own arguments out of it."""
    monkeypatch.setattr(sys, "argv", [str(RECIPE)])


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory) -> Path:
    """``miniimagenet/mini-imagenet-cache-{train,validation,test}.pkl`` as learn2learn ships them: 84x84x3 uint8 noise
    images and a ``class_dict`` of disjoint wnids per split."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "miniimagenet"
    folder.mkdir()
    rng = np.random.default_rng(0)
    wnid = 1000000
    for split, n_classes in FIXTURE_CLASSES.items():
        images = rng.integers(0, 256, (n_classes * PER_CLASS, 84, 84, 3), dtype=np.uint8)
        class_dict = {}
        for c in range(n_classes):
            class_dict[f"n{wnid:08d}"] = list(range(c * PER_CLASS, (c + 1) * PER_CLASS))
            wnid += 1
        (folder / PICKLES[split]).write_bytes(pickle.dumps({"image_data": images, "class_dict": class_dict}))
    return root


@pytest.fixture(scope="module")
def mini_cache(tmp_path_factory) -> Path:
    """One decoded-image cache for the module: every config uses 84x84 images, so the fixture is decoded once."""
    return tmp_path_factory.mktemp("cache")


def test_every_config_opens_with_its_launch_command_and_an_override():
    assert CONFIGS, "no Mini-ImageNet configs found"
    for config in CONFIGS:
        first, second = config.read_text().splitlines()[:2]
        rel = f"recipes/configs/mini_imagenet/{config.name}"
        assert first.startswith("# python recipes/fewshot.py fit --config " + rel), config
        assert second.startswith(f"# override example: python recipes/fewshot.py fit --config {rel} --"), config


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_fast_dev_run(config, mini_root, mini_cache, tmp_path):
    args = [
        "fit", "--config", str(config), "--trainer.fast_dev_run=true", "--trainer.max_time=null",
        "--trainer.logger=false", f"--checkpoint.dirpath={tmp_path}/ckpt",
        f"--data.root={mini_root}", f"--data.cache_dir={mini_cache}", "--data.check_protocol=false",
        "--data.episodes.num_workers=0", "--data.episodes.meta_batch_size=1", "--data.episodes.eval_meta_batch_size=1",
        "--data.episodes.val_episodes=1", "--data.episodes.test_episodes=1",
    ]
    model_args = yaml.safe_load(config.read_text())["model"].get("init_args", {})
    if model_args.get("eval_inner_steps", 0) > EVAL_INNER_STEPS:
        args.append(f"--model.init_args.eval_inner_steps={EVAL_INNER_STEPS}")
    cli = fewshot.main(args)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0 <= metrics["val/acc"] <= 1
