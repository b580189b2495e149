"""CGC: Customized Gate Control.

Tang, Liu, Zhao & Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for
Personalized Recommendations", RecSys 2020 (doi:10.1145/3383313.3412236), Section 4.2. Besides ``m_s`` experts shared
by every task, each task t has ``m_t`` experts of its own; task t reads

    y_t(x) = sum_i g_t(x)_i S_t(x)_i,    g_t(x) = softmax(W_t x),    S_t(x) = [E_s,1(x), ..., E_t,1(x), ...]

(x flattened), so a task's gate only mixes the shared experts and its own. The paper lists task t's experts before
the shared ones in S_t; the order has no effect (the gate's rows follow it). Task t's experts and gate are task t's
parameters; the shared experts run once per input. With ``num_task_experts=0`` CGC is MMoE.

:class:`ExtractionLayer` is one level of experts and gates: CGC is one, PLE (:mod:`.ple`) stacks several.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_mtl.mtl.architectures.base import Architecture
from lightning_mtl.mtl.architectures.mmoe import expert_copies, gate_features, mix, softmax_gate


class ExtractionLayer(nn.Module):
    """One level of shared and task experts, a gate per task and, optionally, a shared gate.

    Task t's gate reads task t's input and mixes the shared experts (which read the shared input) and task t's
    experts (which read task t's input). The shared gate reads the shared input and mixes every expert, the shared
    ones first, then each task's in the order of ``tasks``.

    Args:
        tasks: task names.
        expert: template of the level's experts (deep-copied).
        num_shared_experts: experts shared by every task.
        num_task_experts: experts of each task.
        in_features: features of a flattened input of the level (``None``: the gates are sized at the first call).
        shared_gate: add a gate for the shared branch (PLE's lower levels).
        reinit: give each expert its own random initialisation (see :func:`.mmoe.expert_copies`).
    """

    def __init__(
        self, tasks: list[str], expert: nn.Module, num_shared_experts: int, num_task_experts: int,
        in_features: int | None, shared_gate: bool, reinit: bool,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.shared_experts = expert_copies(expert, num_shared_experts, reinit)
        self.task_experts = nn.ModuleDict({t: expert_copies(expert, num_task_experts, reinit) for t in self.tasks})
        n_task = num_shared_experts + num_task_experts
        self.task_gates = nn.ModuleDict({t: softmax_gate(n_task, in_features) for t in self.tasks})
        n_all = num_shared_experts + len(self.tasks) * num_task_experts
        self.shared_gate = softmax_gate(n_all, in_features) if shared_gate else None

    def forward(
        self, shared_x: Tensor, task_x: dict[str, Tensor], tasks: Sequence[str],
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """``(shared output or None, {t: task t's output for t in tasks})``; the shared gate needs every task's
        input (``task_x`` then holds all of them)."""
        shared = [e(shared_x) for e in self.shared_experts]  # once, read by every gate
        needed = self.tasks if self.shared_gate is not None else tasks
        own = {t: [e(task_x[t]) for e in self.task_experts[t]] for t in needed}
        out = {t: mix(shared + own[t], self.task_gates[t](task_x[t])) for t in tasks}
        if self.shared_gate is None:
            return None, out
        everything = shared + [o for t in self.tasks for o in own[t]]
        return mix(everything, self.shared_gate(shared_x)), out

    def task_modules(self, task: str) -> list[nn.Module]:
        """Task ``task``'s experts and gate."""
        return [self.task_experts[task], self.task_gates[task]]


class CGC(Architecture):
    """Shared experts plus experts of each task; task t's gate mixes the shared experts and task t's.

    Args:
        tasks: task names.
        expert: template of an expert, ``(B, ...) -> (B, *S)``; every expert is a deep copy of it.
        num_shared_experts: experts shared by every task (0: none; the tasks then share no parameter).
        num_task_experts: experts of each task (0: MMoE).
        input_shape: one input's shape (e.g. ``[1, 28, 28]``), to size the gates at construction; ``None`` sizes them
            at the first forward pass.
        reinit: give each expert its own random initialisation (``reset_parameters()`` of every submodule that has
            one); ``False`` starts every expert from the template's values.

    Raises:
        ValueError: a negative number of experts, no expert at all, or a bad ``input_shape``.
    """

    def __init__(
        self, tasks: list[str], expert: nn.Module, num_shared_experts: int = 1, num_task_experts: int = 1,
        input_shape: tuple[int, ...] | None = None, reinit: bool = True,
    ) -> None:
        super().__init__(tasks)
        check_expert_counts(num_shared_experts, num_task_experts)
        self.layer = ExtractionLayer(self.tasks, expert, num_shared_experts, num_task_experts,
                                     gate_features(input_shape), shared_gate=False, reinit=reinit)

    def represent(self, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        return self.layer(x, dict.fromkeys(tasks, x), tasks)[1]

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {t: [p for m in self.layer.task_modules(t) for p in m.parameters() if p.requires_grad]
                for t in self.tasks}


def check_expert_counts(num_shared_experts: int, num_task_experts: int) -> None:
    """Raise a ValueError unless both counts are >= 0 and some expert exists."""
    if num_shared_experts < 0 or num_task_experts < 0:
        raise ValueError(f"numbers of experts must be >= 0, got num_shared_experts={num_shared_experts}, "
                         f"num_task_experts={num_task_experts}")
    if num_shared_experts + num_task_experts == 0:
        raise ValueError("give at least one expert: num_shared_experts or num_task_experts must be >= 1")
