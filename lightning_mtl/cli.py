"""The LightningCLI base shared by the recipes: checkpointing, W&B by default, ``--ckpt_path best|last``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info


def resolve_checkpoint_alias(ckpt_path: str | None, dirpath: str | None) -> str | None:
    """Map ``--ckpt_path best|last`` onto the files that ``fit`` left in ``dirpath`` (``checkpoint.dirpath``).

    Lightning resolves ``best``/``last`` only inside the process that ran ``fit``; this makes them work in a fresh
    ``test``/``validate`` process too. ``best`` is read from the ModelCheckpoint state stored in ``last.ckpt``.
    Any other value is returned unchanged.

    Raises:
        ValueError: ``dirpath`` is not set.
        FileNotFoundError: ``last.ckpt`` or the best checkpoint it names does not exist.
    """
    if ckpt_path not in ("best", "last"):
        return ckpt_path
    if dirpath is None:
        raise ValueError(f"--ckpt_path {ckpt_path} needs checkpoint.dirpath in the config to find the checkpoints.")
    last = Path(dirpath) / "last.ckpt"
    if not last.exists():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no {last}; run `fit` with this config first.")
    if ckpt_path == "last":
        return str(last)
    state = torch.load(last, map_location="cpu", weights_only=True)["callbacks"]
    best = next((s["best_model_path"] for k, s in state.items() if k.startswith("ModelCheckpoint")), "")
    if not best or not Path(best).exists():
        raise FileNotFoundError(f"--ckpt_path best: {last} names no existing best checkpoint ({best!r}).")
    rank_zero_info(f"best checkpoint: {best}")
    return best


class RecipeCLI(LightningCLI):
    """LightningCLI with a ``checkpoint`` group (best by :attr:`monitor` and last), the W&B logger of
    :mod:`lightning_mtl.loggers` by default, and ``--ckpt_path best|last`` for ``test``/``validate`` in a fresh
    process. Recipes subclass it and set :attr:`monitor`."""

    #: metric that selects the best checkpoint (maximised).
    monitor: str = "val/acc"

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": self.monitor,
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-{step}",
            "checkpoint.auto_insert_metric_name": False,
            "trainer.logger": {
                "class_path": "lightning_mtl.loggers.WandbLogger",
                "init_args": {"project": "lightning-mtl"},
            },
        })

    def _resolve_ckpt_path(self) -> None:
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = resolve_checkpoint_alias(config.get("ckpt_path"), config["checkpoint"].dirpath)

    def before_test(self) -> None:
        self._resolve_ckpt_path()

    def before_validate(self) -> None:
        self._resolve_ckpt_path()

    def after_test(self) -> None:
        """Write the test metrics to ``test_metrics.json`` beside the checkpoint directory (input of delta_m.py)."""
        dirpath = self.config_init[self.subcommand]["checkpoint"].dirpath
        if dirpath is None or not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
        out = Path(dirpath).parent / "test_metrics.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        rank_zero_info(f"test metrics written to {out}")
