"""Loading pickled numpy data without executing arbitrary pickled code.

``pickle.load`` calls any importable function a pickle names, so a crafted file runs code (``os.system``, ``eval``)
while loading. :class:`RestrictedUnpickler` resolves only the globals that numpy array reconstruction needs, across
pickle protocols 2-5 and numpy 1.x / 2.x module names, and refuses every other global before anything is called.
"""

from __future__ import annotations

import builtins
import codecs
import pickle
from pathlib import Path

import numpy as np

_array = np.zeros(1, dtype=np.uint8)
# the objects themselves, taken from numpy's own reductions, so that numpy.core and numpy._core names both resolve
_RECONSTRUCT = _array.__reduce__()[0]  # protocols 2-4: _reconstruct(ndarray, shape, dtype) + __setstate__
_FROMBUFFER = _array.__reduce_ex__(5)[0]  # protocol 5: _frombuffer(buffer, dtype, shape, order)
_SCALAR = np.int64(0).__reduce__()[0]  # numpy integer scalars, e.g. in index lists


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Protocol 2 stores ``bytes`` (the array data) as ``_codecs.encode(text, "latin1")``; only that is allowed."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    **{(m, "_reconstruct"): _RECONSTRUCT for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _SCALAR for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _FROMBUFFER for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
    # protocol 2 spells the builtins module as Python 2 did: __builtin__
    **{(m, n): getattr(builtins, n) for m in ("builtins", "__builtin__") for n in ("dict", "list", "tuple", "set",
                                                                                 "frozenset")},
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle named a global outside :data:`ALLOWED_GLOBALS`; nothing it references was called."""


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` admitting only numpy arrays, numpy dtypes / scalars and builtin containers.

    Args:
        file: binary file to read.
        where: how error messages name the file.
    """

    def __init__(self, file, where: str = "pickle") -> None:
        # latin1 lets numpy arrays pickled by Python 2 load; Python 3 pickles are unaffected
        super().__init__(file, encoding="latin1")
        self.where = where

    def find_class(self, module: str, name: str) -> object:
        obj = ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"{self.where}: refused global {module}.{name}; only numpy arrays and builtin containers may be "
                f"loaded from this file. It is not a plain data pickle: do not load it with pickle.load."
            )
        return obj

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError(f"{self.where}: refused persistent id {pid!r}; plain data pickles have none.")


def safe_load(path: str | Path) -> object:
    """Load a pickle of numpy arrays and builtin containers with :class:`RestrictedUnpickler`.

    Raises:
        UnsafePickleError: the pickle names a global that is not needed to rebuild numpy arrays.
        ValueError: the file is truncated or not a pickle.
    """
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, str(path)).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as e:
            raise ValueError(f"{path} is not a readable pickle ({type(e).__name__}: {e}); re-download it.") from e
