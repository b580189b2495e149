"""Balancing methods chosen by name (timm-style registry)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from lightning_mtl.mtl.balancing.base import Balancer, GradientAggregator, LossWeighting

_REGISTRY: dict[str, type[LossWeighting] | type[GradientAggregator]] = {}


def register_balancer(name: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`LossWeighting` or :class:`GradientAggregator` selectable as ``name``."""

    def add(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"balancer {name!r} is already registered ({_REGISTRY[name].__name__})")
        if not issubclass(cls, (LossWeighting, GradientAggregator)):
            raise TypeError(f"{cls.__name__} must subclass LossWeighting or GradientAggregator")
        _REGISTRY[name] = cls
        return cls

    return add


def list_balancers(kind: str | None = None) -> list[str]:
    """Registered names, optionally only ``"weighting"`` or ``"aggregator"`` ones."""
    base = {None: (LossWeighting, GradientAggregator), "weighting": LossWeighting, "aggregator": GradientAggregator}
    if kind not in base:
        raise ValueError(f"kind must be 'weighting', 'aggregator' or None, got {kind!r}")
    return sorted(n for n, cls in _REGISTRY.items() if issubclass(cls, base[kind]))


def balancer_class(name: str) -> type[LossWeighting] | type[GradientAggregator]:
    """The class registered as ``name``, or the class at the dotted path ``name`` (``my_module.MyWeighting``).

    Raises:
        ValueError: an unknown name (the message lists the valid ones) or a path that names no balancer class.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    module, _, attr = name.rpartition(".")
    cls = None
    if module:
        try:
            cls = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            cls = None
    if isinstance(cls, type) and issubclass(cls, (LossWeighting, GradientAggregator)):
        return cls
    raise ValueError(f"unknown balancing method {name!r}; valid names: {', '.join(list_balancers())} (or the class "
                     f"path of a LossWeighting or GradientAggregator subclass)")


def create_balancer(name: str, tasks: list[str], **kwargs: Any) -> LossWeighting | GradientAggregator:
    """Instantiate the method registered as ``name`` for ``tasks`` with its hyper-parameters ``kwargs``."""
    cls = balancer_class(name)
    try:
        return cls(tasks, **kwargs)
    except TypeError as e:
        valid = [p for p in inspect.signature(cls).parameters if p != "tasks"]
        raise TypeError(f"invalid arguments for balancing method {name!r} ({cls.__name__}): {e}; its arguments are: "
                        f"{', '.join(valid) or 'none'}.") from e


def resolve_balancer(
    spec: str | Callable[[list[str]], Balancer], tasks: list[str]
) -> LossWeighting | GradientAggregator:
    """The balancer for ``tasks`` from a registered name, a class path, or a callable taking the task names (what
    LightningCLI builds from ``class_path`` + ``init_args``).

    Raises:
        ValueError: an unknown name.
        TypeError: the callable does not return a :class:`LossWeighting` or :class:`GradientAggregator`.
    """
    if isinstance(spec, str):
        return create_balancer(spec, tasks) if spec in _REGISTRY else balancer_class(spec)(list(tasks))
    balancer = spec(list(tasks))
    if not isinstance(balancer, (LossWeighting, GradientAggregator)):
        raise TypeError(f"balancer must be a LossWeighting or GradientAggregator; {spec!r} gave "
                        f"{type(balancer).__name__}")
    return balancer
