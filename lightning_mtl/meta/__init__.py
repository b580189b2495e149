"""Episodic meta-learners."""

from lightning_mtl.meta.base import EpisodicModule
from lightning_mtl.meta.maml import MAML
from lightning_mtl.meta.protonet import ProtoNet, prototypes, squared_euclidean_logits
from lightning_mtl.meta.r2d2 import R2D2, ridge_logits

__all__ = ["MAML", "R2D2", "EpisodicModule", "ProtoNet", "prototypes", "ridge_logits", "squared_euclidean_logits"]
