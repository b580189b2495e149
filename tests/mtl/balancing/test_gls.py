"""GLS: the geometric mean of the losses, its gradient's weights L / (K L_k), scale invariance, torchjd's value."""

from __future__ import annotations

import torch
from torchjd.scalarization import GeometricMean

from lightning_mtl.mtl.balancing import create_balancer

TASKS = ["a", "b", "c"]


def _dict(values: torch.Tensor, tasks: list[str] = TASKS) -> dict[str, torch.Tensor]:
    return dict(zip(tasks, values, strict=True))


def test_value_and_gradient_are_the_geometric_means():
    losses = torch.tensor([0.5, 2.0, 8.0], requires_grad=True)
    gls = create_balancer("gls", TASKS)
    value = gls(_dict(losses))
    torch.testing.assert_close(value, torch.tensor(2.0))  # (0.5 * 2 * 8)^(1/3)
    torch.testing.assert_close(value, GeometricMean()(losses.detach()))
    value.backward()
    expected = 2.0 / (3 * losses.detach())  # L / (K L_k): a task with a 16x smaller loss gets a 16x larger weight
    torch.testing.assert_close(losses.grad, expected)
    torch.testing.assert_close(gls.weights, expected)
    torch.testing.assert_close(gls.weights @ losses.detach(), value.detach())  # degree-1 homogeneous (Euler)


def test_rescaling_one_loss_only_rescales_the_update():
    # (c L_1 * L_2 * L_3)^(1/3) = c^(1/3) GLS: a loss's unit changes the step size, never the direction.
    torch.manual_seed(0)
    shared, heads = torch.nn.Linear(3, 4), torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in TASKS)
    h = shared(torch.randn(6, 3))
    losses = [head(h).pow(2).mean() + 0.1 for head in heads]
    gls = create_balancer("gls", TASKS)
    base = torch.autograd.grad(gls(_dict(torch.stack(losses))), shared.weight, retain_graph=True)[0]
    scaled = torch.autograd.grad(gls(_dict(torch.stack([100 * losses[0], *losses[1:]]))), shared.weight)[0]
    torch.testing.assert_close(scaled, 100 ** (1 / 3) * base)


def test_many_small_losses_do_not_underflow():
    tasks = [f"t{i}" for i in range(40)]
    losses = torch.full((40,), 1e-3)  # their product, 1e-120, is 0 in float32
    value = create_balancer("gls", tasks)(_dict(losses, tasks))
    torch.testing.assert_close(value, torch.tensor(1e-3))
