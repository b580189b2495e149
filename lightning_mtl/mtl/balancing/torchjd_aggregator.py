"""Base class of the gradient aggregators backed by :mod:`torchjd.aggregation`.

All the mathematics is torchjd's (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
arXiv:2406.16232); a subclass only fixes a typed constructor with torchjd's defaults, a registered name and a
reference. This wrapper checks the shape, computes in float32 at least (torchjd's solvers and projections are
unreliable in half precision) and casts the result back to the matrix dtype, and records the ``(tasks,)`` weights
when torchjd combines the rows linearly (its aggregators with a ``weighting``). Vector hyper-parameters
(``pref_vector``, ``leak``) are non-persistent buffers, handed to torchjd on the matrix's device and dtype at each call.
"""

from __future__ import annotations

import torch
import torchjd.aggregation as tjd
from torch import Tensor, nn

from lightning_mtl.mtl.balancing.base import GradientAggregator


class TorchJDAggregator(GradientAggregator):
    """Delegates ``(tasks, dims) -> (dims,)`` to a torchjd aggregator; see the module docstring.

    Subclass it with a typed constructor to register another torchjd aggregator.

    Args:
        tasks: task names, in the order of the matrix rows.
        aggregator: the torchjd aggregator doing the work.
        vectors: names of per-task vector attributes of ``aggregator`` mapped to their values (``None`` keeps
            torchjd's default).

    Raises:
        ValueError: if a vector does not have one entry per task.
    """

    def __init__(
        self, tasks: list[str], aggregator: tjd.Aggregator, vectors: dict[str, list[float] | None] | None = None
    ) -> None:
        super().__init__(tasks)
        self.aggregator = aggregator
        self._vectors = [name for name, value in (vectors or {}).items() if value is not None]
        for name in self._vectors:
            if len(vectors[name]) != len(self.tasks):
                raise ValueError(f"{name} needs one entry per task {self.tasks}, got {len(vectors[name])}")
            self.register_buffer(name, torch.tensor(vectors[name], dtype=torch.float32), persistent=False)
        weighting = getattr(aggregator, "weighting", None)
        if isinstance(weighting, nn.Module):
            weighting.register_forward_hook(self._record_weights)

    def _record_weights(self, module: nn.Module, args: tuple, weights: Tensor) -> None:
        self.weights = weights.detach()

    def forward(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        """The aggregated ``(dims,)`` update direction of the ``(tasks, dims)`` matrix of task gradients (``losses``
        is not read).

        Raises:
            ValueError: if ``matrix`` is not a matrix with one row per task.
        """
        self._check_matrix(matrix)
        dtype = torch.promote_types(matrix.dtype, torch.float32)
        for name in self._vectors:
            setattr(self.aggregator, name, getattr(self, name).to(device=matrix.device, dtype=dtype))
        return self.aggregator(matrix.to(dtype)).to(matrix.dtype)
