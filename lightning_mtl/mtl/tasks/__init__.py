"""Tasks: head, loss and metrics (with their directions) of each kind of task, one file each."""

from lightning_mtl.mtl.tasks._dense import DenseTask
from lightning_mtl.mtl.tasks.base import Task
from lightning_mtl.mtl.tasks.classification import ClassificationTask
from lightning_mtl.mtl.tasks.depth import DepthTask
from lightning_mtl.mtl.tasks.multilabel import MultiLabelTask
from lightning_mtl.mtl.tasks.normals import NormalTask
from lightning_mtl.mtl.tasks.pixel_regression import PixelRegressionTask
from lightning_mtl.mtl.tasks.regression import RegressionTask
from lightning_mtl.mtl.tasks.segmentation import SegmentationTask

__all__ = ["ClassificationTask", "DenseTask", "DepthTask", "MultiLabelTask", "NormalTask", "PixelRegressionTask",
           "RegressionTask", "SegmentationTask", "Task"]
