"""MGDA against the closed-form min-norm point of two gradients; the weights the solver-based aggregators report."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl.mtl.balancing import create_balancer


def _min_norm_alpha(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """argmin over alpha in [0, 1] of ||alpha g1 + (1 - alpha) g2||."""
    return ((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1)


@pytest.mark.parametrize("seed", range(5))
def test_mgda_is_the_min_norm_point_of_two_gradients(seed):
    gen = torch.Generator().manual_seed(seed)
    g1, g2 = torch.randn(8, generator=gen), 3 * torch.randn(8, generator=gen)
    alpha = _min_norm_alpha(g1, g2)
    mgda = create_balancer("mgda", ["a", "b"])
    out = mgda(torch.stack([g1, g2]))
    # torchjd's MGDA returns the min-norm point itself: weights on the simplex, no rescaling.
    torch.testing.assert_close(out, alpha * g1 + (1 - alpha) * g2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mgda.weights, torch.stack([alpha, 1 - alpha]), atol=1e-5, rtol=1e-5)


def test_mgda_clips_to_the_shorter_gradient_when_it_is_the_min_norm_point():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.1])
    assert _min_norm_alpha(g1, g2) == 1
    out = create_balancer("mgda", ["a", "b"])(torch.stack([g1, g2]))
    torch.testing.assert_close(out, g1, atol=1e-5, rtol=1e-5)


def test_mean_weights_and_direction():
    matrix = torch.randn(4, 6)
    mean = create_balancer("mean", list("abcd"))
    torch.testing.assert_close(mean(matrix), matrix.mean(0))
    torch.testing.assert_close(mean.weights, torch.full((4,), 0.25))


def test_upgrad_does_not_conflict_with_any_task():
    matrix = torch.tensor([[2.0, 0.0], [-0.9, 0.2], [0.0, 0.1]])
    out = create_balancer("upgrad", ["a", "b", "c"])(matrix)
    assert (matrix @ out >= -1e-6).all()
    assert (create_balancer("mean", ["a", "b", "c"])(matrix) @ matrix[1]) < 0  # the mean does conflict here


def test_imtl_g_projections_onto_unit_gradients_are_equal():
    matrix = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [0.0, -1.0, 3.0]])
    out = create_balancer("imtl_g", ["a", "b", "c"])(matrix)
    projections = matrix @ out / matrix.norm(dim=1)
    torch.testing.assert_close(projections, projections[:1].expand(3), atol=1e-5, rtol=1e-5)


def test_mgda_min_norm_point_analytic():
    """Two orthogonal gradients of norms 1 and 2: the min-norm point of their hull weighs them 4/5 and 1/5 (the point
    (4/5, 2/5), of norm 2/sqrt(5)); a gradient inside the hull of the others' is the answer when it is the smallest."""
    mgda = create_balancer("mgda", ["a", "b"])
    torch.testing.assert_close(mgda(torch.tensor([[1.0, 0.0], [0.0, 2.0]])), torch.tensor([0.8, 0.4]))
    torch.testing.assert_close(mgda.weights, torch.tensor([0.8, 0.2]))
    three = create_balancer("mgda", ["a", "b", "c"])
    out = three(torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.5, 0.5]]))  # (0.5, 0.5) is the hull's min-norm point
    torch.testing.assert_close(out, torch.tensor([0.5, 0.5]), atol=1e-6, rtol=0)
    assert three.weights.sum().item() == pytest.approx(1.0) and (three.weights >= 0).all()
    torch.testing.assert_close(mgda(torch.zeros(2, 3)), torch.zeros(3))  # all zero: any point, no NaN


def test_mgda_from_a_float32_gramian_matches_the_float64_solution_even_for_dependent_gradients():
    """The Gramian is taken in float32 (a float64 copy of a (K, D) matrix was the step's largest cost); with
    linearly dependent rows (g1 = 2 g0, g3 = g0 + g2) its rounding must not break the QP nor move the weights."""
    from lightning_mtl.mtl.balancing.aggregators import min_norm_weights

    g = torch.randn(2, 200_000, generator=torch.Generator().manual_seed(0))
    g[1] -= (g[1] @ g[0]) / (g[0] @ g[0]) * g[0] * 1.3  # the two base directions conflict
    matrix = torch.stack([g[0], 2 * g[0], g[1], g[0] + g[1]])
    weights = min_norm_weights(matrix)
    reference = min_norm_weights(matrix.double())
    assert weights.sum().item() == pytest.approx(1.0) and (weights >= 0).all()
    direction, exact = weights.double() @ matrix.double(), reference @ matrix.double()
    assert direction.norm().item() == pytest.approx(exact.norm().item(), rel=1e-5)
    assert ((direction - exact).norm() / exact.norm()).item() < 1e-3  # the min-norm point is unique; weights are not
