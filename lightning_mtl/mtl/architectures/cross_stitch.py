"""Cross-stitch networks.

Misra, Shrivastava, Gupta & Hebert, "Cross-stitch Networks for Multi-task Learning", CVPR 2016, arXiv:1604.03539.
Each task has its own column (a copy of the backbone, split into stages); after every stage but the last a
cross-stitch unit feeds each column a linear combination of all the columns' activations (the paper's Eq. 1, for K
tasks)::

    x'_t = sum_s alpha[t, s] * x_s

Granularity: by default one scalar ``alpha[t, s]`` per pair of columns and unit, shared by every location and channel
of the activation map, as Eq. 1 writes it (and as LibMTL does); it needs no knowledge of the stages' widths. Given
``channels``, every channel gets its own ``(K, K)`` matrix (the per-channel variant of Vandenhende et al.'s
re-implementation), for ``(B, C, ...)`` activations whose dimension 1 has those sizes.

Initialisation (the paper's design decisions and ablation): a convex combination, ``alpha[t, t] = init_self`` and
``alpha[t, s] = (1 - init_self) / (K - 1)``, so every row sums to 1; the paper uses (0.9, 0.1) for its two tasks.
``init_self=1`` starts from the identity: K independent networks.

Shared parameters: the paper calls the columns task-specific networks (and trains everything end-to-end), but once
``alpha`` leaves the diagonal every task's loss reaches every column through the units, so for gradient aggregation
the columns' stages but the last, and every unit but the last, are shared, also at the identity initialisation
(training moves alpha off it). Only column t's last stage and row t of the last unit (which feed nothing but task t's
representation) are task t's own.

Deviations from the paper: the columns are copies of one backbone (the paper initialises them from networks
fine-tuned on each task; load such weights into ``columns`` to do the same); the paper's larger (up to 10^3 x)
learning rate for the units is an optimiser setting (a parameter group of :meth:`CrossStitch.unit_parameters`), not
part of the architecture; the units sit between the given stages rather than after AlexNet's pooling and fc layers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_mtl.mtl.architectures.base import Architecture, split_stages


class CrossStitch(Architecture):
    """One column per task, mixed by a cross-stitch unit after every stage but the last.

    Every column runs once per forward; the last stage only for the tasks asked for.

    Args:
        tasks: task names (at least two).
        backbone: template split into stages with :func:`~lightning_mtl.mtl.architectures.split_stages` (an
            ``nn.Sequential`` of stages, or a module with ``stages()`` such as ``lightning_mtl.nn.Conv4``); every
            column is an independent deep copy (same initial weights). It needs at least two stages.
        init_self: initial ``alpha[t, t]``; the other entries of a row get ``(1 - init_self) / (K - 1)``, so rows sum
            to 1. ``1.0`` is the identity (independent columns), ``0.9`` the paper's best.
        channels: ``None`` for one scalar per pair of columns and unit; else the channel count (size of dimension
            1) of each stage output but the last, for one ``alpha`` matrix per channel.

    Raises:
        ValueError: fewer than two tasks or stages, ``init_self`` outside ``[0, 1]``, or ``channels`` not one positive
            integer per unit.
    """

    def __init__(
        self, tasks: list[str], backbone: nn.Module, init_self: float = 0.9, channels: list[int] | None = None,
    ) -> None:
        super().__init__(tasks)
        k = len(self.tasks)
        if k < 2:
            raise ValueError(f"cross-stitch mixes two or more task columns, got tasks={self.tasks}; "
                             f"use HardSharing for a single task")
        if not 0.0 <= init_self <= 1.0:
            raise ValueError(f"init_self must lie in [0, 1] (rows of alpha are convex combinations), got {init_self}")
        num_stages = len(split_stages(backbone))
        if num_stages < 2:
            raise ValueError(f"cross-stitch needs a backbone of at least two stages to put a unit between, got "
                             f"{num_stages}: give an nn.Sequential of stages")
        if channels is not None and (len(channels) != num_stages - 1
                                     or not all(isinstance(c, int) and c > 0 for c in channels)):
            raise ValueError(f"channels must give one positive int per cross-stitch unit ({num_stages - 1}: every "
                             f"stage output but the last), got {channels}")
        self.channels = None if channels is None else list(channels)
        # columns[t][l]: stage l of task t's column, copied from the template so the user's backbone stays untouched
        self.columns = nn.ModuleList(
            nn.ModuleList(copy.deepcopy(stage) for stage in split_stages(backbone)) for _ in self.tasks)
        eye = torch.eye(k)
        init = init_self * eye + (1.0 - init_self) / (k - 1) * (1.0 - eye)  # (K, K), rows sum to 1
        # units[u][t]: row t of unit u, one Parameter per row so the last unit's rows can belong to their tasks
        self.units = nn.ModuleList()
        for u in range(num_stages - 1):
            width = () if self.channels is None else (self.channels[u],)
            self.units.append(nn.ParameterList(
                nn.Parameter(init[t].reshape(k, *([1] * len(width))).expand(k, *width).clone()) for t in range(k)))

    def alphas(self) -> list[Tensor]:
        """Each unit's mixing matrix, ``(K, K)`` or ``(K, K, C)`` per channel: entry ``[t, s]`` weighs column ``s``
        in the input of column ``t``."""
        return [torch.stack(list(rows)) for rows in self.units]

    def unit_parameters(self) -> list[nn.Parameter]:
        """The cross-stitch parameters, e.g. for a parameter group with the paper's larger learning rate."""
        return [p for rows in self.units for p in rows]

    def _mix(self, rows: Sequence[Tensor], outs: list[Tensor]) -> list[Tensor]:
        """``x'_t = sum_s alpha[t, s] x_s`` for each given row ``alpha[t]``, ``(K,)`` or ``(K, C)``."""
        if not rows:
            return []
        if self.channels is not None and any(o.dim() < 2 or o.shape[1] != rows[0].shape[-1] for o in outs):
            raise ValueError(f"a per-channel cross-stitch unit of {rows[0].shape[-1]} channels got activations of "
                             f"shape {tuple(outs[0].shape)}: set `channels` to the stages' output sizes of dim 1")
        mixed = []
        for row in rows:
            # one weight per column (and channel), broadcast over the batch and the remaining dimensions
            w = [a if self.channels is None else a.reshape(1, -1, *[1] * (o.dim() - 2))
                 for a, o in zip(row, outs, strict=True)]
            total = w[0] * outs[0]
            for ws, o in zip(w[1:], outs[1:], strict=True):
                total = total + ws * o
            mixed.append(total)
        return mixed

    def represent(self, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        outs = [column[0](x) for column in self.columns]  # K x (B, ...): every column sees the input
        for u, rows in enumerate(self.units[:-1], start=1):
            # every task's representation depends on every column, so every column runs whatever the tasks asked
            outs = [column[u](m) for column, m in zip(self.columns, self._mix(list(rows), outs), strict=True)]
        # after the last stage nothing is mixed: only the columns of the tasks asked for need the last unit and stage
        wanted = [i for i, t in enumerate(self.tasks) if t in tasks]
        mixed = self._mix([self.units[-1][i] for i in wanted], outs)
        return {self.tasks[i]: self.columns[i][-1](m) for i, m in zip(wanted, mixed, strict=True)}

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        own = {}
        for i, t in enumerate(self.tasks):
            params = [p for p in self.columns[i][-1].parameters() if p.requires_grad]
            own[t] = params + ([self.units[-1][i]] if self.units[-1][i].requires_grad else [])
        return own
