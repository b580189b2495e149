"""Few-shot classification recipe: episodic meta-learners on episodic datamodules.

    python recipes/fewshot.py fit  --config recipes/configs/omniglot/protonet_5w1s_quick.yaml
    python recipes/fewshot.py test --config recipes/configs/omniglot/protonet_5w1s_quick.yaml --ckpt_path best

Model and data are chosen by ``class_path`` in the YAML (any :class:`~lightning_mtl.meta.EpisodicModule` and any
LightningDataModule yielding :class:`~lightning_mtl.Episode` batches). ``fit`` keeps the best checkpoint by
``val/acc`` and the last one; ``test``/``validate`` accept ``--ckpt_path best|last|PATH``, where ``best`` and
``last`` are looked up in the checkpoint directory of the config (``checkpoint.dirpath``), so they also work in a
fresh process after ``fit``. A NaN/Inf loss never reaches the weights: the step is skipped with a warning
(``--nonfinite.mode skip``, the default) or training stops (``raise``); ``off`` saves its one host sync per step.
"""

from __future__ import annotations

from lightning_mtl.callbacks import EpisodeThroughput
from lightning_mtl.cli import RecipeCLI, run
from lightning_mtl.meta import EpisodicModule


class FewShotCLI(RecipeCLI):
    monitor = "val/acc"

    def catalogue(self) -> dict[str, dict[str, object]]:
        import lightning_mtl.datamodules as data
        import lightning_mtl.meta as meta
        import lightning_mtl.nn as backbones

        def subclasses(module, base, *bases) -> dict[str, object]:
            return {n: getattr(module, n) for n in sorted(module.__all__)
                    if isinstance(getattr(module, n), type) and issubclass(getattr(module, n), base)
                    and getattr(module, n) not in (base, *bases)}

        return {"models (--model)": subclasses(meta, EpisodicModule, meta.GradientLearner),
                "episodic datamodules (--data)": {n: getattr(data, n) for n in ("OmniglotEpisodes",
                                                  "MiniImageNetEpisodes", "ImageFolderEpisodes",
                                                  "TaskDatasetEpisodes")},
                "backbones and building blocks (--model.backbone; lightning_mtl.nn)":
                    {n: getattr(backbones, n) for n in backbones.__all__}}

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(EpisodeThroughput, "throughput")


def main(args: list[str] | None = None) -> FewShotCLI:
    return FewShotCLI(EpisodicModule, subclass_mode_model=True, subclass_mode_data=True, args=args,
                      save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    run(main)
