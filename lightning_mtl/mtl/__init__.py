"""Multi-task learning: architectures, tasks, balancing methods, the model that wires them, and diagnostics."""

from lightning_mtl.mtl.architectures import Architecture, HardSharing, SoftSharing
from lightning_mtl.mtl.diagnostics import gradient_diagnostics
from lightning_mtl.mtl.module import MultiTaskModule
from lightning_mtl.mtl.tasks import ClassificationTask, Task

__all__ = ["Architecture", "ClassificationTask", "HardSharing", "MultiTaskModule", "SoftSharing", "Task",
           "gradient_diagnostics"]
