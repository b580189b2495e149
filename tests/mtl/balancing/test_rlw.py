"""Random loss weighting: softmax of normal samples, reproducible under the global seed (as torchjd's Random)."""

from __future__ import annotations

import torch
from torchjd.scalarization import Random

from lightning_mtl.mtl.balancing import create_balancer


def test_matches_torchjd_random_under_the_same_seed():
    losses = torch.tensor([0.3, 2.0, 1.1])
    rlw = create_balancer("rlw", ["a", "b", "c"])
    torch.manual_seed(7)
    ours = rlw(dict(zip("abc", losses, strict=True)))
    torch.manual_seed(7)
    torch.testing.assert_close(ours, Random()(losses))
    torch.manual_seed(7)
    torch.testing.assert_close(rlw.weights, torch.softmax(torch.randn(3), dim=0))


def test_weights_are_on_the_simplex_and_change_every_step():
    rlw = create_balancer("rlw", ["a", "b", "c"])
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(1.0), "c": torch.tensor(1.0)}
    rlw(losses)
    first = rlw.weights
    torch.testing.assert_close(first.sum(), torch.tensor(1.0))
    assert (first > 0).all()
    rlw(losses)
    assert not torch.equal(first, rlw.weights)
