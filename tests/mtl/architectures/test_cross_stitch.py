from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl.mtl.architectures.cross_stitch import CrossStitch
from lightning_mtl.nn import Conv4

TASKS = ["a", "b", "c"]


def mlp(*widths: int) -> nn.Sequential:
    """An nn.Sequential of Linear+ReLU stages."""
    return nn.Sequential(*(nn.Sequential(nn.Linear(i, o), nn.ReLU()) for i, o in itertools.pairwise(widths)))


def grads(module: nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]


def test_identity_equals_independent_networks():
    torch.manual_seed(0)
    backbone = mlp(5, 6, 4, 3)
    model = CrossStitch(TASKS, backbone, init_self=1.0)
    refs = [copy.deepcopy(backbone) for _ in TASKS]
    x = torch.randn(4, 5)
    out = model(x)
    weights = {t: torch.randn(4, 3) for t in TASKS}  # a different loss per task
    sum((out[t] * weights[t]).sum() for t in TASKS).backward()
    for k, t in enumerate(TASKS):
        ref = refs[k](x)
        torch.testing.assert_close(out[t], ref, rtol=0, atol=0)
        (ref * weights[t]).sum().backward()
        column = nn.Sequential(*model.columns[k])
        for g, g_ref in zip(grads(column), grads(refs[k]), strict=True):
            torch.testing.assert_close(g, g_ref)


def test_identity_task_loss_has_no_gradient_on_other_columns():
    torch.manual_seed(0)
    model = CrossStitch(TASKS, mlp(5, 6, 4, 3), init_self=1.0)
    x = torch.randn(4, 5)
    for k, t in enumerate(TASKS):
        model.zero_grad()
        model(x)[t].square().sum().backward()
        for j in range(len(TASKS)):
            norms = [g.abs().sum() for g in grads(model.columns[j])]
            if j == k:
                assert all(n > 0 for n in norms)
            else:
                assert all(n == 0 for n in norms)


def test_initialisation_rows_are_convex():
    model = CrossStitch(TASKS, mlp(2, 2, 2, 2), init_self=0.8)
    for alpha in model.alphas():
        expected = torch.full((3, 3), 0.1).fill_diagonal_(0.8)
        torch.testing.assert_close(alpha, expected)
        torch.testing.assert_close(alpha.sum(1), torch.ones(3))
    assert len(model.alphas()) == 2  # one unit between every two stages


def test_mix_matches_hand_computation():
    torch.manual_seed(0)
    model = CrossStitch(["a", "b"], mlp(3, 4, 2), init_self=0.7)
    with torch.no_grad():  # make the columns differ, so that mixing them matters
        for p in model.columns[1].parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(5, 3)
    (l1a, _), (l2a, _) = model.columns[0]
    (l1b, _), (l2b, _) = model.columns[1]
    ha, hb = F.relu(F.linear(x, l1a.weight, l1a.bias)), F.relu(F.linear(x, l1b.weight, l1b.bias))
    ma, mb = 0.7 * ha + 0.3 * hb, 0.3 * ha + 0.7 * hb
    out = model(x)
    torch.testing.assert_close(out["a"], F.relu(F.linear(ma, l2a.weight, l2a.bias)))
    torch.testing.assert_close(out["b"], F.relu(F.linear(mb, l2b.weight, l2b.bias)))


