"""DualProj equals torchjd's DualProj; its update conflicts with no task and keeps a non-conflicting average."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tjd
from torchjd.linalg import QuadprogProjector

from lightning_mtl.mtl.balancing import create_balancer

TASKS = ["a", "b", "c"]


def _conflicting(seed: int, d: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen)
    return torch.stack([3 * base, -base, torch.zeros(d)]) + 0.3 * torch.randn(3, d, generator=gen)


@pytest.mark.parametrize("pref", [None, [0.5, 0.3, 0.2]])
@pytest.mark.parametrize("reg_eps", [1e-4, 1e-2])
@pytest.mark.parametrize("seed", range(2))
def test_matches_torchjd(pref, reg_eps, seed):
    matrix = _conflicting(seed)
    ours = create_balancer("dualproj", TASKS, pref_vector=pref, reg_eps=reg_eps)
    projector = QuadprogProjector(reg_eps=reg_eps)
    theirs = tjd.DualProj(pref_vector=None if pref is None else torch.tensor(pref), projector=projector)
    torch.testing.assert_close(ours(matrix), theirs(matrix), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_no_task_conflicts_with_the_exact_projection(seed):
    matrix = _conflicting(seed).double()
    assert (matrix @ matrix.mean(0) < 0).any()  # the plain average does conflict
    dualproj = create_balancer("dualproj", TASKS, reg_eps=0.0)
    out = dualproj(matrix)
    assert (matrix @ out >= -1e-9).all()
    # the update is the average plus non-negative multiples of the rows (the dual variables)
    assert (dualproj.weights >= 1 / 3 - 1e-9).all()
    torch.testing.assert_close(dualproj.weights @ matrix, out)
    # KKT: a row whose constraint is not active keeps its average weight; an active one is orthogonal to the update
    active = dualproj.weights > 1 / 3 + 1e-9
    assert active.any()
    torch.testing.assert_close(matrix[active] @ out, torch.zeros(int(active.sum()), dtype=out.dtype), atol=1e-9,
                               rtol=0)


def test_regularisation_relaxes_the_constraints_by_a_known_amount():
    matrix = _conflicting(0)
    dualproj = create_balancer("dualproj", TASKS)  # reg_eps = 1e-4 on the trace-normalised Gramian
    out = dualproj(matrix)
    bound = -1e-4 * (matrix @ matrix.T).trace() * dualproj.weights
    assert (matrix @ out >= bound - 1e-5).all()


def test_a_non_conflicting_average_is_kept():
    matrix = torch.tensor([[1.0, 0.2, 0.0], [0.8, -0.1, 0.3], [1.2, 0.0, -0.2]])
    assert (matrix @ matrix.mean(0) > 0).all()
    torch.testing.assert_close(create_balancer("dualproj", TASKS)(matrix), matrix.mean(0), atol=1e-6, rtol=1e-6)
