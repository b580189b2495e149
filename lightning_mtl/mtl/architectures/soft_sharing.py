"""Soft parameter sharing.

Duong, Cohn, Bird & Cook, "Low Resource Dependency Parsing: Cross-lingual Parameter Sharing in a Neural Network
Parser", ACL 2015. Each task has its own network; corresponding parameters are tied softly by an L2 penalty
lambda * sum_{i<j} ||theta_i - theta_j||^2, computed as lambda * K * sum_i ||theta_i - mean_j theta_j||^2 (the same
quantity in O(K)). No parameter is shared, so gradient aggregation has nothing to act on: use a loss weighting.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_mtl.mtl.architectures.base import Architecture


class SoftSharing(Architecture):
    """One copy of ``backbone`` per task, tied by an L2 penalty between the copies.

    Args:
        tasks: task names.
        backbone: template; each task gets an independent deep copy (same initialisation).
        weight: lambda, the weight of the penalty.
    """

    def __init__(self, tasks: list[str], backbone: nn.Module, weight: float = 1e-3) -> None:
        super().__init__(tasks)
        if weight < 0:
            raise ValueError(f"soft-sharing weight must be >= 0, got {weight}")
        self.backbones = nn.ModuleDict({task: copy.deepcopy(backbone) for task in self.tasks})
        self.weight = weight

    def represent(self, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        return {t: self.backbones[t](x) for t in tasks}

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {t: [p for p in b.parameters() if p.requires_grad] for t, b in self.backbones.items()}

    def penalty(self) -> Tensor:
        copies = list(self.backbones.values())
        k = len(copies)
        total = torch.zeros((), device=next(self.parameters()).device)
        for params in zip(*(c.parameters() for c in copies), strict=True):
            stacked = torch.stack(params)  # (K, *shape)
            total = total + (stacked - stacked.mean(0)).pow(2).sum()
        return self.weight * k * total
