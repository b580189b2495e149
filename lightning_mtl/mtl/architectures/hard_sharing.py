"""Hard parameter sharing (Caruana, "Multitask Learning", Machine Learning 1997): one backbone shared by every task.

Each task's head (in its :class:`~lightning_mtl.mtl.tasks.Task`) reads the backbone's output; every parameter of the
backbone is shared. LibMTL calls it HPS.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_mtl.mtl.architectures.base import Architecture


class HardSharing(Architecture):
    """One ``backbone`` pass per input; every task reads the same representation.

    Args:
        tasks: task names.
        backbone: ``(B, ...) -> representation`` of any shape, ``(B, D)`` or ``(B, C, H, W)``.
    """

    def __init__(self, tasks: list[str], backbone: nn.Module) -> None:
        super().__init__(tasks)
        self.backbone = backbone

    def represent(self, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        z = self.backbone(x)  # computed once, read by every task
        return dict.fromkeys(tasks, z)
