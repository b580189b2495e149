"""Figures logged to Weights & Biases during and after a run (matplotlib; ``pip install lightning-mtl[report]``).

:class:`ResultFigures` is a callback. The recipes add it to every run that logs to W&B (their default logger); give
your own to change it, e.g. ``--trainer.callbacks+=lightning_mtl.figures.ResultFigures
--trainer.callbacks.heatmap_every 100``, and add it yourself to a Trainer of your own.

* during multi-task training, every ``heatmap_every`` steps: the K x K cosine similarity of the task gradients on the
  shared parameters (the model's ``diag/cos/<a>|<b>`` diagnostics, for up to 16 tasks) as a heatmap;
* at the end of ``test``: per-task test error (multi-task) or the accuracy with its 95% interval (few-shot) as a bar
  chart, and the test metrics as a ``wandb.Table``.

The same figures are the functions :func:`conflict_heatmap`, :func:`per_task_error` and :func:`accuracy_interval`
(returning matplotlib figures, also used by tests and reports). Offline W&B runs keep the images in their run folder.
With another logger the callback draws nothing (it says so once).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # an optional dependency
        raise ImportError("the figures need matplotlib: pip install 'lightning-mtl[report]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v.item() if isinstance(v, Tensor) else v) for k, v in metrics.items()
            if not isinstance(v, Tensor) or v.numel() == 1}


def conflict_heatmap(diagnostics: dict, tasks: list[str], step: int):
    """The K x K task-gradient cosine matrix from ``cos/<a>|<b>`` diagnostics (the diagonal is 1)."""
    plt = _pyplot()
    values = _scalars(diagnostics)
    k = len(tasks)
    matrix = [[1.0 if i == j else values.get(f"cos/{tasks[min(i, j)]}|{tasks[max(i, j)]}", float("nan"))
               for j in range(k)] for i in range(k)]
    figure, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1.0 + 0.6 * k))
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu")
    ax.set_xticks(range(k), tasks, rotation=90, fontsize=7)
    ax.set_yticks(range(k), tasks, fontsize=7)
    ax.set_title(f"task-gradient cosine, step {step}")
    figure.colorbar(image, ax=ax)
    figure.tight_layout()
    return figure


def per_task_error(metrics: dict, stage: str = "test"):
    """Bar chart of ``1 - <stage>/<task>/acc`` over the tasks (multi-task)."""
    plt = _pyplot()
    values = _scalars(metrics)
    tasks = sorted(k[len(stage) + 1: -len("/acc")] for k in values
                   if k.startswith(f"{stage}/") and k.endswith("/acc") and k.count("/") == 2)
    figure, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(tasks)), 3.5))
    ax.bar(tasks, [100 * (1 - values[f"{stage}/{t}/acc"]) for t in tasks])
    ax.set_xlabel("task")
    ax.set_ylabel(f"{stage} error (%)")
    ax.tick_params(axis="x", rotation=90, labelsize=7)
    figure.tight_layout()
    return figure


def accuracy_interval(metrics: dict, stage: str = "test"):
    """The few-shot accuracy with its 95% interval over the episodes."""
    plt = _pyplot()
    values = _scalars(metrics)
    figure, ax = plt.subplots(figsize=(3, 3.5))
    ax.errorbar([stage], [100 * values[f"{stage}/acc"]], yerr=[100 * values.get(f"{stage}/acc_ci95", 0.0)], fmt="o",
                capsize=5)
    ax.set_ylabel(f"{stage} accuracy (%), 95% CI")
    figure.tight_layout()
    return figure


class ResultFigures(Callback):
    """Log the figures of the module docstring to the run's W&B logger.

    Args:
        heatmap_every: training steps between two conflict heatmaps (multi-task models with diagnostics); 0: none.
    """

    def __init__(self, heatmap_every: int = 500) -> None:
        if heatmap_every < 0:
            raise ValueError(f"heatmap_every must be >= 0, got {heatmap_every}")
        self.heatmap_every = heatmap_every
        self._warned = False

    def _wandb(self, trainer: L.Trainer):
        from lightning.pytorch.loggers import WandbLogger

        logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if logger is None and not self._warned and trainer.is_global_zero:
            rank_zero_warn("ResultFigures logs to W&B, and this run has no WandbLogger: no figures are drawn.")
            self._warned = True
        return logger if trainer.is_global_zero else None

    def _log(self, trainer: L.Trainer, items: dict) -> None:
        import matplotlib.pyplot as plt
        import wandb

        logger = self._wandb(trainer)
        if logger is None:
            for value in items.values():
                if not isinstance(value, dict):
                    plt.close(value)
            return
        logged = {}
        for key, value in items.items():
            if isinstance(value, dict):  # a table of metrics
                logged[key] = wandb.Table(columns=["metric", "value"], data=[[k, v] for k, v in value.items()])
            else:
                logged[key] = wandb.Image(value)
                plt.close(value)
        logger.experiment.log({**logged, "trainer/global_step": trainer.global_step})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        diagnostics = getattr(pl_module, "_diagnostics", None)
        tasks = getattr(pl_module, "task_names", None)
        step = trainer.global_step
        if not (self.heatmap_every and diagnostics and tasks and step % self.heatmap_every == 0):
            return
        if not any(str(k).startswith("cos/") for k in diagnostics):
            return  # more than 16 tasks: the pairwise cosines are not logged one by one
        self._log(trainer, {"figures/gradient_conflict": conflict_heatmap(diagnostics, list(tasks), step)})

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = _scalars({k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
        if not metrics:
            return
        figure = accuracy_interval(metrics) if "test/acc" in metrics else per_task_error(metrics)
        self._log(trainer, {"figures/test": figure, "tables/test_metrics": metrics})
