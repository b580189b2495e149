"""Tasks: head, loss and metrics (with their directions) of each kind of task."""

from lightning_mtl.mtl.tasks.base import Task
from lightning_mtl.mtl.tasks.classification import ClassificationTask

__all__ = ["ClassificationTask", "Task"]
