"""Multi-task learning: shared models, balancing methods and diagnostics."""

from lightning_mtl.mtl.architectures import HardSharing, SoftSharing
from lightning_mtl.mtl.diagnostics import gradient_diagnostics
from lightning_mtl.mtl.module import MultiTaskModule
from lightning_mtl.mtl.tasks import TaskSpec, classification_task

__all__ = ["HardSharing", "MultiTaskModule", "SoftSharing", "TaskSpec", "classification_task", "gradient_diagnostics"]
