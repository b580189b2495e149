"""LineProgress: plain progress lines for logs, and the recipes choosing it when standard output is not a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_mtl.progress import LineProgress, format_metrics

sys.path.insert(0, str(Path(__file__).parent / "mtl"))
from toy import global_batches, make_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_format_metrics_of_many_tasks_keeps_the_summaries():
    """50 tasks log 100 values per validation: the line keeps the means and says how many per-task values it left."""
    metrics = {f"val/task{i}/{m}": 0.5 for i in range(50) for m in ("acc", "loss")}
    metrics.update({"val/metric_mean": 0.8, "val/error_mean": 0.2, "train/loss": 1.0})
    assert format_metrics(metrics, "val/") == ("val/error_mean 0.2 | val/metric_mean 0.8 | "
                                               "(+100 per-task metrics in the logger)")
    assert format_metrics(metrics, "val/", limit=None).count("|") == 101
    few = {f"val/t{i}/acc": 0.5 for i in range(3)}
    assert format_metrics(few, "val/") == "val/t0/acc 0.5 | val/t1/acc 0.5 | val/t2/acc 0.5"


def test_format_metrics_merges_confidence_intervals_and_skips_other_prefixes():
    metrics = {"val/acc": torch.tensor(0.95123), "val/acc_ci95": 0.00512, "val/loss": 0.15, "train/loss": 1.0,
               "val/vector": torch.ones(3)}
    assert format_metrics(metrics, "val/") == "val/acc 0.9512 ± 0.0051 | val/loss 0.15"
    assert format_metrics({"val/x_ci95": 0.1}, "val/") == "val/x_ci95 0.1"  # a lone interval is a plain metric


def test_lines_every_n_steps_the_last_step_and_each_validation(capsys):
    model = make_model()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=7, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=1, val_check_interval=5,
                        num_sanity_val_steps=0, callbacks=[LineProgress(every_n_steps=3)])
    batches = global_batches(7)
    trainer.fit(model, DataLoader(batches, batch_size=None), DataLoader(batches[:1], batch_size=None))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("fit step", "validation"))]
    assert [line.split(" |")[0] for line in lines] == [
        "fit step 3/7 (43%)", "validation at step 5", "fit step 6/7 (86%)", "fit step 7/7 (100%)"]
    assert "steps/s" in lines[0] and "elapsed" in lines[0]
    assert "val/metric_mean" in lines[1]
    assert "\r" not in out and "\x1b[" not in out
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        LineProgress(every_n_steps=0)


def test_recipe_writing_to_a_file_prints_plain_lines_and_no_notices(omniglot_root, cache_dir, tmp_path):
    """stdout is a pipe here, as in `make demo > log`: no redrawn bar, no carriage returns, no escape codes."""
    if not (omniglot_root / "mnist" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("real MNIST t10k files absent under the data root")
    env = {**os.environ, "LIGHTNING_MTL_DATA": str(omniglot_root), "LIGHTNING_MTL_CACHE": str(cache_dir),
           "WANDB_MODE": "offline"}
    env.pop("WANDB_SILENT", None)  # the recipe's default W&B logger, offline, as a user without a key runs it
    config = REPO / "recipes" / "configs" / "multimnist" / "hps_equal_quick.yaml"
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "multitask.py"), "fit", "--config", str(config),
         "--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.max_time=null",
         "--trainer.log_every_n_steps=2", "--trainer.limit_val_batches=2", "--data.batch_size=16",
         f"--trainer.logger.init_args.save_dir={tmp_path}/wandb",
         f"--checkpoint.dirpath={tmp_path}/ckpt"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fit step 2/4 (50%)" in proc.stdout and "fit step 4/4 (100%)" in proc.stdout
    assert "validation at step 4 | " in proc.stdout and "val/metric_mean" in proc.stdout
    assert "\r" not in proc.stdout + proc.stderr and "\x1b[" not in proc.stdout + proc.stderr
    # notices no user can act on (lightning_mtl.cli.quiet_lightning says why each one is wrong here)
    notices = ("litlogger", "transfer_batch_to_device", "on_before_batch_transfer", "LeafSpec", "skip_none", "wandb:")
    for notice in notices:
        assert notice not in proc.stdout + proc.stderr, notice


def test_the_terminal_bar_shows_accuracy_with_its_interval():
    from lightning_mtl.progress import merge_intervals

    merged = merge_intervals({"val/acc": torch.tensor(0.95123), "val/acc_ci95": torch.tensor(0.00512),
                              "train/loss": 0.3, "v_num": "x"})
    assert merged == {"val/acc": "0.9512 ± 0.0051", "train/loss": 0.3, "v_num": "x"}
