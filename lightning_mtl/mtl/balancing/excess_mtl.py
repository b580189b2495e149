"""ExcessMTL: task weights driven by the tasks' excess risks.

He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with Excess Risks", ICML 2024,
arXiv:2402.02009.

For task k with gradient g_k, the excess risk (distance to its own optimum) is estimated by a second-order Taylor
expansion with an AdaGrad-style diagonal Hessian (Equations 6-7),

    H_k = sqrt(sum_{calls} g_k^2 + 1e-7),      E_k = sum_j g_kj^2 / H_kj,

divided by a baseline E_k^0 so that tasks of different loss scales compare (Section 3.2), and the weights on the
simplex take an exponentiated-gradient step (Equation 9):

    a_k <- a_k exp(eta E_k / E_k^0) / sum_j a_j exp(eta E_j / E_j^0),      update = sum_k a_k g_k.

The baseline is the first call's E (then not divided, as in the official code and LibMTL) or, with
``n_warmup_steps``, the average E over that many calls, during which the weights stay uniform (Appendix C.1). The
mathematics is torchjd's ``ExcessMTL``; deviations from the official code (torchjd's): the weights start at 1/K, not
1, and the update is done in log space, so a huge excess risk saturates the weights instead of overflowing.

State: the (K, D) sum of squared gradients, the weights, the baseline and the warm-up sums are torchjd's buffers
(in the ``state_dict``; created at the first call, so loading a checkpoint shapes them from it), its call counter is
this module's extra state. A matrix with another number of columns restarts the method.
"""

from __future__ import annotations

from typing import Any

import torch
import torchjd.aggregation as tjd
from torch import Tensor, nn

from lightning_mtl.mtl.balancing.registry import register_balancer
from lightning_mtl.mtl.balancing.torchjd_aggregator import TorchJDAggregator

_STATE = ("_weights", "_sq_grad_sum", "_initial_w", "_warmup_w_sum")  # torchjd's state tensors


@register_balancer("excess_mtl")
class ExcessMTL(TorchJDAggregator):
    """Exponentiated-gradient task weights from the tasks' estimated excess risks.

    The (K, D) squared-gradient sum costs as much memory as the gradient matrix itself.

    Args:
        tasks: task names, in the order of the matrix rows.
        robust_step_size: eta, the step size of the weight update (torchjd's default; LibMTL's is 1e-2).
        n_warmup_steps: calls with uniform weights that average the baseline excess risks; 0 (the official code)
            takes the first call's. The paper collects 3 epochs (3 x batches per epoch).

    Raises:
        ValueError: for a non-positive ``robust_step_size`` or a negative ``n_warmup_steps``.
    """

    def __init__(self, tasks: list[str], robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        if robust_step_size <= 0:
            raise ValueError(f"ExcessMTL robust_step_size must be positive, got {robust_step_size}")
        if n_warmup_steps < 0:
            raise ValueError(f"ExcessMTL n_warmup_steps must be >= 0, got {n_warmup_steps}")
        super().__init__(tasks, tjd.ExcessMTL(robust_step_size=robust_step_size, n_warmup_steps=n_warmup_steps))
        # the private form, present in every torch version the project supports (the public alias is newer)
        self._register_load_state_dict_pre_hook(_shape_state_like_checkpoint, with_module=True)

    def forward(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        """The ``(dims,)`` weighted update of the ``(tasks, dims)`` matrix; advances the state (``losses`` is not read).

        Raises:
            ValueError: if ``matrix`` is not a matrix with one row per task.
        """
        self._check_matrix(matrix)
        state = self.aggregator.weighting
        if state._sq_grad_sum is not None and state._sq_grad_sum.shape == matrix.shape:
            # torchjd restarts when the call's (shape, dtype, device) differs from its key, which load_state_dict,
            # .to() and .half() do not update: continue from the current state on this call's device and dtype.
            dtype = torch.promote_types(matrix.dtype, torch.float32)
            for name in _STATE:
                value = getattr(state, name)
                if value is not None:
                    setattr(state, name, value.to(device=matrix.device, dtype=dtype))
            state._state_key = (*matrix.shape, dtype, matrix.device)
        return super().forward(matrix, losses)

    def get_extra_state(self) -> dict[str, Any]:
        """The number of calls so far (torchjd keeps it as a Python int), for checkpoints."""
        return {"n_steps": self.aggregator.weighting._n_steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.aggregator.weighting._n_steps = int(state["n_steps"])


def _shape_state_like_checkpoint(module: ExcessMTL, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Before loading: give torchjd's state tensors the checkpoint's shapes, or drop the ones it does not have (a
    checkpoint from before the first call, or before the baseline was set), so a strict load fits either way."""
    state: nn.Module = module.aggregator.weighting
    for name in _STATE:
        key = f"{prefix}aggregator.weighting.{name}"
        setattr(state, name, torch.empty_like(state_dict[key]) if key in state_dict else None)
    state._state_key = None
