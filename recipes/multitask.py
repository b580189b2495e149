"""Multi-task recipe: a MultiTaskModule on a multi-task datamodule, the balancing method chosen by name.

    python recipes/multitask.py fit  --config recipes/configs/multimnist/hps_pcgrad_quick.yaml
    python recipes/multitask.py test --config recipes/configs/multimnist/hps_pcgrad_quick.yaml --ckpt_path best
    python recipes/delta_m.py --baseline runs/multimnist/single_task_quick/test_metrics.json \
        pcgrad=runs/multimnist/hps_pcgrad_quick/test_metrics.json            # Δm% against single-task

Model and data are chosen by ``class_path`` in the YAML; ``model.balancer`` names any registered balancing method
(``lightning_mtl.mtl.balancing.list_balancers()``; an unknown name lists the valid ones). With
``model.num_classes: null`` the tasks come from the datamodule. ``fit`` keeps the best checkpoint by
``val/metric_mean`` and the last one; ``test``/``validate --ckpt_path best|last`` find them in ``checkpoint.dirpath``.
A NaN/Inf loss skips the step with a warning (``--nonfinite.mode skip``, the default), stops training (``raise``) or
is applied (``off``), as in the few-shot recipe.
"""

from __future__ import annotations

from lightning_mtl.cli import RecipeCLI, run
from lightning_mtl.mtl import MultiTaskModule


class MultiTaskCLI(RecipeCLI):
    monitor = "val/metric_mean"

    def catalogue(self) -> dict[str, dict[str, object]]:
        import lightning_mtl.datamodules as data
        import lightning_mtl.mtl.tasks as tasks
        import lightning_mtl.nn as backbones
        from lightning_mtl.mtl.architectures import list_architectures
        from lightning_mtl.mtl.balancing import balancer_class, list_balancers

        datamodules = {n: getattr(data, n) for n in data.__all__ if isinstance(getattr(data, n), type)
                       and issubclass(getattr(data, n), data.MultiTaskDataModule) and n != "MultiTaskDataModule"}
        return {"datamodules (--data)": datamodules,
                "architectures (--model.architecture)": list_architectures(),
                "balancers (--model.balancer; a name, or its class with arguments)":
                    {n: balancer_class(n) for n in list_balancers()},
                "tasks (--model.tasks; or from the datamodule)": {n: getattr(tasks, n) for n in tasks.__all__
                                                                  if n not in ("Task", "DenseTask")},
                "backbones and building blocks (lightning_mtl.nn)":
                    {n: getattr(backbones, n) for n in backbones.__all__}}


def main(args: list[str] | None = None) -> MultiTaskCLI:
    return MultiTaskCLI(MultiTaskModule, subclass_mode_model=True, subclass_mode_data=True, args=args,
                        save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    run(main)
