"""Gradient aggregators that solve for task weights: the mean baseline, MGDA, CAGrad, Nash-MTL, IMTL-G,
Aligned-MTL and UPGrad.

Each is a typed, registered :class:`~lightning_mtl.mtl.balancing.torchjd_aggregator.TorchJDAggregator`: the
mathematics is torchjd's, the returned direction is ``weights @ matrix`` and ``self.weights`` holds those weights.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import quadprog
import torch
import torchjd.aggregation as tjd
from torch import Tensor

from lightning_mtl.mtl.balancing.registry import register_balancer
from lightning_mtl.mtl.balancing.torchjd_aggregator import TorchJDAggregator


@register_balancer("mean")
class MeanAggregator(TorchJDAggregator):
    """The average of the task gradients: the baseline for every aggregator (weights ``1/K``).

    Args:
        tasks: task names, in the order of the matrix rows.
    """

    def __init__(self, tasks: list[str]) -> None:
        super().__init__(tasks, tjd.Mean())


@register_balancer("mgda")
class MGDA(TorchJDAggregator):
    """MGDA: Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization", C. R. Math.
    2012; Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018, arXiv:1810.04650.

    The minimum-norm point of the convex hull of the task gradients, sum_k a_k g_k with a on the simplex (unscaled):
    a = argmin_{a in simplex} a^T (G G^T) a. By default the K-variable QP on the Gramian is solved exactly
    (Goldfarb-Idnani, ``quadprog``; microseconds for tens of tasks); ``solver="frank_wolfe"`` runs torchjd's
    Frank-Wolfe iterations instead, which converge slowly when the solution lies on a face of the simplex: with 100
    iterations its weights were 12% from the exact point on a 3-task case where LibMTL's solver (Sener & Koltun's,
    with exact line searches) is within 1e-5 (``tests/mtl/balancing/test_libmtl_reference.py``).

    Args:
        tasks: task names, in the order of the matrix rows.
        solver: ``"qp"`` (exact) or ``"frank_wolfe"`` (torchjd's).
        epsilon: Frank-Wolfe stops when its step size falls below this.
        max_iters: maximum Frank-Wolfe iterations.
    """

    def __init__(
        self, tasks: list[str], solver: Literal["qp", "frank_wolfe"] = "qp", epsilon: float = 1e-3, max_iters: int = 100
    ) -> None:
        if solver not in ("qp", "frank_wolfe"):
            raise ValueError(f"MGDA solver must be 'qp' or 'frank_wolfe', got {solver!r}")
        super().__init__(tasks, tjd.MGDA(epsilon=epsilon, max_iters=max_iters))
        self.solver = solver

    def forward(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        if self.solver == "frank_wolfe":
            return super().forward(matrix, losses)
        self._check_matrix(matrix)
        dtype = torch.promote_types(matrix.dtype, torch.float32)  # as every aggregator: half precision in float32
        weights = min_norm_weights(matrix).to(device=matrix.device, dtype=dtype)
        self.weights = weights
        return (weights @ matrix.to(dtype)).to(matrix.dtype)


def min_norm_weights(matrix: Tensor) -> Tensor:
    """``argmin_{a in simplex} ||a^T matrix||^2`` for a ``(K, D)`` matrix, solved exactly on the Gramian.

    The ``(K, K)`` Gramian is computed in the matrix's precision (at least float32, as torchjd and LibMTL do: a
    float64 copy of a ``(K, D)`` matrix of a million parameters cost more than the rest of the step), then solved in
    float64: made symmetric positive semi-definite (eigenvalues clamped at 0, removing the product's rounding),
    scaled by its trace (the solution does not change) and given a ridge of 1e-12 so that the QP is strictly convex
    when gradients are linearly dependent.
    """
    m = matrix.to(torch.promote_types(matrix.dtype, torch.float32))
    gram = (m @ m.T).double().cpu()  # (K, K)
    gram = (gram + gram.T) / 2
    values, vectors = torch.linalg.eigh(gram)
    gram = (vectors * values.clamp_min(0)) @ vectors.T
    k = gram.shape[0]
    scale = float(gram.trace()) / k
    if not scale > 0:  # every gradient is zero: any point is optimal
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    g = (gram / scale).numpy() + 1e-12 * np.eye(k)
    constraints = np.concatenate([np.ones((k, 1)), np.eye(k)], axis=1)  # sum a = 1, then a >= 0
    a = quadprog.solve_qp(g, np.zeros(k), constraints, np.concatenate([[1.0], np.zeros(k)]), meq=1)[0]
    a = np.clip(a, 0.0, None)
    return torch.from_numpy(a / a.sum())


@register_balancer("cagrad")
class CAGrad(TorchJDAggregator):
    """CAGrad: Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021, arXiv:2110.14048.

    The direction maximising the worst task improvement within a ball of radius c ||g_0|| around the mean gradient
    g_0 (torchjd solves the dual with cvxpy/CLARABEL on the normalised Gramian). The direction g_0 + lambda g_w is
    returned unscaled: the official code's default divides it by 1 + c^2.

    Args:
        tasks: task names, in the order of the matrix rows.
        c: radius scale of the ball; 0 is the mean gradient (the paper uses 0.4 on NYUv2 and Cityscapes).
        norm_eps: guards the normalisation of the Gramian against division by zero.
    """

    def __init__(self, tasks: list[str], c: float = 0.4, norm_eps: float = 1e-4) -> None:
        super().__init__(tasks, tjd.CAGrad(c=c, norm_eps=norm_eps))


@register_balancer("nash_mtl")
class NashMTL(TorchJDAggregator):
    """Nash-MTL: Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a
    Bargaining Game", ICML 2022, arXiv:2202.01017.

    Weights a solving (M M^T) a = 1/a for the (K, D) matrix M (the Nash bargaining solution), found by the paper's
    sequence of convex problems (cvxpy/ECOS). Stateful: the solver's warm start lives in torchjd as numpy arrays,
    outside the ``state_dict``, so a resumed run restarts it from equal weights.

    Args:
        tasks: task names, in the order of the matrix rows.
        max_norm: the update's norm is clipped to this; 0 disables clipping.
        update_weights_every: solve for new weights every this many calls, reusing the last ones in between.
        optim_niter: iterations of the sequence of convex problems.
    """

    def __init__(
        self, tasks: list[str], max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20
    ) -> None:
        aggregator = tjd.NashMTL(
            n_tasks=len(tasks), max_norm=max_norm, update_weights_every=update_weights_every, optim_niter=optim_niter
        )
        super().__init__(tasks, aggregator)


@register_balancer("imtl_g")
class IMTLG(TorchJDAggregator):
    """IMTL-G: Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021;
    torchjd's generalisation to linearly dependent gradients (arXiv:2406.16232).

    The combination whose projection onto every unit task gradient is equal: weights proportional to
    pinv(G G^T) ||g||, normalised to sum to 1.

    Args:
        tasks: task names, in the order of the matrix rows.
    """

    def __init__(self, tasks: list[str]) -> None:
        super().__init__(tasks, tjd.IMTLG())


@register_balancer("aligned_mtl")
class AlignedMTL(TorchJDAggregator):
    """Aligned-MTL: Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023, arXiv:2305.19000.

    Aligns the principal components of the gradient matrix (condition number 1), then combines the aligned
    gradients with ``pref_vector``.

    Args:
        tasks: task names, in the order of the matrix rows.
        pref_vector: one preference weight per task; ``None`` gives ``1/K`` each.
        scale_mode: eigenvalue that rescales the aligned gradients: ``"min"``, ``"median"``, or ``"rmse"`` (the
            mean, as in the original implementation).
    """

    def __init__(
        self,
        tasks: list[str],
        pref_vector: list[float] | None = None,
        scale_mode: Literal["min", "median", "rmse"] = "min",
    ) -> None:
        super().__init__(tasks, tjd.AlignedMTL(scale_mode=scale_mode), {"pref_vector": pref_vector})


@register_balancer("upgrad")
class UPGrad(TorchJDAggregator):
    """UPGrad: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, arXiv:2406.16232.

    Projects every task gradient onto the dual cone of all of them (no task is made worse to first order) and
    averages the projections with ``pref_vector``; the projection uses the quadprog solver.

    Args:
        tasks: task names, in the order of the matrix rows.
        pref_vector: one preference weight per task; ``None`` gives ``1/K`` each.
    """

    def __init__(self, tasks: list[str], pref_vector: list[float] | None = None) -> None:
        super().__init__(tasks, tjd.UPGrad(), {"pref_vector": pref_vector})
