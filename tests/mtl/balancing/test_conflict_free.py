"""ConFIG equals torchjd's ConFIG; its direction has equal cosines with the task gradients; the weights it reports."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tjd

from lightning_mtl.mtl.balancing import create_balancer


def _matrices(k: int, d: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    signs = torch.tensor([(-1.0) ** i for i in range(k)])[:, None]
    return [signs * torch.randn(d, generator=gen) + 0.5 * torch.randn(k, d, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("pref", [None, [1.0, 2.0, 0.5]])
@pytest.mark.parametrize("d", [3, 40])
def test_matches_torchjd(pref, d):
    tasks = ["a", "b", "c"]
    ours = create_balancer("conflict_free", tasks, pref_vector=pref)
    theirs = tjd.ConFIG(pref_vector=None if pref is None else torch.tensor(pref))
    for matrix in _matrices(3, d, seed=d):
        torch.testing.assert_close(ours(matrix), theirs(matrix), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_equal_cosines_and_projection_length(seed):
    matrix = _matrices(4, 12, seed)[0]
    out = create_balancer("conflict_free", list("abcd"))(matrix)
    cosines = matrix @ out / (matrix.norm(dim=1) * out.norm())
    torch.testing.assert_close(cosines, cosines[:1].expand(4), atol=1e-5, rtol=0)
    assert cosines[0] > 0  # conflict-free: every task loss decreases to first order
    unit = out / out.norm()
    torch.testing.assert_close(out.norm(), (matrix @ unit).sum(), atol=1e-5, rtol=1e-5)


def test_cosines_follow_the_preference_vector():
    matrix = _matrices(3, 10, seed=7)[0]
    pref = torch.tensor([1.0, 2.0, 3.0])
    out = create_balancer("conflict_free", ["a", "b", "c"], pref_vector=pref.tolist())(matrix)
    cosines = matrix @ out / (matrix.norm(dim=1) * out.norm())
    torch.testing.assert_close(cosines / cosines[0], pref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("k", "d"), [(3, 20), (7, 5), (7, 100)], ids=["independent", "dependent", "ill-conditioned"])
def test_weights_reproduce_the_update(k, d):
    gen = torch.Generator().manual_seed(k + d)
    base = torch.randn(d, generator=gen)
    signs = torch.tensor([(-1.0) ** i * (i + 1) for i in range(k)])[:, None]
    matrix = signs * base + 0.1 * torch.randn(k, d, generator=gen)  # nearly (anti-)parallel rows
    config = create_balancer("conflict_free", [f"t{i}" for i in range(k)])
    out = config(matrix)
    assert config.weights.shape == (k,) and config.weights.dtype == torch.float32
    # as close as torchjd's float32 update is to the span of the rows; a float32 Gramian would miss by ~100%
    assert (config.weights.double() @ matrix.double() - out.double()).norm() < 1e-4 * out.norm()


def test_a_zero_gradient_is_ignored():
    matrix = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    out = create_balancer("conflict_free", ["a", "b", "c"])(matrix)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, tjd.ConFIG()(matrix))
    torch.testing.assert_close(out @ matrix[0] / out.norm(), out @ matrix[2] / (2 * out.norm()))
