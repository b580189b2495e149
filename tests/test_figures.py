"""Figures for W&B: the conflict heatmap, per-task error and accuracy figures (checked on matplotlib's objects), and
the callback logging them to an offline W&B run."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_mtl.figures import ResultFigures, accuracy_interval, conflict_heatmap, per_task_error

REPO = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).parent / "mtl"))
from toy import global_batches, make_model  # noqa: E402


def test_conflict_heatmap_is_the_cosine_matrix():
    diagnostics = {"cos/a|b": torch.tensor(-0.5), "cos/a|c": torch.tensor(0.25), "cos/b|c": 0.75}
    figure = conflict_heatmap(diagnostics, ["a", "b", "c"], step=7)
    ax = figure.axes[0]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()),
                               [[1, -0.5, 0.25], [-0.5, 1, 0.75], [0.25, 0.75, 1]])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"] and "step 7" in ax.get_title()


def test_per_task_error_and_accuracy_figures():
    ax = per_task_error({"test/b/acc": 0.75, "test/a/acc": torch.tensor(0.9), "test/error_mean": 0.2}).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert [round(p.get_height(), 4) for p in ax.patches] == [10.0, 25.0] and ax.get_ylabel() == "test error (%)"
    ax = accuracy_interval({"test/acc": 0.97, "test/acc_ci95": 0.004}).axes[0]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([97.0]) and "95% CI" in ax.get_ylabel()


def test_callback_logs_heatmaps_and_test_figures_to_an_offline_wandb_run(tmp_path, monkeypatch):
    import wandb

    from lightning_mtl.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    if wandb.run is not None:  # a run another test left open would be reused, with its own folder
        wandb.finish()
    logger = WandbLogger(project="lightning-mtl-test", save_dir=str(tmp_path))
    model = make_model("equal", diagnostics_every=1)
    batches = global_batches(2)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=logger, callbacks=[ResultFigures(heatmap_every=1)],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    trainer.test(model, dataloaders=DataLoader(batches, batch_size=None))
    logger.experiment.finish()
    images = sorted(p.name for p in tmp_path.rglob("media/images/figures/*.png"))
    assert len([n for n in images if n.startswith("gradient_conflict_")]) == 2, images  # one per training step
    assert len([n for n in images if n.startswith("test_")]) == 1, images
    assert len(list(tmp_path.rglob("media/table/tables/test_metrics_*.table.json"))) == 1


def test_recipes_add_the_figures_to_runs_that_log_to_wandb(tmp_path, monkeypatch):
    """A recipe run logging to W&B (the configs' default) gets ResultFigures without asking; a run without W&B gets
    none, and a ResultFigures of the config's own replaces ours."""
    import importlib.util

    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = importlib.util.spec_from_file_location("multitask_recipe_for_figures", REPO / "recipes" / "multitask.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = str(REPO / "recipes" / "configs" / "multimnist" / "hps_equal_quick.yaml")

    def figures(*extra: str) -> list:
        cli = recipe.MultiTaskCLI(recipe.MultiTaskModule, subclass_mode_model=True, subclass_mode_data=True,
                                  run=False, args=["--config", config, f"--checkpoint.dirpath={tmp_path}/ckpt",
                                                   f"--trainer.logger.init_args.save_dir={tmp_path}/wandb", *extra])
        return [c for c in cli.trainer.callbacks if isinstance(c, ResultFigures)]

    (ours,) = figures()
    assert ours.heatmap_every == 500
    assert figures("--trainer.logger=false") == []
    (given,) = figures("--trainer.callbacks+=lightning_mtl.figures.ResultFigures",
                       "--trainer.callbacks.heatmap_every=7")
    assert given.heatmap_every == 7
