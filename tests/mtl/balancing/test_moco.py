"""MoCo: the simplex projection, tracking with beta = 1, lambda on the simplex, a hand computation of two steps (both
variants), convergence to MGDA's weights, lazy state in checkpoints, errors."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl.mtl.balancing import create_balancer
from lightning_mtl.mtl.balancing.moco import project_to_simplex

TASKS = ["a", "b", "c"]


def _matrix(seed: int, k: int = 3, d: int = 6) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed))


def test_simplex_projection():
    torch.testing.assert_close(project_to_simplex(torch.tensor([0.2, 0.3, 0.5])), torch.tensor([0.2, 0.3, 0.5]))
    torch.testing.assert_close(project_to_simplex(torch.tensor([2.0, 0.0])), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(project_to_simplex(torch.tensor([0.5, 0.5, 0.5])), torch.full((3,), 1 / 3))
    for seed in range(5):
        v = 3 * torch.randn(5, generator=torch.Generator().manual_seed(seed))
        p = project_to_simplex(v)
        assert (p >= 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
        # optimality: p = max(v - tau, 0) for one tau, and no simplex vertex is closer to v than p along its edge
        tau = (v - p)[p > 0]
        torch.testing.assert_close(tau, tau.mean().expand_as(tau))
        assert ((v - tau.mean())[p == 0] <= 1e-6).all()


def test_one_task_with_beta_one_returns_its_gradient():
    moco = create_balancer("moco", ["a"], beta=1.0, beta_sigma=0.0)
    for seed in range(3):
        g = _matrix(seed, k=1)
        torch.testing.assert_close(moco(g), g[0])


def test_beta_one_tracks_the_current_matrix_and_lambda_stays_on_the_simplex():
    for update in ("projection", "softmax"):
        moco = create_balancer("moco", TASKS, beta=1.0, beta_sigma=0.0, gamma=2.0, gamma_sigma=0.0,
                               lambda_update=update)
        for seed in range(5):
            m = _matrix(seed)
            out = moco(m)
            torch.testing.assert_close(moco.tracked, m)
            torch.testing.assert_close(out, moco.lambd @ m)
            assert (moco.lambd >= 0).all() and torch.isclose(moco.lambd.sum(), torch.tensor(1.0))
        if update == "projection":
            assert (moco.lambd == 0).any()  # a large step reaches a face of the simplex


def test_two_steps_by_hand():
    g1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    g2 = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    moco = create_balancer("moco", ["a", "b"], beta=0.5, beta_sigma=1.0, gamma=0.1, gamma_sigma=1.0, rho=0.5)
    # step 1: beta_1 = 0.5, Y = 0.5 g1 = diag(0.5, 1); Y Y^T + rho I = diag(0.75, 1.5); lambda = (0.5, 0.5)
    # moved = lambda - 0.1 * (0.375, 0.75) = (0.4625, 0.425) -> projection: + (1 - 0.8875) / 2 each
    out = moco(g1)
    torch.testing.assert_close(moco.lambd, torch.tensor([0.51875, 0.48125]))
    torch.testing.assert_close(out, torch.tensor([0.5 * 0.51875, 1.0 * 0.48125]))
    # step 2: beta_2 = 0.25, Y = 0.75 Y + 0.25 g2 = diag(1.125, 1); gram + rho I = diag(1.765625, 1.5)
    out = moco(g2)
    moved = torch.tensor([0.51875, 0.48125]) - 0.05 * torch.tensor([1.765625 * 0.51875, 1.5 * 0.48125])
    lambd = moved + (1 - moved.sum()) / 2
    torch.testing.assert_close(moco.lambd, lambd)
    torch.testing.assert_close(out, torch.tensor([1.125, 1.0]) * lambd)


def test_two_steps_by_hand_as_the_authors_code():
    # LibMTL's variant: h_k = L_k g_k / ||g_k||, lambda <- softmax(lambda - gamma_t (Y Y^T + rho I) lambda).
    g, losses = torch.tensor([[3.0, 4.0], [0.0, -2.0]]), torch.tensor([2.0, 0.5])
    moco = create_balancer("moco", ["a", "b"], lambda_update="softmax", gradient_scaling="loss", eps=0.0)
    assert moco.needs_losses
    h = torch.tensor([[1.2, 1.6], [0.0, -0.5]])
    y, lambd = torch.zeros(2, 2), torch.full((2,), 0.5)
    for t in (1, 2):
        y = y - 0.5 / t**0.5 * (y - h)
        lambd = torch.softmax(lambd - 0.1 / t**0.5 * (y @ y.T) @ lambd, dim=0)
        torch.testing.assert_close(moco(g, losses), y.T @ lambd)
    torch.testing.assert_close(moco.lambd, lambd)
    with pytest.raises(ValueError, match="needs the"):
        moco(g)


def test_constant_gradients_reach_mgdas_weights():
    # With exact, constant gradients MoCo's lambda iteration is projected gradient descent on |G^T lambda|^2 / 2.
    g = torch.tensor([[1.0, 0.0, 1.0], [-0.5, 1.0, 0.2]])
    moco = create_balancer("moco", ["a", "b"], beta=1.0, beta_sigma=0.0, gamma=0.2, gamma_sigma=0.0)
    for _ in range(300):
        out = moco(g)
    a = ((g[1] - g[0]) @ g[1] / (g[1] - g[0]).pow(2).sum()).clamp(0, 1)  # two-task min-norm weight of g[0]
    torch.testing.assert_close(moco.lambd, torch.stack([a, 1 - a]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, a * g[0] + (1 - a) * g[1], atol=1e-5, rtol=0)


def test_lazy_state_round_trips_and_evaluation_leaves_it():
    fresh_state = create_balancer("moco", TASKS).state_dict()
    assert fresh_state["tracked"].shape == (3, 0)
    moco = create_balancer("moco", TASKS)
    for seed in range(3):
        moco(_matrix(seed))
    state = {k: v.clone() for k, v in moco.state_dict().items()}
    moco.eval()
    moco(_matrix(7))
    for key, value in moco.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0)
    moco.train()
    restored = create_balancer("moco", TASKS)
    restored.load_state_dict(state)
    for seed in range(3, 5):
        torch.testing.assert_close(restored(_matrix(seed)), moco(_matrix(seed)), atol=0, rtol=0)
    restored.load_state_dict(fresh_state)  # back to the placeholder: a new start
    assert restored.tracked.shape == (3, 0) and int(restored.steps) == 0


def test_errors():
    moco = create_balancer("moco", TASKS)
    moco(_matrix(0))
    with pytest.raises(ValueError, match="same entries at every step"):
        moco(_matrix(1, d=5))
    with pytest.raises(ValueError, match="beta"):
        create_balancer("moco", TASKS, beta=0.0)
    with pytest.raises(ValueError, match="lambda_update"):
        create_balancer("moco", TASKS, lambda_update="mirror")
    with pytest.raises(ValueError, match="gradient_scaling"):
        create_balancer("moco", TASKS, gradient_scaling="l2")
