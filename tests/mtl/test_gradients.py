"""Gradient plumbing: the per-task matrix, the reusable buffer, the finiteness check and loss-scale removal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mtl.mtl import gradients as G


def _two_task_losses():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(7, 5)
    z = backbone(x)
    losses = [z[:, 0].pow(2).mean(), (z[:, 1] * z[:, 2]).sum()]
    return backbone, losses


def test_task_matrix_rows_equal_separate_gradients():
    backbone, losses = _two_task_losses()
    params = list(backbone.parameters())
    expected = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
                for loss in losses]
    out = G.Buffer().get(2, sum(p.numel() for p in params), torch.device("cpu"))
    matrix = G.task_matrix(losses, params, out)
    assert matrix.data_ptr() == out.data_ptr()
    torch.testing.assert_close(matrix, torch.stack(expected), rtol=0, atol=0)


def test_task_matrix_unused_parameter_gives_zero_columns():
    backbone, losses = _two_task_losses()
    unused = nn.Parameter(torch.ones(3))
    params = [*backbone.parameters(), unused]
    matrix = G.task_matrix(losses, params, torch.full((2, sum(p.numel() for p in params)), float("nan")))
    assert torch.equal(matrix[:, -3:], torch.zeros(2, 3))
    assert torch.isfinite(matrix).all()


def test_vmapped_task_matrix_equals_the_loop_through_batch_norm():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    unused = nn.Parameter(torch.ones(2))
    heads = [nn.Linear(27, 4) for _ in range(3)]
    x, ys = torch.randn(5, 1, 8, 8), [torch.randint(0, 4, (5,)) for _ in range(3)]
    z = backbone(x)
    losses = torch.stack([nn.functional.cross_entropy(h(z), y) for h, y in zip(heads, ys, strict=True)])
    params = [*backbone.parameters(), unused]
    n = sum(p.numel() for p in params)
    loop = G.task_matrix(list(losses), params, torch.empty(3, n))
    vmap = G.task_matrix_vmap(losses, z, params, torch.full((3, n), float("nan")))
    torch.testing.assert_close(vmap, loop, rtol=1e-5, atol=1e-7)
    assert torch.equal(vmap[:, -2:], torch.zeros(3, 2))


def test_buffer_is_reused_until_the_shape_changes():
    buffer = G.Buffer()
    a = buffer.get(3, 10, torch.device("cpu"))
    assert buffer.get(3, 10, torch.device("cpu")) is a
    b = buffer.get(4, 10, torch.device("cpu"))
    assert b is not a and b.shape == (4, 10) and b.dtype == torch.float32


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_detects_any_non_finite_element(bad):
    t = torch.randn(50, 100)
    assert G.all_finite(t, None, torch.zeros(0))
    t[17, 3] = bad
    assert not G.all_finite(torch.ones(3), t)


def test_all_finite_is_exact_when_a_finite_sum_overflows():
    huge = torch.full((4,), 3e38)  # every element finite, the float32 sum is not
    assert not bool(torch.isfinite(huge.sum()))
    assert G.all_finite(huge)
    assert G.all_finite(huge.to(torch.bfloat16))
    huge[0] = float("nan")
    assert not G.all_finite(huge)


def test_loss_scale_unscales_in_place_only_when_enabled():
    t = torch.full((3,), 8.0)
    assert G.LossScale(None).unscale_(t) is t and torch.equal(t, torch.full((3,), 8.0))
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scale = G.LossScale(scaler)
    assert scale.enabled and scale.value() == 4.0
    assert scale.unscale_(t) is t and torch.equal(t, torch.full((3,), 2.0))
    scale.scale(torch.ones(()))  # initialises the scaler's scale tensor, as a training step does
    scaler.update(2.0)  # the scale changes only between steps; the cached value follows on refresh
    assert scale.value() == 4.0
    scale.refresh()
    assert scale.value() == 2.0
