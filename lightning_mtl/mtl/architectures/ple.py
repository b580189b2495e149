"""PLE: Progressive Layered Extraction.

Tang, Liu, Zhao & Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for
Personalized Recommendations", RecSys 2020 (doi:10.1145/3383313.3412236), Section 4.3. The backbone is split into
stages (:func:`~lightning_mtl.mtl.architectures.base.split_stages`); level j holds copies of stage j: shared experts
and experts of each task. With x^s_j and x^t_j the shared and task t inputs of level j (x^s_0 = x^t_0 = x),

    x^t_{j+1} = sum_i g^t_j(x^t_j)_i S^t_j_i,   S^t_j = [shared experts(x^s_j), task t's experts(x^t_j)]
    x^s_{j+1} = sum_i g^s_j(x^s_j)_i S^s_j_i,   S^s_j = [shared experts(x^s_j), every task's experts(x^t_j)]

where each gate g(z) = softmax(W flatten(z)) reads its branch's input of the level. The last level has no shared
gate (it is CGC, :mod:`.cgc`) and task t's representation is x^t_L. The shared experts of a level run once per input.

Shared and task parameters, in the gradient sense. Below the last level, task s's experts feed the shared gate, whose
output reaches every task (through the next levels' shared experts), so every task's loss depends on them: they are
shared, and gradient aggregation acts on them. Only task t's loss depends on the last level's task-t experts and
gate, and on task t's gate of the level below the last (its output x^t_{L-1} is read by nothing but task t's last
level): these are task t's parameters. The shared gates and every shared expert are shared.

LibMTL's PLE (which has no shared gate: each task's gates mix the shared experts run on that task's branch) differs;
this follows the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_mtl.mtl.architectures.base import Architecture, split_stages
from lightning_mtl.mtl.architectures.cgc import ExtractionLayer, check_expert_counts
from lightning_mtl.mtl.architectures.mmoe import gate_features


class PLE(Architecture):
    """Stacked extraction levels over the backbone's stages, with shared gates below the last level.

    Args:
        tasks: task names.
        backbone: split into stages (its ``stages()``, e.g. ``lightning_mtl.nn.Conv4``, or an ``nn.Sequential``'s
            children); the experts of level j are deep copies of stage j. The last stage's output is the
            representation, ``(B, D)`` or ``(B, C, H, W)``.
        num_shared_experts: shared experts per level (0: the tasks share only the lower levels' task experts).
        num_task_experts: experts of each task per level (0: the levels are MMoE layers).
        input_shape: one input's shape (e.g. ``[1, 28, 28]``), to size every level's gates at construction (the stages
            run once on zeros, in evaluation mode); ``None`` sizes them at the first forward pass.
        reinit: give each expert its own random initialisation (``reset_parameters()`` of every submodule that has
            one); ``False`` starts every expert from its stage's values (e.g. a pre-trained backbone).

    Raises:
        ValueError: a negative number of experts, no expert at all, a bad ``input_shape`` or a backbone without stages.
        TypeError: a backbone that cannot be split into stages.
    """

    def __init__(
        self, tasks: list[str], backbone: nn.Module, num_shared_experts: int = 1, num_task_experts: int = 1,
        input_shape: tuple[int, ...] | None = None, reinit: bool = True,
    ) -> None:
        super().__init__(tasks)
        check_expert_counts(num_shared_experts, num_task_experts)
        stages = split_stages(backbone)
        sizes = _level_input_features(stages, input_shape)
        self.levels = nn.ModuleList(
            ExtractionLayer(self.tasks, stage, num_shared_experts, num_task_experts, size,
                            shared_gate=j < len(stages) - 1, reinit=reinit)
            for j, (stage, size) in enumerate(zip(stages, sizes, strict=True))
        )

    def represent(self, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        shared, own = x, dict.fromkeys(self.tasks, x)
        depth = len(self.levels)
        for j, level in enumerate(self.levels):
            # the shared gates need every task's branch; from the level below the last on, only the asked tasks'
            wanted = tasks if j >= depth - 2 else self.tasks
            shared, own = level(shared, own, wanted)
        return own

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        out = {}
        for t in self.tasks:
            modules = self.levels[-1].task_modules(t)
            if len(self.levels) > 1:
                modules.append(self.levels[-2].task_gates[t])  # read only by task t's last level
            out[t] = [p for m in modules for p in m.parameters() if p.requires_grad]
        return out


def _level_input_features(stages: list[nn.Module], input_shape: Sequence[int] | None) -> list[int | None]:
    """The flattened size of each stage's input, from one pass of zeros through the stages in evaluation mode."""
    if gate_features(input_shape) is None:
        return [None] * len(stages)
    reference = next((t for s in stages for t in [*s.parameters(), *s.buffers()] if t.is_floating_point()), None)
    x = torch.zeros(2, *input_shape, device=None if reference is None else reference.device,
                    dtype=None if reference is None else reference.dtype)
    sizes: list[int | None] = []
    with torch.no_grad():
        for stage in stages:
            sizes.append(x[0].numel())
            modes = {m: m.training for m in stage.modules()}
            try:
                x = stage.eval()(x)
            finally:
                for m, mode in modes.items():
                    m.training = mode
    return sizes
