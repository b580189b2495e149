"""RGW draws the same weights as torchjd's Random from the same seed; they lie on the simplex and change per call."""

from __future__ import annotations

import torch
import torchjd.aggregation as tjd

from lightning_mtl.mtl.balancing import create_balancer

TASKS = ["a", "b", "c", "d"]


def test_matches_torchjd_from_the_same_seed():
    matrix = torch.randn(4, 9)
    ours, theirs = create_balancer("rgw", TASKS), tjd.Random()
    for seed in range(3):
        torch.manual_seed(seed)
        mine = ours(matrix)
        torch.manual_seed(seed)
        torch.testing.assert_close(mine, theirs(matrix), atol=1e-6, rtol=0)


def test_weights_are_a_fresh_softmax_of_normal_draws():
    matrix = torch.randn(4, 9)
    rgw = create_balancer("rgw", TASKS)
    torch.manual_seed(0)
    z = torch.randn(4)
    torch.manual_seed(0)
    out = rgw(matrix)
    torch.testing.assert_close(rgw.weights, torch.softmax(z, dim=0))
    assert (rgw.weights > 0).all()
    torch.testing.assert_close(rgw.weights.sum(), torch.tensor(1.0))
    torch.testing.assert_close(out, rgw.weights @ matrix)
    first = rgw.weights
    rgw(matrix)
    assert not torch.equal(first, rgw.weights)


def test_expected_update_is_the_mean_gradient():
    """Exchangeable weights with sum 1 have mean 1/K: on average RGW follows the mean gradient."""
    matrix = torch.randn(4, 9)
    rgw = create_balancer("rgw", TASKS)
    torch.manual_seed(0)
    average = torch.stack([rgw(matrix) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(average, matrix.mean(0), atol=0.05, rtol=0)
