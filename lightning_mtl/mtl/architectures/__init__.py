"""Multi-task architectures."""

from lightning_mtl.mtl.architectures.hard_sharing import HardSharing
from lightning_mtl.mtl.architectures.soft_sharing import SoftSharing

__all__ = ["HardSharing", "SoftSharing"]
