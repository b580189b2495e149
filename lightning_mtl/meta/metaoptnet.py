"""MetaOptNet: a multi-class SVM head solved as a differentiable quadratic program inside every episode.

Lee, Maji, Ravichandran & Soatto, "Meta-Learning with Differentiable Convex Optimization", CVPR 2019,
arXiv:1904.03758 (the SVM head, MetaOptNet-SVM; official code ``MetaOptNetHead_SVM_CS``).

The base learner is the Crammer & Singer multi-class SVM ("On the Algorithmic Implementation of Multiclass
Kernel-based Vector Machines", JMLR 2001) on the support embeddings ``x_i`` (``n`` of them, labels ``y_i``), with
one weight vector ``w_k`` per class and no bias::

    min_{w, xi}  1/2 sum_k ||w_k||^2 + C sum_i xi_i
    s.t.         w_{y_i}^T x_i - w_k^T x_i >= 1 - delta(y_i, k) - xi_i      for all i, k

(``k = y_i`` gives ``xi_i >= 0``). With multipliers ``eta_ik >= 0``, stationarity gives ``sum_k eta_ik = C`` and
``w_k = sum_i alpha_ik x_i`` for ``alpha_ik = C y_ik - eta_ik`` (``y`` one-hot), hence the dual solved here, a QP in
``alpha`` (``n x ways``)::

    min_alpha  1/2 sum_k alpha_k^T K alpha_k - sum_i alpha_{i, y_i}
    s.t.       alpha_ik <= C y_ik,   sum_k alpha_ik = 0                           K = X X^T (linear kernel)

Flattened row-major (``z = vec(alpha)``, index ``i * ways + k``) it is ``min 1/2 z^T Q z + p^T z`` with
``Q = K (x) I_ways + ridge * I``, ``p = -vec(Y)``, ``G = I``, ``h = C vec(Y)``, ``A = I_n (x) 1_ways^T``, ``b = 0``
(``(x)``: Kronecker product), exactly the official code's QP. The ``ridge * I`` term is the official code's
``block_kernel_matrix += 1.0 * I`` ("seems to help avoid PSD error from the QP solver"): it makes ``Q`` positive
definite when ``K`` is singular (more support examples than feature dimensions, or duplicates). It is the dual of the
same SVM in which each support example gets a private extra feature of value ``sqrt(ridge)``, which no query has: the
prediction rule below is unchanged, but ``alpha`` is that of a softer margin (a squared-hinge-like slack, the softer
the larger the ridge relative to ``K``). A query ``x_q`` gets the primal scores ``W^T x_q`` with ``W = X^T alpha``,
scaled by a learnable ``scale`` (the official ``ClassificationHead``)::

    logits_qk = scale * w_k^T x_q = scale * sum_i alpha_ik <x_i, x_q>

The QP is solved by :func:`~lightning_mtl.meta.qp.solve_qp` (batched over the meta-batch, float64, outside autocast)
and differentiated through its KKT conditions, so the query cross-entropy trains the backbone through the kernel
``K`` and the query kernel, and trains ``scale``; ``C`` and ``ridge`` stay fixed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl.batches import Episode
from lightning_mtl.checkpointing import save_hyperparameters
from lightning_mtl.meta._checks import class_one_hot
from lightning_mtl.meta.base import EpisodicModule
from lightning_mtl.meta.qp import solve_qp
from lightning_mtl.mtl.balancing import BalancerCallable
from lightning_mtl.nn import Conv4


def svm_dual_coefficients(
    support: Tensor, labels: Tensor, ways: int, C: float, ridge: float = 1.0, max_iter: int = 15, tol: float = 1e-8
) -> Tensor:
    """The Crammer-Singer dual solution ``alpha`` of each episode's support set; the primal weights are ``X^T alpha``.

    Args:
        support: ``(B, S, D)`` support embeddings; the QP is solved in their dtype (use float64).
        labels: ``(B, S)`` labels in ``0 .. ways - 1``.
        ways: classes per episode.
        C: SVM cost of the slack variables.
        ridge: added to the diagonal of the dual's quadratic term (see the module docstring).
        max_iter: most interior point iterations.
        tol: residual at which a QP stops (see :func:`~lightning_mtl.meta.qp.solve_qp`).

    Returns:
        ``(B, S, ways)`` dual variables ``alpha``, differentiable w.r.t. ``support``.
    """
    b, n, _ = support.shape
    eye_w = torch.eye(ways, dtype=support.dtype, device=support.device)
    y = class_one_hot(labels, ways, support.dtype).flatten(1)  # (B, S*W)
    kernel = support @ support.transpose(1, 2)  # (B, S, S)
    # Q[(i, k), (j, l)] = K_ij delta_kl: the Kronecker product K (x) I_ways, plus the ridge
    q = (kernel[:, :, None, :, None] * eye_w[:, None, :]).reshape(b, n * ways, n * ways)
    q = q + ridge * torch.eye(n * ways, dtype=q.dtype, device=q.device)
    # A[i, (j, k)] = delta_ij: sum_k alpha_ik = 0 for each support example
    a = torch.eye(n, dtype=q.dtype, device=q.device).repeat_interleave(ways, 1)  # (S, S*W)
    # G = I (None): the box alpha_ik <= C y_ik
    alpha = solve_qp(q, -y, None, C * y, a, q.new_zeros(n), max_iter=max_iter, tol=tol)  # (B, S*W)
    return alpha.view(b, n, ways)


def svm_logits(
    support: Tensor, labels: Tensor, query: Tensor, ways: int, C: float, ridge: float = 1.0, max_iter: int = 15,
    tol: float = 1e-8,
) -> Tensor:
    """Unscaled scores ``(B, Q, ways)`` of ``query`` ``(B, Q, D)`` under the Crammer-Singer SVM of the support set,
    ``sum_i alpha_ik <x_i, x_q>``; the other arguments as in :func:`svm_dual_coefficients`."""
    alpha = svm_dual_coefficients(support, labels, ways, C, ridge, max_iter, tol)
    return (query @ support.transpose(1, 2)) @ alpha  # (B, Q, S) @ (B, S, ways)


class MetaOptNet(EpisodicModule):
    """Backbone + differentiable Crammer-Singer SVM head (MetaOptNet-SVM).

    Args:
        backbone: embedding network ``(N, C, H, W) -> (N, ...)``, flattened to ``(N, D)``; default :class:`Conv4`.
            The paper's Mini-ImageNet model is ResNet-12 without average pooling (16000-d embeddings).
        C: SVM cost of the slack variables (the paper: 0.1); smaller means a softer margin.
        init_scale: initial value of the learnable logit scale (the official code: 1).
        learn_scale: learn the scale (else it stays ``init_scale``).
        kernel_ridge: ``ridge`` added to the diagonal of the dual's quadratic term (the official code: 1.0; see the
            module docstring); keep it > 0 unless the support embeddings are linearly independent.
        solver_iters: most interior point iterations per QP in training and validation (the official code: 15).
        test_solver_iters: iterations at test; ``None`` uses ``solver_iters`` (the official test script: 3).
        solver_tol: residual at which a QP stops iterating (see :func:`~lightning_mtl.meta.qp.solve_qp`); 0 always
            runs all iterations and never synchronises the device.
        label_smoothing: training loss with smoothed targets as the official code's ``--eps`` (the true class gets
            ``1 - eps``, every other ``eps / (ways - 1)``; the official README uses 0.1 on Mini-ImageNet); validation
            and test losses stay plain cross-entropy.
        optimizer: optimizer factory; default Adam, lr 1e-3 (the paper: SGD, see the Mini-ImageNet recipe).
        lr_scheduler: scheduler factory, stepped every meta-batch.
        meta_balancer: gradient aggregator of the per-episode outer gradients of a meta-batch (``pcgrad``, ``mgda``,
            ``upgrad``, ...; see :class:`~lightning_mtl.meta.EpisodicModule`); ``None``: their mean.
        diagnostics_every: with a ``meta_balancer``, log the episode-gradient conflict (``diag/*``) every this many
            steps.

    Raises:
        ValueError: a setting out of range, or (in :meth:`forward`) a backbone whose output is not one embedding per
            image.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        C: float = 0.1,
        init_scale: float = 1.0,
        learn_scale: bool = True,
        kernel_ridge: float = 1.0,
        solver_iters: int = 15,
        test_solver_iters: int | None = None,
        solver_tol: float = 1e-8,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        meta_balancer: str | BalancerCallable | None = None,
        diagnostics_every: int = 100,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, meta_balancer=meta_balancer,
                         diagnostics_every=diagnostics_every)
        if C <= 0:
            raise ValueError(f"MetaOptNet C must be positive (the paper uses 0.1), got {C}")
        if kernel_ridge < 0:
            raise ValueError(f"MetaOptNet kernel_ridge must be >= 0 (the official code uses 1.0), got {kernel_ridge}")
        if solver_iters < 1 or (test_solver_iters is not None and test_solver_iters < 1):
            raise ValueError(f"MetaOptNet needs solver_iters >= 1 and test_solver_iters >= 1 or None, got "
                             f"{solver_iters} and {test_solver_iters}")
        if solver_tol < 0 or not 0 <= label_smoothing < 1:
            raise ValueError(f"MetaOptNet needs solver_tol >= 0 and 0 <= label_smoothing < 1, got {solver_tol} and "
                             f"{label_smoothing}")
        save_hyperparameters(self, ["backbone", "optimizer", "lr_scheduler"])
        self.backbone = backbone if backbone is not None else Conv4()
        self.scale = nn.Parameter(torch.tensor(float(init_scale)), requires_grad=learn_scale)

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings ``(N, D)`` of images ``(N, C, H, W)``."""
        z = self.backbone(self.images(x))
        if not isinstance(z, Tensor) or z.ndim < 2 or z.shape[0] != x.shape[0]:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"MetaOptNet needs a backbone mapping {x.shape[0]} images to {x.shape[0]} embeddings (N, D) or feature "
                f"maps (N, C, h, w); got {shape}. Pass a feature extractor without a classifier or pooling over the "
                "batch, e.g. lightning_mtl.nn.Conv4 or ResNet12."
            )
        return z.flatten(1)

    def episode_logits(self, episode: Episode, stage: str) -> Tensor:
        hp = self.hparams
        support, query = self.embed_episode(episode)
        iters = hp.test_solver_iters if stage == "test" and hp.test_solver_iters is not None else hp.solver_iters
        # float64 outside autocast: the interior point method drives lam / s over ~20 orders of magnitude
        with torch.autocast(support.device.type, enabled=False):
            scores = svm_logits(support.double(), episode.support_y, query.double(), episode.ways, hp.C,
                                hp.kernel_ridge, iters, hp.solver_tol)
        return self.scale * scores.float()

    def episode_loss(self, logits: Tensor, query_y: Tensor) -> Tensor:
        """Cross-entropy; in training with the official code's label smoothing when ``label_smoothing > 0``."""
        eps, ways = self.hparams.label_smoothing, logits.shape[-1]
        if not self.training or eps == 0:
            return super().episode_loss(logits, query_y)
        onehot = class_one_hot(query_y, ways, torch.float32)
        target = onehot * (1 - eps) + (1 - onehot) * eps / (ways - 1)
        return -(target * F.log_softmax(logits.float(), -1)).sum(-1).mean()
