"""GradNorm: the model gets exactly grad sum_k w_k L_k, the weights get L_grad's gradient and move to equalise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mtl.mtl.balancing import create_balancer


def _setup():
    torch.manual_seed(0)
    shared = nn.Linear(3, 4, bias=False)
    heads = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    with torch.no_grad():  # task a's gradients on the shared layer are ~50x larger than b's
        heads["a"].weight.mul_(10.0)
        heads["b"].weight.mul_(0.2)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    return shared, heads, x, y


def _losses(shared, heads, x, y):
    h = shared(x)
    return {task: (heads[task](h).squeeze(1) - y[:, i]).pow(2).mean() for i, task in enumerate(["a", "b"])}


def _grad_norm(loss, param):
    return torch.autograd.grad(loss, param, retain_graph=True)[0].norm()


def test_model_receives_exactly_the_weighted_loss_gradient():
    shared, heads, x, y = _setup()
    balancer = create_balancer("gradnorm", ["a", "b"])
    with torch.no_grad():
        balancer.task_weights.copy_(torch.tensor([0.7, 1.3]))
    params = [shared.weight, *heads.parameters()]
    losses = _losses(shared, heads, x, y)
    expected = torch.autograd.grad(0.7 * losses["a"] + 1.3 * losses["b"], params, retain_graph=True)
    balancer(losses, [shared.weight]).backward()
    for param, grad in zip(params, expected, strict=True):
        torch.testing.assert_close(param.grad, grad, atol=1e-6, rtol=1e-6)


def test_weight_gradient_is_that_of_the_gradnorm_loss():
    shared, heads, x, y = _setup()
    balancer = create_balancer("gradnorm", ["a", "b"])
    losses = _losses(shared, heads, x, y)
    norms = torch.stack([_grad_norm(losses[t], shared.weight) for t in ["a", "b"]])
    balancer(losses, [shared.weight]).backward()
    # First step: L(0) = L, so every r_k = 1 and the target is mean(G); d|G_k - target|/dw_k = sign(.) ||grad L_k||.
    g = norms  # weights are 1
    expected = torch.sign(g - g.mean()) * norms
    torch.testing.assert_close(balancer.task_weights.grad, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(balancer.initial_losses, torch.stack([losses["a"], losses["b"]]).detach())


def test_one_step_equalises_the_weighted_gradient_norms():
    shared, heads, x, y = _setup()
    balancer = create_balancer("gradnorm", ["a", "b"])
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.01)
    losses = _losses(shared, heads, x, y)
    norms = torch.stack([_grad_norm(losses[t], shared.weight) for t in ["a", "b"]]).detach()
    assert norms[0] > 10 * norms[1]
    gap_before = (norms[0] - norms[1]).abs()
    balancer(losses, [shared.weight]).backward()
    optimizer.step()
    balancer.after_step({k: v.detach() for k, v in losses.items()})
    w = balancer.task_weights.detach()
    assert w[0] < 1 < w[1]
    torch.testing.assert_close(w.sum(), torch.tensor(2.0))
    assert (w[0] * norms[0] - w[1] * norms[1]).abs() < gap_before


def test_initial_losses_are_kept_after_the_first_call():
    shared, heads, x, y = _setup()
    balancer = create_balancer("gradnorm", ["a", "b"])
    first = _losses(shared, heads, x, y)
    balancer(first, [shared.weight])
    balancer({k: 2 * v for k, v in _losses(shared, heads, x, y).items()}, [shared.weight])
    torch.testing.assert_close(balancer.initial_losses, torch.stack([first["a"], first["b"]]).detach())


def test_without_gradients_only_the_weighted_sum_is_returned():
    balancer = create_balancer("gradnorm", ["a", "b"])
    with torch.no_grad():
        balancer.task_weights.copy_(torch.tensor([0.5, 1.5]))
    out = balancer({"a": torch.tensor(2.0), "b": torch.tensor(4.0)})
    torch.testing.assert_close(out, torch.tensor(7.0))
    assert not bool(balancer.initialized)


def test_training_without_shared_params_raises():
    shared, heads, x, y = _setup()
    with pytest.raises(ValueError, match="shared_params"):
        create_balancer("gradnorm", ["a", "b"])(_losses(shared, heads, x, y))


def test_last_layer_norms_use_only_the_last_shared_weight():
    torch.manual_seed(0)
    first, last = nn.Linear(3, 5), nn.Linear(5, 4)
    heads = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    h = last(torch.relu(first(x)))
    losses = {t: (heads[t](h).squeeze(1) - y[:, i]).pow(2).mean() for i, t in enumerate(["a", "b"])}
    shared = [first.weight, first.bias, last.weight, last.bias]
    balancer = create_balancer("gradnorm", ["a", "b"], norm_params="last")
    assert balancer.select_params(shared) == [last.weight]
    balancer(losses, shared).backward(retain_graph=True)
    norms = torch.stack([_grad_norm(losses[t], last.weight) for t in ["a", "b"]])
    expected = torch.sign(norms - norms.mean()) * norms  # first step, weights 1 (see the test above)
    torch.testing.assert_close(balancer.task_weights.grad, expected, atol=1e-5, rtol=1e-5)
    everything = create_balancer("gradnorm", ["a", "b"], norm_params="all")
    assert everything.select_params(shared) == shared


def test_last_layer_needs_a_weight_matrix():
    balancer = create_balancer("gradnorm", ["a", "b"], norm_params="last")
    with pytest.raises(ValueError, match="norm_params='last' needs a shared weight with >= 2 dimensions"):
        balancer.select_params([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="norm_params must be 'all' or 'last'"):
        create_balancer("gradnorm", ["a", "b"], norm_params="first")
