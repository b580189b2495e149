"""Episodic meta-learners."""

from lightning_mtl.meta.base import EpisodicModule
from lightning_mtl.meta.maml import MAML
from lightning_mtl.meta.protonet import ProtoNet, prototypes, squared_euclidean_logits

__all__ = ["MAML", "EpisodicModule", "ProtoNet", "prototypes", "squared_euclidean_logits"]
