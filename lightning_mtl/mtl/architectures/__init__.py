"""Multi-task architectures: one file each, given to :class:`~lightning_mtl.mtl.MultiTaskModule` by class path.

Importing the package imports every file in it, so ``list_architectures()`` names them all and a new architecture is
one new file.
"""

import importlib
import inspect
import pkgutil

from lightning_mtl.mtl.architectures.base import Architecture, ArchitectureCallable, split_stages

_ARCHITECTURES: dict[str, type[Architecture]] = {}
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "base":
        _mod = importlib.import_module(f"{__name__}.{_module.name}")
        for _name, _cls in inspect.getmembers(_mod, inspect.isclass):
            if issubclass(_cls, Architecture) and _cls is not Architecture and _cls.__module__ == _mod.__name__:
                _ARCHITECTURES[_name] = _cls
                globals()[_name] = _cls


def list_architectures() -> dict[str, type[Architecture]]:
    """Class name → class of every architecture in this package."""
    return dict(sorted(_ARCHITECTURES.items()))


__all__ = ["Architecture", "ArchitectureCallable", "list_architectures", "split_stages", *sorted(_ARCHITECTURES)]
