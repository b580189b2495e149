"""Both recipe scripts train under 2-process gloo DDP on CPU at 32 and bf16-mixed, on real data, and leave a
loadable ``last.ckpt`` with finite weights; the numerical equivalences are checked in ``test_matrix.py``."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "configs"
DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_time=null",
       "--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.log_every_n_steps=1",
       "--trainer.enable_progress_bar=false", "--trainer.logger=lightning.pytorch.loggers.CSVLogger"]
RUNS = {
    "fewshot": ("fewshot.py", "omniglot/protonet_5w1s_quick.yaml",
                ["--data.episodes.train_ways=10", "--data.episodes.val_episodes=8",
                 "--data.episodes.eval_meta_batch_size=4"]),
    "multitask": ("multitask.py", "multimnist/hps_upgrad_quick.yaml", ["--data.batch_size=16"]),
}


# few-shot at 32 under DDP: tests/recipes/test_fewshot_recipe.py::test_ddp_two_processes_fit_and_exact_eval_set
@pytest.mark.parametrize("family,precision", [("fewshot", "bf16-mixed"), ("multitask", "32"),
                                              ("multitask", "bf16-mixed")])
def test_recipe_trains_under_ddp(family, precision, omniglot_root, cache_dir, tmp_path):
    if family == "multitask" and not (omniglot_root / "mnist" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("real MNIST t10k files absent under the data root")
    script, config, extra = RUNS[family]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(LIGHTNING_MTL_DATA=str(omniglot_root), LIGHTNING_MTL_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    args = ["fit", "--config", str(CONFIGS / config), *DDP, f"--trainer.precision={precision}",
            f"--trainer.logger.save_dir={tmp_path}/logs", f"--checkpoint.dirpath={tmp_path}/ckpt", *extra]
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / script), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 4
    assert all(bool(torch.isfinite(v).all()) for v in state["state_dict"].values() if v.is_floating_point())
    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(math.isfinite(x) for x in losses)
