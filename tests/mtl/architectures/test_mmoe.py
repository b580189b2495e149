"""MMoE: the paper's mixture, hard sharing with one expert, experts run once, gates on the simplex, ownership."""

from __future__ import annotations

import copy

import pytest
import torch
from moe_helpers import check_ownership, count_calls, gradcheck_architecture, task_losses
from torch import nn

from lightning_mtl.mtl.architectures.hard_sharing import HardSharing
from lightning_mtl.mtl.architectures.mmoe import MMoE, expert_copies
from lightning_mtl.nn import Conv4

TASKS = ["a", "b", "c"]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh())


def test_mixture_is_the_papers_formula():
    torch.manual_seed(0)
    arch, x = MMoE(TASKS, _mlp(), num_experts=3, input_shape=(2, 3)), torch.randn(5, 2, 3)
    reps = arch(x)
    experts = torch.stack([e(x) for e in arch.experts], 1)  # (B, n, D)
    for t in TASKS:
        linear = arch.gates[t][1]
        g = torch.softmax(x.flatten(1) @ linear.weight.T + linear.bias, -1)  # (B, n)
        torch.testing.assert_close(reps[t], (g[:, :, None] * experts).sum(1))


def test_one_expert_is_hard_sharing():
    torch.manual_seed(0)
    mmoe, x = MMoE(TASKS, _mlp(), num_experts=1), torch.randn(4, 6)
    hard = HardSharing(TASKS, copy.deepcopy(mmoe.experts[0]))
    for arch in (mmoe, hard):
        sum(task_losses(arch, x).values()).backward()
    for t in TASKS:
        torch.testing.assert_close(mmoe(x)[t], hard(x)[t])
    for p, q in zip(mmoe.experts[0].parameters(), hard.backbone.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert all(p.grad.abs().max() == 0 for g in mmoe.gates.values() for p in g.parameters())  # softmax of one logit


def test_gates_are_on_the_simplex_and_equal_experts_give_the_expert():
    torch.manual_seed(0)
    arch, x = MMoE(TASKS, _mlp(), num_experts=4, reinit=False), torch.randn(5, 6) * 3
    seen = []
    for g in arch.gates.values():
        g.register_forward_hook(lambda _m, _i, out: seen.append(out))
    reps = arch(x)
    assert len(seen) == len(TASKS)
    for w in seen:
        assert w.shape == (5, 4) and (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(5))
    for t in TASKS:  # identical experts: any convex mixture of them is the expert itself
        torch.testing.assert_close(reps[t], arch.experts[0](x))


def test_each_expert_runs_once_per_input_batch():
    torch.manual_seed(0)
    arch = MMoE(TASKS, Conv4(in_channels=1, hidden_channels=8, out_channels=8), num_experts=3)
    counts = count_calls(list(arch.experts))
    reps = arch(torch.randn(2, 1, 28, 28))
    assert counts == [1, 1, 1] and {t: z.shape for t, z in reps.items()} == dict.fromkeys(TASKS, (2, 8))
    arch({"a": torch.randn(2, 1, 28, 28), "c": torch.randn(3, 1, 28, 28)})  # per-task inputs: once per task's batch
    assert counts == [3, 3, 3]


def test_gates_are_task_parameters_and_experts_shared():
    torch.manual_seed(0)
    arch = MMoE(TASKS, _mlp(), num_experts=3)
    check_ownership(arch, torch.randn(4, 6))
    assert {t: {id(p) for p in ps} for t, ps in arch.task_parameters().items()} == {
        t: {id(p) for p in arch.gates[t].parameters()} for t in TASKS}


def test_conv4_experts_with_eagerly_and_lazily_sized_gates():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    expert = Conv4(in_channels=1, hidden_channels=4, out_channels=4)
    eager, lazy = MMoE(TASKS, expert, 2, input_shape=(1, 28, 28)), MMoE(TASKS, expert, 2)
    lazy.load_state_dict(eager.state_dict())  # materialises the lazy gates with the eager ones' values
    torch.testing.assert_close(lazy(x)["b"], eager(x)["b"])
    assert eager.gates["a"][1].weight.shape == (2, 784)
    check_ownership(eager, x)


def test_reinit_gives_each_expert_its_own_initialisation():
    template = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    fresh, kept = expert_copies(template, 3, reinit=True), expert_copies(template, 3, reinit=False)
    w = [e[0].weight for e in fresh]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2]) and not torch.equal(w[0], template[0].weight)
    assert all(torch.equal(e[0].weight, template[0].weight) for e in kept)
    assert all(e[0].weight is not template[0].weight for e in kept)  # copies, not the template's tensors


def test_gradcheck():
    torch.manual_seed(0)
    arch = MMoE(["a", "b"], nn.Sequential(nn.Linear(3, 2), nn.Tanh()), num_experts=2, input_shape=(3,))
    assert gradcheck_architecture(arch, torch.randn(2, 3))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_experts": 0}, "num_experts >= 1"),
    ({"input_shape": ()}, "input_shape"),
    ({"input_shape": (1, 0, 28)}, "input_shape"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MMoE(TASKS, _mlp(), **kwargs)
    with pytest.raises(ValueError, match="unique"):
        MMoE(["a", "a"], _mlp())
