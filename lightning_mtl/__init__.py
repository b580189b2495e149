"""lightning-mtl: multi-task learning and meta-learning on PyTorch Lightning."""

from lightning_mtl.batches import Episode, LabelledBatch, MultiTaskBatch

__version__ = "0.1.0.dev0"
__all__ = ["Episode", "LabelledBatch", "MultiTaskBatch", "__version__"]
