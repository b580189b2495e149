"""PLE: the paper's levels with shared gates, one level is CGC, gradient-sense ownership, experts run once, stages."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import check_ownership, count_calls, gradcheck_architecture
from torch import Tensor, nn

from lightning_mtl.mtl.architectures.cgc import CGC
from lightning_mtl.mtl.architectures.ple import PLE
from lightning_mtl.nn import Conv4

TASKS = ["a", "b", "c"]


def _stages(depth: int = 3) -> nn.Sequential:
    widths = [6, 5, 4, 3][: depth + 1]
    blocks = [nn.Sequential(nn.Linear(i, o), nn.Tanh()) for i, o in zip(widths[:-1], widths[1:], strict=True)]
    return nn.Sequential(*blocks)


def _mixture(gate: nn.Sequential, z: Tensor, outputs: list[Tensor]) -> Tensor:
    linear = gate[1]
    w = torch.softmax(z.flatten(1) @ linear.weight.T + linear.bias, -1)  # (B, n)
    assert w.shape[1] == len(outputs)
    return sum(w[:, i, None] * o for i, o in enumerate(outputs))


def test_two_levels_are_the_papers_formula():
    torch.manual_seed(0)
    arch, x = PLE(TASKS, _stages(2), num_shared_experts=2, num_task_experts=2, input_shape=(6,)), torch.randn(5, 6)
    low, top = arch.levels
    assert low.shared_gate is not None and top.shared_gate is None  # the last level is CGC
    shared0 = [e(x) for e in low.shared_experts]
    own0 = {t: [e(x) for e in low.task_experts[t]] for t in TASKS}
    x_task = {t: _mixture(low.task_gates[t], x, shared0 + own0[t]) for t in TASKS}
    x_shared = _mixture(low.shared_gate, x, shared0 + [o for t in TASKS for o in own0[t]])  # every expert
    shared1 = [e(x_shared) for e in top.shared_experts]
    reps = arch(x)
    for t in TASKS:
        own1 = [e(x_task[t]) for e in top.task_experts[t]]
        torch.testing.assert_close(reps[t], _mixture(top.task_gates[t], x_task[t], shared1 + own1))


def test_one_level_is_cgc():
    torch.manual_seed(0)
    stage = nn.Sequential(nn.Linear(6, 4), nn.Tanh())
    ple, cgc = PLE(TASKS, nn.Sequential(stage), 2, 1, input_shape=(6,)), CGC(TASKS, stage, 2, 1, input_shape=(6,))
    ple.levels[0].load_state_dict(cgc.layer.state_dict())
    x = torch.randn(4, 6)
    for t in TASKS:
        torch.testing.assert_close(ple(x)[t], cgc(x)[t])
    assert {t: len(ps) for t, ps in ple.task_parameters().items()} == {t: len(ps) for t, ps in
                                                                          cgc.task_parameters().items()}


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_task_parameters_are_what_only_that_tasks_loss_depends_on(depth):
    torch.manual_seed(0)
    arch = PLE(TASKS, _stages(depth), num_shared_experts=1, num_task_experts=2)
    check_ownership(arch, torch.randn(4, 6))  # gradients of each task's loss decide, parameter by parameter
    shared = {id(p) for p in arch.shared_parameters()}
    for level in arch.levels[:-1]:  # lower-level task experts feed the shared gate: shared for aggregation
        assert all(id(p) in shared for t in TASKS for p in level.task_experts[t].parameters())
    for t in TASKS:
        expected = [*arch.levels[-1].task_experts[t].parameters(), *arch.levels[-1].task_gates[t].parameters()]
        if depth > 1:  # task t's gate below the last level is read by task t's last level only
            expected += arch.levels[-2].task_gates[t].parameters()
        assert {id(p) for p in arch.task_parameters()[t]} == {id(p) for p in expected}


def test_each_expert_runs_once_and_asked_tasks_match_all_tasks():
    torch.manual_seed(0)
    arch, x = PLE(TASKS, _stages(3), num_shared_experts=1, num_task_experts=1), torch.randn(4, 6)
    shared = count_calls([lv.shared_experts[0] for lv in arch.levels])
    own = {t: count_calls([lv.task_experts[t][0] for lv in arch.levels]) for t in TASKS}
    reps = arch(x)
    assert shared == [1, 1, 1] and own == dict.fromkeys(TASKS, [1, 1, 1])
    only_b = arch.represent(x, ["b"])
    torch.testing.assert_close(only_b["b"], reps["b"])
    assert set(only_b) == {"b"}
    # the shared gates below need every task's branch; the last level runs only task b's experts
    assert shared == [2, 2, 2] and own == {"a": [2, 2, 1], "b": [2, 2, 2], "c": [2, 2, 1]}


def test_conv4_stages_as_levels():
    torch.manual_seed(0)
    backbone, x = Conv4(in_channels=1, hidden_channels=4, out_channels=4), torch.randn(2, 1, 28, 28)
    eager, lazy = PLE(["a", "b"], backbone, input_shape=(1, 28, 28)), PLE(["a", "b"], backbone)
    assert backbone.training and all(m.training for m in eager.modules())  # the sizing pass left training mode on
    reps = lazy(x)
    assert {t: z.shape for t, z in reps.items()} == {"a": (2, 4, 1, 1), "b": (2, 4, 1, 1)}
    sizes = [784, 4 * 14 * 14, 4 * 7 * 7, 4 * 3 * 3]  # each level's gates read that level's input
    for e_level, l_level, size, stage in zip(eager.levels, lazy.levels, sizes, backbone.stages(), strict=True):
        assert e_level.task_gates["a"][1].weight.shape[1] == l_level.task_gates["b"][1].weight.shape[1] == size
        copy_ = e_level.shared_experts[0]
        assert [type(m) for m in copy_] == [type(m) for m in stage]
        assert not {id(p) for p in copy_.parameters()} & {id(p) for p in backbone.parameters()}
    check_ownership(eager, x)


def test_gradcheck():
    torch.manual_seed(0)
    arch = PLE(["a", "b"], _stages(2), num_shared_experts=1, num_task_experts=1, input_shape=(6,))
    assert gradcheck_architecture(arch, torch.randn(2, 6))


def test_bad_arguments():
    with pytest.raises(TypeError, match="cannot be split into stages"):
        PLE(TASKS, nn.Linear(3, 3))
    with pytest.raises(ValueError, match=">= 0"):
        PLE(TASKS, _stages(), num_task_experts=-1)
    with pytest.raises(ValueError, match="at least one expert"):
        PLE(TASKS, _stages(), num_shared_experts=0, num_task_experts=0)
    with pytest.raises(ValueError, match="input_shape"):
        PLE(TASKS, _stages(), input_shape=(0,))
