"""MMoE: Multi-gate Mixture-of-Experts.

Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018 (doi:10.1145/3219819.3220007). ``n`` experts f_1..f_n are shared by every task; task t
reads the mixture

    y_t(x) = sum_i g_t(x)_i f_i(x),    g_t(x) = softmax(W_t x)   (x flattened),

so each task has its own gate W_t (a task parameter) and the experts are shared. The experts run once per input and
may return any shape ``(B, *S)``: ``(B, D)`` features or ``(B, C, H, W)`` maps. As in the paper and LibMTL, the gate is
linear in the flattened input.

The helpers :func:`expert_copies`, :func:`softmax_gate` and :func:`mix` are shared with CGC, PLE and DSelect-k.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_mtl.mtl.architectures.base import Architecture


def expert_copies(template: nn.Module, n: int, reinit: bool = True) -> nn.ModuleList:
    """``n`` deep copies of ``template``.

    With ``reinit``, every submodule of each copy that defines ``reset_parameters()`` (``nn.Linear``, ``nn.Conv2d``,
    ``nn.BatchNorm2d``, ...) is re-initialised, so each copy gets its own random draw: experts that start equal would
    stay equal wherever the gates weigh them alike. Parameters of modules without ``reset_parameters()`` keep the
    template's values. Without ``reinit`` every copy starts from the template's values (e.g. a pre-trained network).
    """
    copies = nn.ModuleList(copy.deepcopy(template) for _ in range(n))
    if reinit:
        for module in copies.modules():
            if module is not copies and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    return copies


def softmax_gate(num_experts: int, in_features: int | None = None) -> nn.Sequential:
    """``x -> softmax(W flatten(x) + b)``: ``(B, *S) -> (B, num_experts)`` weights on the simplex.

    ``in_features=None`` sizes ``W`` at the first call (``nn.LazyLinear``).
    """
    linear = nn.Linear(in_features, num_experts) if in_features is not None else nn.LazyLinear(num_experts)
    return nn.Sequential(nn.Flatten(), linear, nn.Softmax(dim=-1))


def mix(outputs: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``sum_i weights[:, i] * outputs[i]``: ``n`` tensors ``(B, *S)`` mixed by ``(B, n)`` (or ``(n,)``) weights."""
    stacked = torch.stack(list(outputs), dim=1)  # (B, n, *S)
    if weights.dim() == 1:
        weights = weights.expand(stacked.shape[0], -1)  # one static mixture for every example
    return torch.einsum("bn,bn...->b...", weights.to(stacked.dtype), stacked)  # (B, *S)


def gate_features(input_shape: Sequence[int] | None) -> int | None:
    """The number of features of one flattened input of ``input_shape`` (``None``: unknown, the gates are lazy).

    Raises:
        ValueError: an empty shape or a non-positive size.
    """
    if input_shape is None:
        return None
    if len(input_shape) == 0 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be one input's shape, e.g. [1, 28, 28], got {list(input_shape)}")
    return math.prod(int(s) for s in input_shape)


class MMoE(Architecture):
    """Shared experts, mixed for each task by that task's softmax gate on the flattened input.

    Args:
        tasks: task names.
        expert: template of an expert, ``(B, ...) -> (B, *S)``; the experts are deep copies of it.
        num_experts: number of shared experts (1 gives hard sharing on one expert).
        input_shape: one input's shape (e.g. ``[1, 28, 28]``), to size the gates at construction; ``None`` sizes them
            at the first forward pass.
        reinit: give each expert its own random initialisation (``reset_parameters()`` of every submodule that has
            one); ``False`` starts every expert from the template's values.

    Raises:
        ValueError: ``num_experts < 1`` or a bad ``input_shape``.
    """

    def __init__(
        self, tasks: list[str], expert: nn.Module, num_experts: int = 4, input_shape: tuple[int, ...] | None = None,
        reinit: bool = True,
    ) -> None:
        super().__init__(tasks)
        if num_experts < 1:
            raise ValueError(f"MMoE needs num_experts >= 1, got {num_experts}")
        self.experts = expert_copies(expert, num_experts, reinit)
        features = gate_features(input_shape)
        self.gates = nn.ModuleDict({t: softmax_gate(num_experts, features) for t in self.tasks})

    def represent(self, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        outputs = [e(x) for e in self.experts]  # each expert once, whatever the number of tasks
        return {t: mix(outputs, self.gates[t](x)) for t in tasks}

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {t: [p for p in g.parameters() if p.requires_grad] for t, g in self.gates.items()}
