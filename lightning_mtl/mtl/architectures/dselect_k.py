"""DSelect-k: differentiable selection of k experts.

Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong & Chi, "DSelect-k: Differentiable Selection in the
Mixture of Experts with Applications to Multi-Task Learning", NeurIPS 2021, arXiv:2106.03760. ``n`` shared experts
(run once per input); each task mixes them with its own gate made of k "single-expert selectors". Selector i has
m = ceil(log2 n) binary-encoding logits z_i and puts on expert l (with binary code b(l), most significant bit first)

    r(z_i)_l = prod_j [ S(z_ij) if b(l)_j = 1 else 1 - S(z_ij) ],
    S(t) = 0 (t <= -gamma/2),  -2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2 (|t| < gamma/2),  1 (t >= gamma/2),

a cubic smooth-step, C1 at +-gamma/2. The gate's weights are q = sum_i softmax(w)_i r(z_i): they sum to 1 when n is a
power of 2; once every S(z_ij) is 0 or 1, each selector picks one expert and at most k experts have nonzero weight.
Static gates (the paper's task-only conditioning) learn z and w per task; per-example gates compute them linearly
from the flattened input. The gate of task t is task t's parameter.

:meth:`DSelectK.penalty` is the official code's regularisation: ``entropy_weight * sum -r log(r + 1e-6)`` over the
selectors (which drives each one to a single expert; the official code adds it only when given a regulariser, whose
default weight is 1e-6), plus, when n is not a power of 2, ``sum 1 / sum_l r(z_i)_l`` so that no selector settles on
a code beyond the last expert. Initialisation as in the official code: z ~ U(-gamma/100, gamma/100), w ~ U(-0.05, 0.05)
(also the per-example gates' weights and biases).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_mtl.mtl.architectures.base import Architecture
from lightning_mtl.mtl.architectures.mmoe import expert_copies, gate_features, mix

_EPS = 1e-6  # the official code's, inside the entropy's log


def smooth_step(t: Tensor, gamma: float = 1.0) -> Tensor:
    """The cubic smooth-step S(t): 0 below -gamma/2, 1 above gamma/2, C1 everywhere."""
    cubic = -2 / gamma**3 * t**3 + 3 / (2 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


def selector_outputs(z: Tensor, codes: Tensor, gamma: float = 1.0) -> Tensor:
    """Single-expert selectors' weights: binary logits ``(..., k, m)`` and codes ``(n, m)`` -> ``(..., k, n)``."""
    s = smooth_step(z, gamma).unsqueeze(-2)  # (..., k, 1, m)
    return torch.where(codes, s, 1 - s).prod(-1)  # (..., k, n)