def test_per_channel_mix_matches_hand_computation():
    torch.manual_seed(0)
    model = CrossStitch(["a", "b"], mlp(3, 4, 2), channels=[4])
    assert model.alphas()[0].shape == (2, 2, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    alpha = model.alphas()[0]  # (K, K, C)
    x = torch.randn(5, 3)
    h = [column[0](x) for column in model.columns]  # 2 x (B, C)
    out = model(x)
    for t, name in enumerate(["a", "b"]):
        mixed = alpha[t, 0] * h[0] + alpha[t, 1] * h[1]  # channel c weighted by alpha[t, s, c]
        torch.testing.assert_close(out[name], model.columns[t][1](mixed))


def test_each_stage_runs_once_per_forward():
    model = CrossStitch(TASKS, mlp(5, 6, 4, 3))
    calls: dict[tuple[int, int], int] = {}
    for k, column in enumerate(model.columns):
        for s, stage in enumerate(column):
            calls[(k, s)] = 0
            stage.register_forward_hook(lambda *_, key=(k, s): calls.__setitem__(key, calls[key] + 1))
    model(torch.randn(2, 5))
    assert set(calls.values()) == {1}
    calls.update(dict.fromkeys(calls, 0))
    out = model.represent(torch.randn(2, 5), ["b"])
    assert list(out) == ["b"]
    # every column's inner stages feed task b; only b's column runs the last stage
    assert calls == {(k, s): int(s < 2 or k == 1) for k in range(3) for s in range(3)}


def test_parameter_partition_and_task_gradients():
    torch.manual_seed(0)
    model = CrossStitch(TASKS, mlp(5, 6, 4, 3), init_self=0.6)
    own = model.task_parameters()
    shared = model.shared_parameters()
    ids = [id(p) for p in shared] + [id(p) for t in TASKS for p in own[t]]
    assert len(ids) == len(set(ids))  # disjoint
    assert set(ids) == {id(p) for p in model.parameters()}  # and complete
    for k, t in enumerate(TASKS):  # a task owns its last stage and its row of the last unit
        assert {id(p) for p in own[t]} == {id(p) for p in model.columns[k][-1].parameters()} | {id(model.units[-1][k])}
    x = torch.randn(4, 5)
    for t in TASKS:
        model.zero_grad()
        model(x)[t].square().sum().backward()
        for other in TASKS:
            norms = [0.0 if p.grad is None else p.grad.abs().sum().item() for p in own[other]]
            assert all(n > 0 for n in norms) if other == t else all(n == 0 for n in norms)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared)  # off-diagonal: all columns


def test_per_task_inputs():
    torch.manual_seed(0)
    model = CrossStitch(["a", "b"], mlp(3, 4, 2))
    xa, xb = torch.randn(2, 3), torch.randn(5, 3)
    out = model({"a": xa, "b": xb})
    torch.testing.assert_close(out["a"], model.represent(xa, ["a"])["a"])
    torch.testing.assert_close(out["b"], model.represent(xb, ["b"])["b"])


@pytest.mark.parametrize("channels", [None, [8, 8, 8]])
def test_conv4_stages(channels):
    torch.manual_seed(0)
    backbone = Conv4(in_channels=1, hidden_channels=8, out_channels=8)
    model = CrossStitch(["a", "b"], backbone, init_self=1.0 if channels is None else 0.9, channels=channels)
    x = torch.randn(3, 1, 28, 28)
    out = model(x)
    assert {t: o.shape for t, o in out.items()} == {"a": (3, 8, 1, 1), "b": (3, 8, 1, 1)}
    if channels is None:  # identity: each task's column is the backbone
        ref = nn.Sequential(*copy.deepcopy(backbone).stages())
        torch.testing.assert_close(out["a"], ref(x))
    sum(o.sum() for o in out.values()).backward()
    assert all(p.grad is not None for p in model.unit_parameters())


def test_per_channel_with_wrong_widths_fails_clearly():
    model = CrossStitch(["a", "b"], mlp(3, 4, 2), channels=[5])
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 3))


@pytest.mark.parametrize(("tasks", "backbone", "kwargs", "error", "match"), [
    (["a"], mlp(2, 2, 2), {}, ValueError, "two or more"),
    (["a", "a"], mlp(2, 2, 2), {}, ValueError, "unique"),
    (["a", "b"], mlp(2, 2, 2), {"init_self": 1.5}, ValueError, "init_self"),
    (["a", "b"], mlp(2, 2), {}, ValueError, "two stages"),
    (["a", "b"], nn.Linear(2, 2), {}, TypeError, "stages"),
    (["a", "b"], mlp(2, 2, 2, 2), {"channels": [2]}, ValueError, "channels"),
    (["a", "b"], mlp(2, 2, 2), {"channels": [0]}, ValueError, "channels"),
])
def test_bad_arguments(tasks, backbone, kwargs, error, match):
    with pytest.raises(error, match=match):
        CrossStitch(tasks, backbone, **kwargs)
