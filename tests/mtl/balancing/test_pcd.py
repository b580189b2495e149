"""PCD equals torchjd's PCD (primary first, or reordered); the closed form for two tasks; the EMA is checkpointed."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tjd

from lightning_mtl.mtl.balancing import create_balancer

TASKS = ["a", "b", "c"]


def _matrices(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(6, generator=gen)
    return [torch.stack([base, -base, 0.5 * base]) + torch.randn(3, 6, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("tau", [0.02, 0.3, [0.5, 0.1]])
def test_matches_torchjd(tau):
    ours = create_balancer("pcd", TASKS, tau=tau, beta=0.9)
    theirs = tjd.PCD(tau=torch.tensor(tau, dtype=torch.float64) if isinstance(tau, list) else tau, beta=0.9)
    for matrix in _matrices(4):
        torch.testing.assert_close(ours(matrix), theirs(matrix), atol=1e-6, rtol=0)


def test_primary_task_reorders_the_rows():
    ours = create_balancer("pcd", TASKS, tau=0.2, primary="b")
    theirs = tjd.PCD(tau=0.2)
    for matrix in _matrices(3):
        out = ours(matrix)
        torch.testing.assert_close(out, theirs(matrix[[1, 0, 2]]), atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.weights @ matrix, out, atol=1e-5, rtol=1e-5)  # weights in task order


@pytest.mark.parametrize("tau", [0.0, 0.2, 0.6])
def test_two_tasks_closed_form(tau):
    """At the first call the normalised gradients are unit vectors u_1, u_2; the projection of u_1 onto
    {d : u_2 . d >= tau} is u_1 + max(0, tau - u_1 . u_2) u_2, then rescaled to ||g_1||."""
    g1, g2 = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([-1.0, 1.0, 0.5])
    u1, u2 = g1 / g1.norm(), g2 / g2.norm()
    d = u1 + (tau - u1 @ u2).clamp_min(0) * u2
    out = create_balancer("pcd", ["a", "b"], tau=tau, eps=0.0)(torch.stack([g1, g2]))
    torch.testing.assert_close(out, d * g1.norm() / d.norm())
    assert out @ u2 / out.norm() >= tau / d.norm() - 1e-6  # the secondary task gets its guaranteed share


def test_a_primary_gradient_that_helps_enough_is_kept():
    g = torch.tensor([[1.0, 0.5], [1.0, 0.0], [0.5, 1.0]])
    torch.testing.assert_close(create_balancer("pcd", TASKS, tau=0.1)(g), g[0])


def test_checkpoint_resumes_exactly():
    matrices = _matrices(5)
    trained = create_balancer("pcd", TASKS, tau=0.3, beta=0.5, primary="c")
    assert any(key.endswith("_sq_norm_ema") for key in trained.state_dict())
    for matrix in matrices[:2]:
        trained(matrix)
    restored = create_balancer("pcd", TASKS, tau=0.3, beta=0.5, primary="c")
    restored.load_state_dict(trained.state_dict())
    for matrix in matrices[2:]:
        torch.testing.assert_close(restored(matrix), trained(matrix), atol=0, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="primary must be one of"):
        create_balancer("pcd", TASKS, primary="d")
    with pytest.raises(ValueError, match="one value per secondary task"):
        create_balancer("pcd", TASKS, tau=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="tau"):
        create_balancer("pcd", TASKS, tau=1.5)
