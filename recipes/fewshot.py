"""Few-shot classification recipe: episodic meta-learners on episodic datamodules.

    python recipes/fewshot.py fit  --config recipes/configs/omniglot/protonet_5w1s_quick.yaml
    python recipes/fewshot.py test --config recipes/configs/omniglot/protonet_5w1s_quick.yaml --ckpt_path best

Model and data are chosen by ``class_path`` in the YAML (any :class:`~lightning_mtl.meta.EpisodicModule` and any
LightningDataModule yielding :class:`~lightning_mtl.Episode` batches). ``fit`` keeps the best checkpoint by
``val/acc`` and the last one; ``test``/``validate`` accept ``--ckpt_path best|last|PATH``, where ``best`` and
``last`` are looked up in the checkpoint directory of the config (``checkpoint.dirpath``), so they also work in a
fresh process after ``fit``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_mtl.callbacks import EpisodeThroughput
from lightning_mtl.meta import EpisodicModule


class FewShotCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-{step}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(EpisodeThroughput, "throughput")
        parser.set_defaults({
            "trainer.logger": {
                "class_path": "lightning_mtl.loggers.WandbLogger",
                "init_args": {"project": "lightning-mtl"},
            },
        })

    def _resolve_ckpt_path(self) -> None:
        """Map ``best``/``last`` onto files of ``checkpoint.dirpath`` when no fit ran in this process."""
        config = self.config_init[self.subcommand]
        ckpt = config.get("ckpt_path")
        if ckpt not in ("best", "last"):
            return
        dirpath = config["checkpoint"].dirpath
        if dirpath is None:
            raise ValueError(f"--ckpt_path {ckpt} needs checkpoint.dirpath in the config to find the checkpoints.")
        last = Path(dirpath) / "last.ckpt"
        if not last.exists():
            raise FileNotFoundError(f"--ckpt_path {ckpt}: no {last}; run `fit` with this config first.")
        if ckpt == "last":
            config["ckpt_path"] = str(last)
            return
        state = torch.load(last, map_location="cpu", weights_only=True)["callbacks"]
        best = next((s["best_model_path"] for k, s in state.items() if k.startswith("ModelCheckpoint")), "")
        if not best or not Path(best).exists():
            raise FileNotFoundError(f"--ckpt_path best: {last} names no existing best checkpoint ({best!r}).")
        rank_zero_info(f"best checkpoint: {best}")
        config["ckpt_path"] = best

    def before_test(self) -> None:
        self._resolve_ckpt_path()

    def before_validate(self) -> None:
        self._resolve_ckpt_path()


def main(args: list[str] | None = None) -> FewShotCLI:
    return FewShotCLI(EpisodicModule, subclass_mode_model=True, subclass_mode_data=True, args=args,
                      save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