class DSelectKGate(nn.Module):
    """One task's gate: k selectors over ``num_experts`` experts, static or computed from each input.

    Args:
        num_experts: n, the number of experts.
        k: the number of selectors.
        gamma: width of the smooth-step's cubic region.
        in_features: ``None`` for a static gate; else the flattened input size of a per-example gate.
    """

    def __init__(self, num_experts: int, k: int, gamma: float, in_features: int | None = None) -> None:
        super().__init__()
        self.k, self.gamma, self.m = k, gamma, math.ceil(math.log2(num_experts))
        self.per_example = in_features is not None
        codes = [[(i >> (self.m - 1 - j)) & 1 for j in range(self.m)] for i in range(num_experts)]
        self.register_buffer("codes", torch.tensor(codes, dtype=torch.bool), persistent=False)  # (n, m)
        if not self.per_example:
            self.z, self.w = nn.Parameter(torch.empty(k, self.m)), nn.Parameter(torch.empty(k))
        else:
            self.z, self.w = nn.Linear(in_features, k * self.m), nn.Linear(in_features, k)
        for name, p in self.named_parameters():
            bound = gamma / 100 if name.startswith("z") else 0.05
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(expert weights, selector outputs)``: ``(n,)`` and ``(k, n)`` static (``x`` unused), ``(B, n)`` and
        ``(B, k, n)`` per example."""
        if not self.per_example:
            r = selector_outputs(self.z, self.codes, self.gamma)  # (k, n)
            return torch.softmax(self.w, 0) @ r, r
        flat = x.flatten(1)
        r = selector_outputs(self.z(flat).view(-1, self.k, self.m), self.codes, self.gamma)  # (B, k, n)
        return torch.einsum("bk,bkn->bn", torch.softmax(self.w(flat), -1), r), r


class DSelectK(Architecture):
    """Shared experts, mixed for each task by a DSelect-k gate that selects k of them.

    Args:
        tasks: task names.
        expert: template of an expert, ``(B, ...) -> (B, *S)``; the experts are deep copies of it.
        num_experts: n, the number of shared experts (at least 2).
        k: selectors per task: at most k experts are used by each task once its gate has converged.
        gamma: width of the smooth-step's cubic region (the paper's gamma).
        per_example: compute each gate from the input (the paper's per-example conditioning) instead of learning one
            static gate per task.
        entropy_weight: weight of the selectors' entropy in :meth:`penalty` (0: none).
        input_shape: one input's shape (e.g. ``[1, 28, 28]``): per-example gates read the flattened input and need it.
        reinit: give each expert its own random initialisation (``reset_parameters()`` of every submodule that has
            one); ``False`` starts every expert from the template's values.

    Raises:
        ValueError: ``num_experts < 2``, ``k`` outside ``1..num_experts``, ``gamma <= 0``, ``entropy_weight < 0``,
            per-example gates without ``input_shape`` or a bad ``input_shape``.
    """

    def __init__(
        self, tasks: list[str], expert: nn.Module, num_experts: int = 4, k: int = 2, gamma: float = 1.0,
        per_example: bool = False, entropy_weight: float = 0.0, input_shape: tuple[int, ...] | None = None,
        reinit: bool = True,
    ) -> None:
        super().__init__(tasks)
        if num_experts < 2:
            raise ValueError(f"DSelect-k selects among num_experts >= 2 experts, got {num_experts} (one expert: use "
                             f"HardSharing)")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k (selectors per task) must be in 1..num_experts={num_experts}, got {k}")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight}")
        features = gate_features(input_shape)
        if per_example and features is None:
            raise ValueError("per-example DSelect-k gates read the flattened input: set input_shape, e.g. [1, 28, 28]")
        self.experts = expert_copies(expert, num_experts, reinit)
        self.gates = nn.ModuleDict({t: DSelectKGate(num_experts, k, gamma, features if per_example else None)
                                    for t in self.tasks})
        self.entropy_weight = entropy_weight
        self.power_of_2 = num_experts == 2 ** math.ceil(math.log2(num_experts))
        self._regularised = entropy_weight > 0 or not self.power_of_2
        self._selectors: dict[str, Tensor] = {}  # per-example selectors of the last training pass, for penalty()

    def represent(self, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        outputs = [e(x) for e in self.experts]  # each expert once, whatever the number of tasks
        out = {}
        for t in tasks:
            weights, r = self.gates[t](x)
            if self.gates[t].per_example and self.training and torch.is_grad_enabled() and self._regularised:
                self._selectors[t] = r
            out[t] = mix(outputs, weights)
        return out

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {t: [p for p in g.parameters() if p.requires_grad] for t, g in self.gates.items()}

    def penalty(self) -> Tensor | None:
        """The entropy and unreachable-code terms of the selectors (static gates: at the current parameters;
        per-example gates: of the last training forward pass, consumed by this call), or ``None`` when both are off."""
        if not self._regularised:
            return None
        selectors = [g(None)[1] for g in self.gates.values() if not g.per_example]
        selectors += list(self._selectors.values())
        self._selectors = {}  # the graph of the pass it came from is not kept beyond this step
        if not selectors:
            return None
        # per-example selectors (B, k, n) count as a mean over the batch, so that a rank's penalty is the global
        # batch's on average and DDP's averaging over ranks gives the single-process value
        per = [1.0 / r.shape[0] if r.ndim == 3 else 1.0 for r in selectors]
        total = sum(w * self.entropy_weight * -(r * torch.log(r + _EPS)).sum() for w, r in zip(per, selectors,
                                                                                                 strict=True))
        if not self.power_of_2:
            total = total + sum(w * (1 / r.sum(-1)).sum() for w, r in zip(per, selectors, strict=True))
        return total
