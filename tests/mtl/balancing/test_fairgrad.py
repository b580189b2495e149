"""FairGrad equals torchjd's FairGrad; its weights solve the alpha-fairness condition (G G^T) w = w^(-1/alpha)."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tjd

from lightning_mtl.mtl.balancing import create_balancer

TASKS = ["a", "b", "c"]


def _matrix(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 10, generator=gen) * torch.tensor([[0.5], [1.0], [2.0]])


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_matches_torchjd(alpha):
    ours, theirs = create_balancer("fairgrad", TASKS, alpha=alpha), tjd.FairGrad(alpha=alpha)
    for seed in range(2):
        matrix = _matrix(seed)
        torch.testing.assert_close(ours(matrix), theirs(matrix), atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_weights_solve_the_fairness_condition(alpha):
    matrix = _matrix(5).double()
    fairgrad = create_balancer("fairgrad", TASKS, alpha=alpha)
    fairgrad(matrix)
    w = fairgrad.weights
    assert (w > 0).all()
    # alpha = 1 is proportional fairness: Nash-MTL's bargaining condition (G G^T) w = 1 / w
    torch.testing.assert_close(matrix @ matrix.T @ w, w.pow(-1 / alpha), atol=1e-4, rtol=1e-4)


def test_alpha_zero_is_the_mean_gradient():
    matrix = _matrix(1)
    torch.testing.assert_close(create_balancer("fairgrad", TASKS, alpha=0.0)(matrix), matrix.mean(0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        create_balancer("fairgrad", TASKS, alpha=-1.0)
    with pytest.raises(ValueError, match="max_iters"):
        create_balancer("fairgrad", TASKS, max_iters=0)
