"""Hard parameter sharing (Caruana, Machine Learning 1997): one shared backbone, one head per task."""

from __future__ import annotations

from torch import Tensor, nn


class HardSharing(nn.Module):
    """Shared ``backbone`` followed by task ``heads``.

    Args:
        backbone: ``(B, ...) -> (B, D)`` shared representation.
        heads: one module per task, ``(B, D) -> output``.
    """

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients the tasks compete for."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def task_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]

    def representation(self, x: Tensor, task: str | None = None) -> Tensor:
        return self.backbone(x).flatten(1)  # (B, D), the same for every task

    def head(self, task: str, z: Tensor) -> Tensor:
        return self.heads[task](z)

    def penalty(self) -> Tensor | None:
        return None
