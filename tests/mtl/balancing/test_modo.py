"""MoDo equals torchjd's MoDo weighting on the Gramian; without regularisation it converges to MGDA's weights; its
lambda is checkpointed and survives device/dtype changes."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tjd

from lightning_mtl.mtl.balancing import create_balancer

TASKS = ["a", "b", "c"]


def _matrices(n: int, k: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(k, 5, generator=gen) for _ in range(n)]


@pytest.mark.parametrize(("gamma", "rho"), [(0.1, 0.1), (0.02, 0.0)])
def test_matches_torchjd(gamma, rho):
    ours = create_balancer("modo", TASKS, gamma=gamma, rho=rho)
    theirs = tjd.GramianWeightedAggregator(tjd.MoDoWeighting(gamma=gamma, rho=rho))
    for matrix in _matrices(5):
        torch.testing.assert_close(ours(matrix), theirs(matrix), atol=1e-6, rtol=0)
    assert (ours.weights >= 0).all()
    torch.testing.assert_close(ours.weights.sum(), torch.tensor(1.0))


def test_one_step_is_a_projected_gradient_step():
    g = torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.2, 0.2]])
    modo = create_balancer("modo", TASKS, gamma=0.1, rho=0.1)
    lam = torch.full((3,), 1 / 3)
    step = lam - 0.1 * (g @ g.T @ lam + 0.1 * lam)  # stays inside the simplex here: the projection only shifts it
    expected = step - (step.sum() - 1) / 3
    assert (expected > 0).all()
    torch.testing.assert_close(modo(g), expected @ g)


def test_without_regularisation_it_converges_to_mgda():
    g1, g2 = torch.tensor([1.0, 0.2, 0.0]), torch.tensor([-0.5, 1.0, 0.3])
    alpha = ((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1)  # MGDA's min-norm weight on g1
    modo = create_balancer("modo", ["a", "b"], gamma=0.2, rho=0.0)
    for _ in range(200):
        out = modo(torch.stack([g1, g2]))
    torch.testing.assert_close(modo.weights, torch.stack([alpha, 1 - alpha]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, alpha * g1 + (1 - alpha) * g2, atol=1e-5, rtol=0)


def test_checkpoint_resumes_exactly():
    matrices = _matrices(5)
    trained = create_balancer("modo", TASKS)
    assert any(key.endswith("_lambda") for key in trained.state_dict())  # present before the first call
    for matrix in matrices[:2]:
        trained(matrix)
    restored = create_balancer("modo", TASKS)
    restored.load_state_dict(trained.state_dict())
    for matrix in matrices[2:]:
        torch.testing.assert_close(restored(matrix), trained(matrix), atol=0, rtol=0)


def test_a_float64_call_continues_the_float32_state():
    matrices = _matrices(4)
    reference, mixed = create_balancer("modo", TASKS), create_balancer("modo", TASKS)
    for matrix in matrices[:2]:
        reference(matrix)
        mixed(matrix)
    for matrix in matrices[2:]:
        out = mixed(matrix.double())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out.float(), reference(matrix), atol=1e-6, rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="gamma > 0"):
        create_balancer("modo", TASKS, gamma=0.0)
