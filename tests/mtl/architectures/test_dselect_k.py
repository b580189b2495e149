"""DSelect-k: the smooth-step, exact k-sparse selection once binary, the paper's mixture, penalty, ownership."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import check_ownership, count_calls, gradcheck_architecture
from torch import nn

from lightning_mtl.mtl.architectures.dselect_k import DSelectK, smooth_step
from lightning_mtl.nn import Conv4

TASKS = ["a", "b", "c"]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh())


def _reference_weights(z: torch.Tensor, w: torch.Tensor, n: int, gamma: float) -> torch.Tensor:
    """q_l = sum_i softmax(w)_i prod_j (S(z_ij) if bit j of l (most significant first) else 1 - S(z_ij))."""
    k, m = z.shape
    assert (z.abs() < gamma / 2).all()
    s = -2 * z**3 / gamma**3 + 3 * z / (2 * gamma) + 0.5  # the cubic region
    a = torch.softmax(w, 0)
    q = torch.zeros(n, dtype=z.dtype)
    for expert in range(n):
        for i in range(k):
            bits = [(expert >> (m - 1 - j)) & 1 for j in range(m)]
            q[expert] += a[i] * torch.prod(torch.stack([s[i, j] if b else 1 - s[i, j] for j, b in enumerate(bits)]))
    return q


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_smooth_step_is_0_then_1_and_c1_at_the_edges(gamma):
    t = torch.linspace(-2 * gamma, 2 * gamma, 801, dtype=torch.float64, requires_grad=True)
    s = smooth_step(t, gamma)
    (ds,) = torch.autograd.grad(s.sum(), t)
    below, above = t <= -gamma / 2, t >= gamma / 2
    assert (s[below] == 0).all() and (s[above] == 1).all() and (ds[below | above] == 0).all()
    assert (s.diff() >= 0).all() and ((s >= 0) & (s <= 1)).all()
    torch.testing.assert_close(smooth_step(torch.tensor(0.0), gamma), torch.tensor(0.5))
    for edge in (-gamma / 2, gamma / 2):  # value and slope of the cubic meet the flat parts
        inside = torch.tensor(edge * (1 - 1e-7), dtype=torch.float64, requires_grad=True)
        value = smooth_step(inside, gamma)
        (slope,) = torch.autograd.grad(value, inside)
        assert abs(value.detach().item() - (edge > 0)) < 1e-6 and abs(slope.item()) < 1e-6
    centre = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(smooth_step(centre, gamma), centre)
    torch.testing.assert_close(slope, torch.tensor(3 / (2 * gamma), dtype=torch.float64))


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_gate_weights_match_the_papers_formula_and_sum_to_1_for_powers_of_2(n):
    torch.manual_seed(0)
    arch = DSelectK(TASKS, _mlp(), num_experts=n, k=2, gamma=0.7)
    for gate in arch.gates.values():
        with torch.no_grad():
            gate.z.uniform_(-0.3, 0.3)  # inside the cubic region (|z| < 0.35): fractional weights
        q, _ = gate(None)
        torch.testing.assert_close(q, _reference_weights(gate.z.detach(), gate.w.detach(), n, 0.7))
        assert (q > 0).all()
        if n & (n - 1) == 0:
            torch.testing.assert_close(q.sum(), torch.tensor(1.0))
        else:  # codes beyond the last expert take some weight until the penalty pushes it back
            assert q.sum() < 1


def test_binary_gates_select_exactly_k_experts():
    torch.manual_seed(0)
    gamma, chosen = 1.0, {"a": [5, 2, 6], "b": [0, 7, 3], "c": [1, 4, 2]}
    arch, x = DSelectK(TASKS, _mlp(), num_experts=8, k=3, gamma=gamma), torch.randn(4, 6)
    for t, experts in chosen.items():
        gate = arch.gates[t]
        with torch.no_grad():  # saturated logits: +-gamma encodes each selector's expert in binary
            gate.z.copy_(torch.where(gate.codes[experts], gamma, -gamma))
            gate.w.normal_()
    reps, outputs = arch(x), [e(x) for e in arch.experts]
    for t, experts in chosen.items():
        gate = arch.gates[t]
        q, r = gate(None)
        assert (r.sum(-1) == 1).all() and (r.max(-1).values == 1).all()  # each selector is one-hot
        assert q.nonzero().flatten().tolist() == sorted(experts)
        torch.testing.assert_close(q[experts], torch.softmax(gate.w, 0))
        torch.testing.assert_close(q.sum(), torch.tensor(1.0))
        expected = sum(a * outputs[e] for a, e in zip(torch.softmax(gate.w, 0), experts, strict=True))
        torch.testing.assert_close(reps[t], expected)


def test_per_example_gates_select_per_input():
    torch.manual_seed(0)
    arch = DSelectK(TASKS, _mlp(), num_experts=4, k=2, per_example=True, input_shape=(6,))
    x = torch.randn(5, 6)
    q, r = arch.gates["a"](x)
    assert q.shape == (5, 4) and r.shape == (5, 2, 4) and not torch.allclose(q[0], q[1])
    torch.testing.assert_close(q.sum(-1), torch.ones(5))
    gate = arch.gates["b"]
    with torch.no_grad():  # input-independent saturated logits: selects experts 3 and 1 for every example
        gate.z.weight.zero_()
        gate.z.bias.copy_(torch.tensor([1.0, 1.0, -1.0, 1.0]))
    q, _ = gate(x)
    assert (q[:, [0, 2]] == 0).all() and (q[:, [1, 3]] > 0).all()
    torch.testing.assert_close(q.sum(-1), torch.ones(5))


def test_penalty_is_the_official_regularisation():
    torch.manual_seed(0)
    assert DSelectK(TASKS, _mlp(), num_experts=4).penalty() is None  # power of 2, no entropy weight
    arch = DSelectK(TASKS, _mlp(), num_experts=3, k=2, entropy_weight=0.1)
    rs = [g(None)[1] for g in arch.gates.values()]
    expected = sum(0.1 * -(r * torch.log(r + 1e-6)).sum() + (1 / r.sum(-1)).sum() for r in rs)
    penalty = arch.penalty()
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    assert all(g.z.grad.abs().sum() > 0 for g in arch.gates.values())

    per_example = DSelectK(TASKS, _mlp(), num_experts=4, entropy_weight=0.1, per_example=True, input_shape=(6,))
    x = torch.randn(3, 6)
    per_example(x)
    rs = [g(x)[1] for g in per_example.gates.values()]  # (B, k, n) each
    # a mean over the batch's examples, so that the rank average under DDP is the global batch's penalty
    torch.testing.assert_close(per_example.penalty(), sum(0.1 * -(r * torch.log(r + 1e-6)).sum() / 3 for r in rs))
    assert per_example.penalty() is None  # consumed: the graph of that pass is not kept
    per_example.eval()(torch.randn(3, 6))
    assert per_example.penalty() is None  # only training passes are regularised


def test_minimising_the_entropy_makes_each_selector_pick_one_expert():
    torch.manual_seed(0)
    arch = DSelectK(["a"], _mlp(), num_experts=4, k=2, entropy_weight=1.0)
    gate = arch.gates["a"]
    optimizer = torch.optim.Adam([gate.z], lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        arch.penalty().backward()
        optimizer.step()
    q, r = gate(None)
    assert ((r == 0) | (r == 1)).all() and (r.sum(-1) == 1).all()
    assert 1 <= int((q > 0).sum()) <= 2


def test_each_expert_runs_once_and_gates_belong_to_their_task():
    torch.manual_seed(0)
    arch = DSelectK(TASKS, Conv4(in_channels=1, hidden_channels=4, out_channels=4), num_experts=4, k=2)
    counts = count_calls(list(arch.experts))
    x = torch.randn(2, 1, 28, 28)
    reps = arch(x)
    assert counts == [1, 1, 1, 1] and {t: z.shape for t, z in reps.items()} == dict.fromkeys(TASKS, (2, 4))
    check_ownership(arch, x)
    per_example = DSelectK(TASKS, _mlp(), num_experts=4, k=2, per_example=True, input_shape=(6,))
    check_ownership(per_example, torch.randn(3, 6))


@pytest.mark.parametrize("per_example", [False, True])
def test_gradcheck(per_example):
    torch.manual_seed(0)
    arch = DSelectK(["a", "b"], nn.Sequential(nn.Linear(3, 2), nn.Tanh()), num_experts=3, k=2,
                    per_example=per_example, input_shape=(3,))
    assert gradcheck_architecture(arch, torch.randn(2, 3))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_experts": 1, "k": 1}, "num_experts >= 2"),
    ({"num_experts": 4, "k": 5}, "k .* must be in 1..num_experts=4"),
    ({"k": 0}, "k .* must be in"),
    ({"gamma": 0.0}, "gamma must be > 0"),
    ({"entropy_weight": -1.0}, "entropy_weight must be >= 0"),
    ({"per_example": True}, "set input_shape"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DSelectK(TASKS, _mlp(), **kwargs)
