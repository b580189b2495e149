"""Progress for logs: one plain line every N training steps, and one per validation and test, without ANSI codes.

Lightning's TQDM bar redraws itself with carriage returns and escape codes; written to a file (``make demo > log``,
a batch job, CI) it becomes hundreds of kilobytes of partial lines. :class:`LineProgress` replaces it there: the recipes
use it whenever standard output is not a terminal (see :class:`~lightning_mtl.cli.RecipeCLI`), and it can be given
as a callback anywhere::

    fit step 500/2000 (25%) | 8.71 steps/s | 0:57 elapsed | train/loss 0.1234
    validation at step 500 | val/acc 0.9512 ± 0.0051 | val/loss 0.1502

A metric ``m`` logged with a ``m_ci95`` companion (the few-shot modules' episode accuracy) is shown as
``m ± ci95``. Only rank 0 prints. On a terminal the recipes keep Lightning's bar, as :class:`IntervalBar`, which
shows ``val/acc`` with its interval the same way.
"""

from __future__ import annotations

import math
import time

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from torch import Tensor

#: above this many metrics a progress line keeps only the summaries (``val/metric_mean``, not ``val/<task>/acc``).
MAX_METRICS = 12


def format_metrics(metrics: dict, prefix: str = "", limit: int | None = MAX_METRICS) -> str:
    """``name value`` pairs of the scalar metrics whose name starts with ``prefix``, sorted, ``m ± m_ci95`` merged.

    With more than ``limit`` of them (a multi-task run of 50 tasks logs 100 per validation) only the summaries are
    shown, the names without a second ``/`` (``val/metric_mean``, ``val/error_mean``), and a note of how many
    per-task values the logger holds; ``limit=None`` shows all."""
    values = {}
    for name, value in metrics.items():
        if not name.startswith(prefix):
            continue
        if isinstance(value, Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)):
            values[name] = float(value)
    parts = []
    for name in sorted(values):
        if name.endswith("_ci95") and name[: -len("_ci95")] in values:
            continue
        text = f"{name} {values[name]:.4g}"
        if f"{name}_ci95" in values:
            text += f" ± {values[f'{name}_ci95']:.2g}"
        parts.append(text)
    if limit is not None and len(parts) > limit:
        names = [n for n in sorted(values) if not (n.endswith("_ci95") and n[: -len("_ci95")] in values)]
        kept = [part for name, part in zip(names, parts, strict=True) if name[len(prefix):].count("/") == 0]
        parts = [*kept, f"(+{len(parts) - len(kept)} per-task metrics in the logger)"]
    return " | ".join(parts)


def merge_intervals(metrics: dict) -> dict:
    """``metrics`` with every ``m`` that has an ``m_ci95`` companion shown as ``"<m> ± <ci95>"`` and the companion
    dropped (a progress bar's postfix)."""
    out = dict(metrics)
    for name in [k for k in metrics if k.endswith("_ci95") and k[: -len("_ci95")] in metrics]:
        base, ci = name[: -len("_ci95")], out.pop(name)
        value, ci = (v.item() if isinstance(v, Tensor) else v for v in (metrics[base], ci))
        if isinstance(value, (int, float)) and isinstance(ci, (int, float)):
            out[base] = f"{value:.4g} ± {ci:.2g}"
    return out


class IntervalBar(TQDMProgressBar):
    """Lightning's bar, with ``val/acc ± ci95`` (any metric with a ``_ci95`` companion) in one field."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        return merge_intervals(super().get_metrics(trainer, pl_module))


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class LineProgress(ProgressBar):
    """A progress "bar" for logs: a plain line every ``every_n_steps`` optimizer steps, after each validation and at
    the end of testing.

    Args:
        every_n_steps: optimizer steps between two training lines (the last step always prints).

    Raises:
        ValueError: ``every_n_steps`` below 1.
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._start: float | None = None
        self._start_step = 0
        self._last_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, trainer: L.Trainer, line: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(line, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._start_step, self._last_step = time.perf_counter(), trainer.global_step, -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        step = trainer.global_step
        last = step == trainer.max_steps or (trainer.is_last_batch and trainer.current_epoch + 1 == trainer.max_epochs)
        if step == self._last_step or (step % self.every_n_steps and not last):
            return
        self._last_step = step
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        rate = (step - self._start_step) / elapsed if elapsed > 0 else math.nan
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        where = f"{step}/{total} ({100 * step / total:.0f}%)" if total else f"{step} (epoch {trainer.current_epoch})"
        metrics = format_metrics(self.get_metrics(trainer, pl_module), "train/")
        line = f"fit step {where} | {rate:.3g} steps/s | {_clock(elapsed)} elapsed"
        self._print(trainer, f"{line} | {metrics}" if metrics else line)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = format_metrics(trainer.callback_metrics, "val/")
        self._print(trainer, f"validation at step {trainer.global_step} | {metrics}")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, f"test | {format_metrics(trainer.callback_metrics, 'test/')}")
