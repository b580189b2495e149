"""Episodic meta-learners: gradient-based on one core (``GradientLearner``: MAML / FOMAML, ANIL, Meta-SGD, Reptile, a
learned optimizer), metric-based (ProtoNet, Matching,
Relation and Siamese networks), closed-form heads (R2D2 ridge regression, MetaOptNet SVM), and the pretrained-embedding
baseline of Tian et al. (EmbeddingBaseline)."""

from lightning_mtl.meta.anil import ANIL
from lightning_mtl.meta.base import EpisodicModule
from lightning_mtl.meta.gradient_based import Adaptation, GradientLearner
from lightning_mtl.meta.learned_optimizer import LearnedOptimizer, MetaLearnerLSTM
from lightning_mtl.meta.maml import MAML
from lightning_mtl.meta.matching import FullContextEmbedding, MatchingNetwork, matching_log_probs
from lightning_mtl.meta.meta_sgd import MetaSGD
from lightning_mtl.meta.metaoptnet import MetaOptNet
from lightning_mtl.meta.pretrained_embedding import EmbeddingBaseline, logistic_regression_logits
from lightning_mtl.meta.protonet import ProtoNet, prototypes, squared_euclidean_logits
from lightning_mtl.meta.r2d2 import R2D2, ridge_logits
from lightning_mtl.meta.relation import RelationEmbedding, RelationNetwork, class_features
from lightning_mtl.meta.reptile import Reptile
from lightning_mtl.meta.siamese import KochEmbedding, SiameseNetwork, nearest_support_logits
from lightning_mtl.meta.tr_maml import TRMAML, family_ascent, family_weighted_loss, project_to_simplex

__all__ = [
    "ANIL",
    "MAML",
    "Adaptation",
    "R2D2",
    "EmbeddingBaseline",
    "EpisodicModule",
    "FullContextEmbedding",
    "GradientLearner",
    "KochEmbedding",
    "LearnedOptimizer",
    "MatchingNetwork",
    "MetaLearnerLSTM",
    "MetaOptNet",
    "MetaSGD",
    "ProtoNet",
    "RelationEmbedding",
    "RelationNetwork",
    "Reptile",
    "SiameseNetwork",
    "TRMAML",
    "class_features",
    "family_ascent",
    "family_weighted_loss",
    "logistic_regression_logits",
    "matching_log_probs",
    "nearest_support_logits",
    "project_to_simplex",
    "prototypes",
    "ridge_logits",
    "squared_euclidean_logits",
]
