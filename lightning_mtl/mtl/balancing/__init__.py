"""Balancing methods against negative transfer: loss weightings and gradient aggregators.

Each method is one file in this package, registered under a short name with
:func:`~lightning_mtl.mtl.balancing.register_balancer`; importing the package imports every file in it, so a new
method is one new file. ``list_balancers()`` names them all; the model also takes any class path (a user's own
method outside the package included).
"""

import importlib
import pkgutil

from lightning_mtl.mtl.balancing.base import Balancer, BalancerCallable, GradientAggregator, LossWeighting
from lightning_mtl.mtl.balancing.registry import (
    balancer_class,
    create_balancer,
    list_balancers,
    register_balancer,
    resolve_balancer,
)

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")  # registers the methods the file defines

__all__ = [
    "Balancer", "BalancerCallable", "GradientAggregator", "LossWeighting", "balancer_class", "create_balancer",
    "list_balancers", "register_balancer", "resolve_balancer",
]
