"""The task interface: what a :class:`~lightning_mtl.mtl.MultiTaskModule` knows about one task.

A task owns its head (sized from the representation the architecture gives it), its loss, its metrics and each
metric's direction. The model's checkpoint monitor and ``recipes/delta_m.py`` read directions from here; nothing else
guesses whether bigger is better.

Writing one: subclass :class:`Task`, implement :meth:`Task.build_head`, :meth:`Task.loss` and :meth:`Task.metrics`
(torchmetrics metrics whose ``higher_is_better`` is set), and, if targets can be malformed, :meth:`Task.check_target`.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchmetrics import Metric


class Task(nn.Module):
    """Head, loss and metrics of one task.

    The head is built by :meth:`build` once the representation's shape is known; until then :attr:`head` is ``None``.
    """

    #: whether the head reads representations of any spatial size (convolutional dense heads); otherwise the model
    #: checks each batch's representation against the shape the head was sized for, and names a mismatch
    any_spatial_size: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.head: nn.Module | None = None

    # ------------------------------------------------------------------ to implement
    def build_head(self, representation_shape: tuple[int, ...]) -> nn.Module:
        """The head for representations of shape ``representation_shape`` (one sample's, without the batch).

        Raises:
            ValueError: the task cannot read such a representation (e.g. a dense task given ``(D,)``); say what
                architecture or backbone gives one it can read.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement build_head(representation_shape)")

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The scalar training loss of a batch (a mean over its valid elements)."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss(output, target)")

    def metrics(self) -> dict[str, Metric]:
        """Fresh metrics, updated with ``(output, target)``; the first is the task's main metric. Each metric's
        ``higher_is_better`` gives its direction."""
        raise NotImplementedError(f"{type(self).__name__} must implement metrics()")

    # ------------------------------------------------------------------ optional
    def check_target(self, target: Tensor) -> None:
        """Raise ``ValueError`` saying what to fix if ``target`` (one batch, on the CPU) cannot be this task's."""

    def align(self, output: Tensor, target: Tensor) -> Tensor:
        """``output`` made comparable with ``target`` before the loss and the metrics (dense tasks resize it to the
        target's spatial size); the identity by default."""
        return output

    # ------------------------------------------------------------------ provided
    def build(self, representation_shape: tuple[int, ...]) -> None:
        """Create the head for representations of shape ``representation_shape`` (once)."""
        self.head = self.build_head(tuple(representation_shape))

    def forward(self, z: Tensor) -> Tensor:
        if self.head is None:
            raise RuntimeError(f"{type(self).__name__}.build(representation_shape) must run before forward")
        return self.head(z)

    def directions(self) -> dict[str, bool]:
        """Metric name → ``True`` if higher is better, in the order of :meth:`metrics` (the first is the main one).

        Raises:
            ValueError: a metric does not declare ``higher_is_better``.
        """
        out = {}
        for name, metric in self.metrics().items():
            if metric.higher_is_better is None:
                raise ValueError(f"{type(self).__name__}: metric {name!r} ({type(metric).__name__}) does not declare "
                                 f"higher_is_better; set it so that the monitor and Δm% know its direction.")
            out[name] = bool(metric.higher_is_better)
        return out
