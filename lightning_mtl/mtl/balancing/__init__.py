"""Balancing methods against negative transfer, chosen by name."""

from lightning_mtl.mtl.balancing.base import GradientAggregator, LossWeighting
from lightning_mtl.mtl.balancing.registry import balancer_class, create_balancer, list_balancers, register_balancer

__all__ = [
    "GradientAggregator", "LossWeighting", "balancer_class", "create_balancer", "list_balancers", "register_balancer",
]
