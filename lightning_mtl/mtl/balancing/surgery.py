"""Gradient surgery: aggregators that edit each task gradient against the others before summing them (PCGrad,
GradVac) or mask them per coordinate (GradDrop).

Each is a typed, registered :class:`~lightning_mtl.mtl.balancing.torchjd_aggregator.TorchJDAggregator`; all three are
random and draw from torch's global generator, so seed it for reproducible runs.
"""

from __future__ import annotations

import torch
import torchjd.aggregation as tjd
from torch import Tensor

from lightning_mtl.mtl.balancing.registry import register_balancer
from lightning_mtl.mtl.balancing.torchjd_aggregator import TorchJDAggregator


@register_balancer("pcgrad")
class PCGrad(TorchJDAggregator):
    """PCGrad: Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020,
    arXiv:2001.06782.

    Each g_i is projected, in a random order of the others, onto the normal plane of every g_j it conflicts with
    (g_i <- g_i - min(g_i . g_j, 0) / ||g_j||^2 g_j); the result is the **sum** of the projected gradients. The order
    uses torch's global generator (``torch.randperm``).

    Args:
        tasks: task names, in the order of the matrix rows.
    """

    def __init__(self, tasks: list[str]) -> None:
        super().__init__(tasks, tjd.PCGrad())


@register_balancer("graddrop")
class GradDrop(TorchJDAggregator):
    """GradDrop: Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: Optimizing Deep
    Multitask Models with Gradient Sign Dropout", NeurIPS 2020, arXiv:2010.06808.

    Per coordinate, keeps only the positive or only the negative task gradients, choosing positive with probability
    equal to the gradient sign purity; not a linear combination of rows, so ``weights`` stays ``None``. Random: it
    draws from torch's global generator. torchjd's purity transform ``f`` is left at its default, the identity.

    Args:
        tasks: task names, in the order of the matrix rows.
        leak: per task, the fraction of its gradient that always passes (``None``: no leak).
    """

    def __init__(self, tasks: list[str], leak: list[float] | None = None) -> None:
        super().__init__(tasks, tjd.GradDrop(), {"leak": leak})


@register_balancer("gradvac")
class GradVac(TorchJDAggregator):
    """GradVac: Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving Multi-task Optimization
    in Massively Multilingual Models", ICLR 2021, arXiv:2010.05874.

    Like PCGrad, but each pair's cosine similarity is raised to an EMA target instead of zero; the result is the sum
    of the corrected gradients. The EMA targets are state (saved in the ``state_dict``); the visiting order uses
    torch's global generator.

    Args:
        tasks: task names, in the order of the matrix rows.
        beta: EMA rate of the similarity targets (0.5: torchjd's and LibMTL's default).
        eps: added to denominators.
    """

    def __init__(self, tasks: list[str], beta: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__(tasks, tjd.GradVac(beta=beta, eps=eps))
        # torchjd creates the EMA targets at the first call; creating them now (as the first float32 call would)
        # puts them in every state_dict, so checkpoints from before and after that call load into a new instance.
        self.aggregator.gramian_weighting._ensure_state(len(self.tasks), torch.float32)

    def forward(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        state = self.aggregator.gramian_weighting
        # torchjd runs this loop on the CPU in the dtype of its state: undo moves of this module (.cuda(), .half()).
        state._phi_t = state._phi_t.to(device="cpu", dtype=state._state_key[1])
        return super().forward(matrix, losses)
