"""The two kinds of balancing methods a :class:`~lightning_mtl.mtl.MultiTaskModule` can hold, both a :class:`Balancer`.

* :class:`LossWeighting` maps the per-task losses to one scalar loss (one backward pass).
* :class:`GradientAggregator` maps a ``(tasks, dims)`` matrix of per-task gradients to one ``(dims,)`` update
  direction (torchjd's ``Aggregator`` shape).

Both are ``nn.Module`` s so that learnable parameters (uncertainty weighting's log-variances) and state (DWA's loss
history, FAMO's logits) live in the module's ``state_dict`` and therefore in checkpoints. Every method is one file
under ``lightning_mtl/mtl/balancing/`` registered with :func:`~lightning_mtl.mtl.balancing.register_balancer`;
its constructor takes ``tasks`` (the task names, in the order of the gradient matrix rows) first, then typed
hyper-parameters with defaults. The model is given a registered name (a shortcut) or a class path with ``init_args``
(:data:`BalancerCallable`), which LightningCLI validates against the constructor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def checked_tasks(tasks: list[str]) -> list[str]:
    """``tasks`` as a new list, after checking it names at least one task and no task twice."""
    if not tasks:
        raise ValueError("a balancing method needs at least one task")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task names must be unique, got {tasks}")
    return list(tasks)


class Balancer(nn.Module):
    """A balancing method for ``tasks``: the common base of :class:`LossWeighting` and :class:`GradientAggregator`.

    Args:
        tasks: task names, in the order of the loss vector and the gradient matrix rows.

    Attributes:
        weights: the ``(tasks,)`` task weights of the last call (detached), for diagnostics; ``None`` when the method
            does not combine the tasks linearly.
    """

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        self.tasks = checked_tasks(tasks)
        self.weights: Tensor | None = None


#: What the model is given besides a registered name: called with the task names, it returns the balancer
#: (LightningCLI builds it from a ``class_path`` whose ``init_args`` are every constructor argument but ``tasks``).
BalancerCallable = Callable[[list[str]], Balancer]


class LossWeighting(Balancer):
    """Per-task losses → one scalar loss.

    Args:
        tasks: task names; ``losses`` passed to :meth:`forward` must have exactly these keys.

    Attributes:
        weights: the ``(tasks,)`` weights used by the last :meth:`forward` (detached), for diagnostics.
    """

    #: whether :meth:`forward` needs ``shared_params`` (e.g. GradNorm differentiates task-gradient norms).
    needs_shared_params: bool = False

    def forward(self, losses: dict[str, Tensor], shared_params: list[Tensor] | None = None) -> Tensor:
        """The scalar loss to back-propagate."""
        raise NotImplementedError

    def after_step(self, losses: dict[str, Tensor]) -> None:
        """Called after the optimizer step with the detached losses of that step (history-based methods)."""

    def _stack_losses(self, losses: dict[str, Tensor]) -> Tensor:
        """The ``(tasks,)`` vector of ``losses`` in task order; a clear error if the keys are not the tasks."""
        if set(losses) != set(self.tasks):
            missing = [t for t in self.tasks if t not in losses]
            extra = [k for k in losses if k not in self.tasks]
            raise ValueError(
                f"{type(self).__name__} expects losses for tasks {self.tasks}; missing {missing}, unexpected {extra}"
            )
        for task in self.tasks:
            if losses[task].numel() != 1:
                raise ValueError(f"the loss of task {task!r} must be a scalar, got shape {tuple(losses[task].shape)}")
        return torch.stack([losses[task].reshape(()) for task in self.tasks])  # (tasks,)


class GradientAggregator(Balancer):
    """``(tasks, dims)`` per-task gradient matrix → ``(dims,)`` update direction.

    Methods that also read the task losses (DB-MTL's log-loss gradients, MoCo, STCH-style normalisations) set
    :attr:`needs_losses`; the model then passes the ``(tasks,)`` losses of the global batch (averaged over ranks).

    Args:
        tasks: task names, in the order of the matrix rows.

    Attributes:
        weights: for aggregators that combine rows linearly, the ``(tasks,)`` weights of the last call (detached);
            ``None`` otherwise.
    """

    #: whether :meth:`forward` needs the ``(tasks,)`` losses.
    needs_losses: bool = False
    #: buffers whose width is only known at the first call (a (K, D) state, e.g. MoCo's tracked gradients): a
    #: checkpoint's saved shape is taken when loading, so a fresh instance loads a checkpoint of any width
    lazy_buffers: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        for name in self.lazy_buffers:
            saved, current = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                setattr(self, name, torch.zeros(saved.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        """The ``(dims,)`` update direction of the ``(tasks, dims)`` matrix (and, if :attr:`needs_losses`, the
        ``(tasks,)`` losses)."""
        raise NotImplementedError

    def after_step(self, losses: dict[str, Tensor]) -> None:
        """Called after the optimizer step with the detached losses of that step (history-based methods)."""

    def _check_matrix(self, matrix: Tensor) -> None:
        """A clear error if ``matrix`` is not ``(tasks, dims)``."""
        if matrix.ndim != 2 or matrix.shape[0] != len(self.tasks):
            raise ValueError(
                f"expected a (tasks={len(self.tasks)}, dims) matrix, one row per task {self.tasks}; "
                f"got shape {tuple(matrix.shape)}"
            )
