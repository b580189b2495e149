"""Soft parameter sharing.

Duong, Cohn, Bird & Cook, "Low Resource Dependency Parsing: Cross-lingual Parameter Sharing in a Neural Network
Parser", ACL 2015. Each task has its own network; corresponding parameters are tied softly by an L2 penalty
lambda * sum_{i<j} ||theta_i - theta_j||^2, computed as lambda * K * sum_i ||theta_i - mean_j theta_j||^2 (the same
quantity in O(K)).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class SoftSharing(nn.Module):
    """One copy of ``backbone`` per task, each followed by its head, with an L2 penalty between the copies.

    Args:
        backbone: template; each task gets an independent deep copy (same initialisation).
        heads: one module per task.
        weight: lambda, the weight of the penalty.
    """

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], weight: float = 1e-3) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"soft-sharing weight must be >= 0, got {weight}")
        self.backbones = nn.ModuleDict({task: copy.deepcopy(backbone) for task in heads})
        self.heads = nn.ModuleDict(heads)
        self.weight = weight

    def shared_parameters(self) -> list[nn.Parameter]:
        return []  # nothing is shared hard: gradient aggregation has no common parameters to act on

    def task_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def representation(self, x: Tensor, task: str | None = None) -> Tensor:
        if task is None:
            raise ValueError("soft sharing has one representation per task: pass the task name")
        return self.backbones[task](x).flatten(1)

    def head(self, task: str, z: Tensor) -> Tensor:
        return self.heads[task](z)

    def penalty(self) -> Tensor:
        copies = list(self.backbones.values())
        k = len(copies)
        total = torch.zeros((), device=next(self.parameters()).device)
        for params in zip(*(c.parameters() for c in copies), strict=True):
            stacked = torch.stack(params)  # (K, *shape)
            total = total + (stacked - stacked.mean(0)).pow(2).sum()
        return self.weight * k * total
