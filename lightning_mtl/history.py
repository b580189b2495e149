"""The metric history of a fit, as a file beside its checkpoints: what ``recipes/report.py`` draws curves from.

:class:`MetricsHistory` is a Lightning logger: every row the trainer logs (training steps every
``log_every_n_steps``, each validation, the multi-task ``diag/*`` conflict diagnostics) becomes one JSON line of
``metrics.jsonl``, with its step (Lightning's, as W&B shows it: the 0-based index of the last optimizer step, so
the validation after 500 steps is at step 499) and the seconds since the fit started::

    {"step": 499, "seconds": 61.2, "val/acc": 0.957, "val/acc_ci95": 0.004}

The recipes add it to every ``fit`` beside the configured logger (W&B or none), writing into the run's checkpoint
folder; a resumed fit (``--ckpt_path``) appends, a new fit starts the file again. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor


class MetricsHistory(Logger):
    """Append every logged metric row to ``<dirpath>/metrics.jsonl`` (see the module docstring).

    Args:
        dirpath: folder of the file (the run's checkpoint folder).
        append: keep the rows already in the file (a resumed fit); otherwise the file starts empty.
        filename: the file's name.
    """

    def __init__(self, dirpath: str | Path, append: bool = False, filename: str = "metrics.jsonl") -> None:
        super().__init__()
        self.path = Path(dirpath) / filename
        self._append = append
        self._started = time.monotonic()
        self._offset = 0.0  # seconds of the rows already in the file (a resumed fit continues the clock)
        self._opened = False

    @property
    def name(self) -> str:
        return "history"

    @property
    def version(self) -> str:
        return "0"

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._append and self.path.is_file():
            rows = read_history(self.path)
            self._offset = max((row.get("seconds", 0.0) for row in rows), default=0.0)
        else:
            self.path.write_text("")
        self._started = time.monotonic()
        self._opened = True

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """The hyper-parameters are in the run's ``config.yaml``; nothing is written here."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self._opened:
            self._open()
        row: dict[str, Any] = {"step": step, "seconds": round(self._offset + time.monotonic() - self._started, 3)}
        for key, value in metrics.items():
            value = float(value.item() if isinstance(value, Tensor) else value)
            row[key] = value if math.isfinite(value) else str(value)  # JSON has no nan / inf
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file (non-finite values as ``float``); ``[]`` when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append({k: float(v) if isinstance(v, str) and v in ("nan", "inf", "-inf") else v
                         for k, v in row.items()})
    return rows
