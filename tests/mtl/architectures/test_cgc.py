"""CGC: the paper's mixture of shared and own experts, MMoE without task experts, ownership, experts run once."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import check_ownership, count_calls, gradcheck_architecture
from torch import nn

from lightning_mtl.mtl.architectures.cgc import CGC
from lightning_mtl.mtl.architectures.mmoe import MMoE
from lightning_mtl.nn import Conv4

TASKS = ["a", "b", "c"]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh())


def test_mixture_is_the_papers_formula():
    torch.manual_seed(0)
    arch, x = CGC(TASKS, _mlp(), num_shared_experts=2, num_task_experts=3), torch.randn(5, 6)
    reps = arch(x)
    for t in TASKS:
        experts = [*arch.layer.shared_experts, *arch.layer.task_experts[t]]  # task t's gate sees these only
        linear = arch.layer.task_gates[t][1]
        g = torch.softmax(x @ linear.weight.T + linear.bias, -1)  # (B, 5)
        assert g.shape == (5, 5)
        torch.testing.assert_close(reps[t], sum(g[:, i, None] * e(x) for i, e in enumerate(experts)))


def test_without_task_experts_it_is_mmoe():
    torch.manual_seed(0)
    cgc, x = CGC(TASKS, _mlp(), num_shared_experts=3, num_task_experts=0), torch.randn(4, 6)
    mmoe = MMoE(TASKS, _mlp(), num_experts=3, input_shape=(6,))
    cgc(x)  # sizes CGC's lazy gates
    mmoe.experts.load_state_dict(cgc.layer.shared_experts.state_dict())
    for t in TASKS:
        mmoe.gates[t].load_state_dict(cgc.layer.task_gates[t].state_dict())
        torch.testing.assert_close(cgc(x)[t], mmoe(x)[t])


def test_task_experts_and_gates_belong_to_their_task():
    torch.manual_seed(0)
    arch = CGC(TASKS, _mlp(), num_shared_experts=2, num_task_experts=2)
    check_ownership(arch, torch.randn(4, 6))
    for t in TASKS:
        expected = [*arch.layer.task_experts[t].parameters(), *arch.layer.task_gates[t].parameters()]
        assert {id(p) for p in arch.task_parameters()[t]} == {id(p) for p in expected}
    assert {id(p) for p in arch.shared_parameters()} == {id(p) for p in arch.layer.shared_experts.parameters()}


def test_shared_experts_run_once_and_only_asked_tasks_experts_run():
    torch.manual_seed(0)
    arch = CGC(TASKS, Conv4(in_channels=1, hidden_channels=4, out_channels=4), 2, 1, input_shape=(1, 28, 28))
    shared = count_calls(list(arch.layer.shared_experts))
    own = {t: count_calls(list(arch.layer.task_experts[t])) for t in TASKS}
    reps = arch(torch.randn(2, 1, 28, 28))
    assert shared == [1, 1] and own == dict.fromkeys(TASKS, [1])
    assert {t: z.shape for t, z in reps.items()} == dict.fromkeys(TASKS, (2, 4))
    arch({"b": torch.randn(3, 1, 28, 28)})  # per-task inputs: the other tasks' experts are not needed
    assert shared == [2, 2] and own == {"a": [1], "b": [2], "c": [1]}


def test_conv4_experts_ownership():
    torch.manual_seed(0)
    arch = CGC(["a", "b"], Conv4(in_channels=1, hidden_channels=4, out_channels=4), 1, 1)
    check_ownership(arch, torch.randn(2, 1, 28, 28))


def test_no_shared_expert_means_no_shared_parameter():
    arch = CGC(TASKS, _mlp(), num_shared_experts=0, num_task_experts=2)
    arch(torch.randn(2, 6))
    assert arch.shared_parameters() == []


def test_gradcheck():
    torch.manual_seed(0)
    arch = CGC(["a", "b"], nn.Sequential(nn.Linear(3, 2), nn.Tanh()), 1, 2, input_shape=(3,))
    assert gradcheck_architecture(arch, torch.randn(2, 3))


@pytest.mark.parametrize(("shared", "own", "message"), [
    (-1, 1, ">= 0"), (1, -1, ">= 0"), (0, 0, "at least one expert"),
])
def test_bad_arguments(shared, own, message):
    with pytest.raises(ValueError, match=message):
        CGC(TASKS, _mlp(), num_shared_experts=shared, num_task_experts=own)
