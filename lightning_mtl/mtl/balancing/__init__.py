"""Balancing methods against negative transfer, chosen by name.

Importing this package registers every method: loss weightings (``equal``, ``fixed``, ``uncertainty``, ``dwa``,
``gradnorm``, ``rlw``, ``famo``) and gradient aggregators (``mean``, ``pcgrad``, ``mgda``, ``cagrad``, ``nash_mtl``,
``imtl_g``, ``aligned_mtl``, ``upgrad``, ``graddrop``, ``gradvac``).
"""

from lightning_mtl.mtl.balancing import (  # noqa: F401  (imported to register the methods)
    aggregators,
    dwa,
    equal,
    famo,
    fixed,
    gradnorm,
    rlw,
    surgery,
    uncertainty,
)
from lightning_mtl.mtl.balancing.base import GradientAggregator, LossWeighting
from lightning_mtl.mtl.balancing.registry import balancer_class, create_balancer, list_balancers, register_balancer

__all__ = [
    "GradientAggregator", "LossWeighting", "balancer_class", "create_balancer", "list_balancers", "register_balancer",
]
