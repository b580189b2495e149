"""SDMGrad: stochastic direction-oriented multi-objective gradient descent.

Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms",
NeurIPS 2023, arXiv:2305.18409.

SDMGrad keeps the update close to a target direction g_0 = w~^T G (the mean gradient by default) while avoiding
conflicts: with A = G_1 G_2^T, the weights w on the simplex take ``n_iter`` projected SGD steps (with momentum) on

    1/2 (w + lambda w~)^T A (w + lambda w~),      and the update is  G_3^T (w + lambda w~) / (1 + lambda).

lambda = 0 is (stochastic) MGDA, lambda -> infinity the target direction. As in the official code and LibMTL, A is
first divided by the squared mean of the gradient norms, so ``lr`` does not depend on the gradients' scale; w is
warm-started from the previous call. The mathematics is torchjd's ``SDMGradWeighting``.

Deviation: the paper draws G_1, G_2 and G_3 from independent mini-batches (A then estimates G G^T without bias). A
:class:`~lightning_mtl.mtl.balancing.base.GradientAggregator` sees one ``(tasks, dims)`` matrix per step, so here
G_1 = G_2 = G_3 = G (the single-sample variant; the convergence guarantee needs the independent draws). w is torchjd's
buffer, created at construction so every ``state_dict`` has it.
"""

from __future__ import annotations

import torch
import torchjd.aggregation as tjd
from torch import Tensor

from lightning_mtl.mtl.balancing.registry import register_balancer
from lightning_mtl.mtl.balancing.torchjd_aggregator import TorchJDAggregator


@register_balancer("sdmgrad")
class SDMGrad(TorchJDAggregator):
    """MGDA-like weights regularised towards a target direction, solved by warm-started projected SGD.

    Args:
        tasks: task names, in the order of the matrix rows.
        lr: learning rate of the inner SGD on w.
        momentum: momentum of the inner SGD, in [0, 1).
        n_iter: inner SGD steps per call (LibMTL's ``SDMGrad_niter``).
        lambda_: pull towards the target direction (0.3: the official experiments and LibMTL; the official class
            default is 0.6).
        pref_vector: w~, one weight per task defining the target direction; ``None`` gives ``1/K`` each.

    Raises:
        ValueError: for ``lr <= 0``, ``momentum`` outside [0, 1), ``n_iter < 1``, ``lambda_ < 0`` or a
            ``pref_vector`` without one entry per task.
    """

    def __init__(
        self,
        tasks: list[str],
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: list[float] | None = None,
    ) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or n_iter < 1 or lambda_ < 0:
            raise ValueError(f"SDMGrad needs lr > 0, 0 <= momentum < 1, n_iter >= 1 and lambda_ >= 0; got lr={lr}, "
                             f"momentum={momentum}, n_iter={n_iter}, lambda_={lambda_}")
        weighting = tjd.SDMGradWeighting(lr=lr, momentum=momentum, n_iter=n_iter, lambda_=lambda_)
        super().__init__(tasks, tjd.GramianWeightedAggregator(weighting))
        k = len(self.tasks)
        if pref_vector is not None:
            if len(pref_vector) != k:
                raise ValueError(f"pref_vector needs one entry per task {self.tasks}, got {len(pref_vector)}")
            self.register_buffer("pref_vector", torch.tensor(pref_vector, dtype=torch.float32), persistent=False)
        else:
            self.pref_vector = None
        # torchjd creates w (uniform) at the first call; creating it now puts it in every state_dict.
        weighting._ensure_state(torch.zeros(k, k))

    def forward(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        """The ``(dims,)`` update of the ``(tasks, dims)`` matrix after the inner solve (``losses`` is not read).

        Raises:
            ValueError: if ``matrix`` is not a matrix with one row per task.
        """
        self._check_matrix(matrix)
        state = self.aggregator.gramian_weighting
        dtype = torch.promote_types(matrix.dtype, torch.float32)
        # torchjd restarts w when the call's (tasks, dtype, device) differs from its key, which load_state_dict,
        # .to() and .half() do not update: continue from the current w on this call's device and dtype.
        state._w = state._w.to(device=matrix.device, dtype=dtype)
        state._state_key = (len(self.tasks), dtype, matrix.device)
        if self.pref_vector is not None:
            state.pref_vector = self.pref_vector.to(device=matrix.device, dtype=dtype)
        return super().forward(matrix, losses)
