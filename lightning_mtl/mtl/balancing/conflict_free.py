"""ConFIG: Conflict-Free Inverse Gradients.

Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks", ICLR 2025,
arXiv:2408.11104 (Equation 2).

With U the (K, D) matrix of unit task gradients u_k = g_k / ||g_k|| and w the preference vector (ones by default),

    v = pinv(U) w / ||pinv(U) w||,      update = (sum_k g_k . v) v.

When the gradients are linearly independent, U v is proportional to w: the direction has the same cosine with every
task gradient (cosines in the ratio of w), so it conflicts with none of them, and its length is the sum of the task
gradients' projections onto it. A zero gradient gets a zero unit row. The mathematics is torchjd's ``ConFIG``
(adapted from the official ``conflictfree`` package with its defaults: least-squares direction, projection length).

Registered as ``"conflict_free"``, the official package's name, not ``"config"``: LightningCLI already has
``--config`` (the YAML file), and a balancer named ``config`` would read as a configuration everywhere it appears.
"""

from __future__ import annotations

import torch
import torchjd.aggregation as tjd
from torch import Tensor

from lightning_mtl.mtl.balancing.registry import register_balancer
from lightning_mtl.mtl.balancing.torchjd_aggregator import TorchJDAggregator

_BLOCK = 1 << 20  # columns per float64 block of the Gramian


@register_balancer("conflict_free")
class ConFIG(TorchJDAggregator):
    """The conflict-free direction of ConFIG, scaled by the sum of the task gradients' projections onto it.

    The update is a linear combination of the task gradients; ``self.weights`` holds its coefficients, the
    minimum-norm solution of ``weights @ matrix = update`` (torchjd only exposes the preference vector). They come
    from the ``(tasks, tasks)`` Gramian accumulated in float64, block by block of columns: the Gramian squares the
    condition number of nearly parallel gradients, and in float32 the weights can be entirely wrong. They are as
    accurate as torchjd's float32 update lies in the span of the rows (about 1e-5 relative for ill-conditioned rows).

    Args:
        tasks: task names, in the order of the matrix rows.
        pref_vector: the vector w, one entry per task: the target cosines of the direction with the task gradients
            are proportional to it; ``None`` gives ones (the paper's equal cosines).
    """

    def __init__(self, tasks: list[str], pref_vector: list[float] | None = None) -> None:
        super().__init__(tasks, tjd.ConFIG(), {"pref_vector": pref_vector})

    def forward(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        """The ``(dims,)`` ConFIG update of the ``(tasks, dims)`` matrix (``losses`` is not read).

        Raises:
            ValueError: if ``matrix`` is not a matrix with one row per task.
        """
        update = super().forward(matrix, losses)
        weights = row_coefficients(matrix.detach(), update.detach())
        self.weights = weights.to(torch.promote_types(matrix.dtype, torch.float32))
        return update


def row_coefficients(matrix: Tensor, vector: Tensor) -> Tensor:
    """The minimum-norm ``(tasks,)`` float64 w with ``w @ matrix = vector``, for ``vector`` in the row space of the
    ``(tasks, dims)`` matrix: ``pinv(M M^T) M v``, with M M^T and M v summed in float64 over blocks of columns."""
    k = matrix.shape[0]
    gramian = torch.zeros(k, k, dtype=torch.float64, device=matrix.device)  # (K, K)
    projections = torch.zeros(k, dtype=torch.float64, device=matrix.device)  # (K,)
    for rows, part in zip(matrix.split(_BLOCK, dim=1), vector.split(_BLOCK), strict=True):
        rows = rows.double()  # (K, block): a bounded float64 copy, not one of the whole matrix
        gramian += rows @ rows.T
        projections += rows @ part.double()
    return torch.linalg.pinv(gramian, hermitian=True) @ projections
