"""Uncertainty weighting: the formula, trainable log-variances, convergence to s_k = log L_k."""

from __future__ import annotations

import math

import torch

from lightning_mtl.mtl.balancing import create_balancer


def test_value_and_weights():
    balancer = create_balancer("uncertainty", ["a", "b"], init_log_var=0.5)
    loss = balancer({"a": torch.tensor(2.0), "b": torch.tensor(3.0)})
    expected = math.exp(-0.5) * 2.0 + 0.5 + math.exp(-0.5) * 3.0 + 0.5
    torch.testing.assert_close(loss, torch.tensor(expected))
    torch.testing.assert_close(balancer.weights, torch.full((2,), math.exp(-0.5)))
    assert not balancer.weights.requires_grad


def test_log_variances_are_trained_by_the_module_optimizer():
    model = torch.nn.Module()
    model.balancer = create_balancer("uncertainty", ["a", "b"])
    assert any(p is model.balancer.log_vars for p in model.parameters())


def test_log_variances_converge_to_log_losses():
    balancer = create_balancer("uncertainty", ["a", "b"])
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.1)
    losses = {"a": torch.tensor(0.5), "b": torch.tensor(4.0)}
    for _ in range(300):
        optimizer.zero_grad()
        balancer(losses).backward()
        optimizer.step()
    torch.testing.assert_close(balancer.log_vars.detach(), torch.tensor([math.log(0.5), math.log(4.0)]), atol=1e-2,
                               rtol=0)
