"""The architecture interface of :class:`~lightning_mtl.mtl.MultiTaskModule`.

An architecture maps the inputs to every task's representation in one forward pass, so whatever the tasks share (a
backbone, experts, an encoder) runs once per input. It says which of its parameters are shared (the ones several
task losses depend on, on which gradient aggregation acts) and which belong to one task, and it may add a penalty to
the loss (soft sharing). It knows nothing of losses, metrics or balancers: task heads live in the tasks
(:mod:`lightning_mtl.mtl.tasks`).

An architecture is given to the model by class path in YAML, like the optimizer; the model calls it with the task
names once they are known (from the config or the datamodule)::

    model:
      init_args:
        architecture:
          class_path: lightning_mtl.mtl.architectures.MMoE
          init_args:
            expert: {class_path: lightning_mtl.nn.Conv4, init_args: {in_channels: 1}}
            num_experts: 4

Writing one: subclass :class:`Architecture`, take ``tasks`` as the first constructor argument, implement
:meth:`Architecture.represent` and, if some parameters belong to one task only, :meth:`Architecture.task_parameters`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from lightning_mtl.mtl.balancing.base import checked_tasks


class Architecture(nn.Module):
    """Inputs → ``{task: representation}``, shared and task parameters, an optional penalty.

    Representations may have any shape: ``(B, D)`` for classification heads, ``(B, C, H, W)`` for dense tasks. The
    tasks' heads are sized from them by the model (a probe in evaluation mode, once).

    Args:
        tasks: the task names; :meth:`forward` returns one representation per name.
    """

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        self.tasks = checked_tasks(tasks)

    def represent(self, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        """The representations of ``tasks`` (a subset of :attr:`tasks`) for one input batch ``x``.

        Compute what the tasks share once; a task not in ``tasks`` need not be computed.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement represent(x, tasks)")

    def forward(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        """Every task's representation: of the one shared input batch ``x``, or, for per-task inputs (a dict keyed by
        task), of each task's own inputs (the shared part then runs once per task's batch)."""
        if isinstance(x, dict):
            return {t: self.represent(x[t], [t])[t] for t in x}
        return self.represent(x, self.tasks)

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Task name → the parameters that only that task's loss depends on (its gates, attention modules, column,
        ...). The default: none (every parameter is shared)."""
        return {}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters that several tasks' losses depend on: what gradient aggregation acts on.

        The default is every trainable parameter not listed in :meth:`task_parameters`.
        """
        own = {id(p) for params in self.task_parameters().values() for p in params}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in own]

    def penalty(self) -> Tensor | None:
        """A term added to the training loss on every balancing path (e.g. soft sharing's L2 tie), or ``None``."""
        return None


#: What the model is given: called with the task names, it returns the architecture (LightningCLI builds it from a
#: ``class_path`` whose ``init_args`` are every constructor argument but ``tasks``).
ArchitectureCallable = Callable[[list[str]], Architecture]


def split_stages(backbone: nn.Module) -> list[nn.Module]:
    """A backbone as the sequence of stages that cross-stitch, MTAN, LTB and multi-level experts interleave with.

    The backbone's own ``stages()`` if it defines one (``lightning_mtl.nn.Conv4``: its four blocks), else the children
    of an ``nn.Sequential``. The stages are the backbone's modules, not copies.

    Raises:
        TypeError: the backbone is neither.
    """
    if callable(getattr(backbone, "stages", None)):
        stages = list(backbone.stages())
    elif isinstance(backbone, nn.Sequential):
        stages = list(backbone.children())
    else:
        raise TypeError(f"{type(backbone).__name__} cannot be split into stages: give an nn.Sequential of stages or a "
                        f"backbone with a stages() method (e.g. lightning_mtl.nn.Conv4).")
    if not stages:
        raise ValueError(f"{type(backbone).__name__} has no stages")
    return stages
