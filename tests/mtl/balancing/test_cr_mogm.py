"""CR-MOGM equals torchjd's CRMOGMWeighting around the same base weighting; the EMA formula; checkpoints resume."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tjd

from lightning_mtl.mtl.balancing import create_balancer

TASKS = ["a", "b", "c"]


def _matrices(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(5, generator=gen)
    return [torch.stack([base, -0.5 * base, torch.zeros(5)]) + torch.randn(3, 5, generator=gen) for _ in range(n)]


@pytest.mark.parametrize(
    ("kwargs", "weighting"),
    [
        ({"base_args": {"solver": "frank_wolfe"}}, lambda: tjd.MGDAWeighting()),  # torchjd's solver, not the QP
        ({"alpha": 0.5, "base": "upgrad"}, lambda: tjd.UPGradWeighting()),
        ({"base": "cagrad", "base_args": {"c": 0.5}}, lambda: tjd.CAGradWeighting(c=0.5)),
    ],
    ids=["mgda", "upgrad", "cagrad"],
)
def test_matches_torchjd(kwargs, weighting):
    ours = create_balancer("cr_mogm", TASKS, **kwargs)
    theirs = tjd.GramianWeightedAggregator(tjd.CRMOGMWeighting(weighting(), alpha=kwargs.get("alpha", 0.9)))
    for matrix in _matrices(4):
        torch.testing.assert_close(ours(matrix), theirs(matrix), atol=1e-6, rtol=0)


def test_initial_weights_match_torchjd():
    start = [0.2, 0.3, 0.5]
    ours = create_balancer("cr_mogm", TASKS, alpha=0.7, initial_weights=start, base_args={"solver": "frank_wolfe"})
    theirs = tjd.GramianWeightedAggregator(
        tjd.CRMOGMWeighting(tjd.MGDAWeighting(), alpha=0.7, initial_weights=torch.tensor(start)))
    for matrix in _matrices(3):
        torch.testing.assert_close(ours(matrix), theirs(matrix), atol=1e-6, rtol=0)


def test_exponential_moving_average_of_the_base_weights():
    m1, m2, m3 = _matrices(3)
    base = create_balancer("mgda", TASKS)
    hats = []
    for m in (m1, m2, m3):
        base(m)
        hats.append(base.weights)
    smoothed = create_balancer("cr_mogm", TASKS, alpha=0.8)
    torch.testing.assert_close(smoothed(m1), hats[0] @ m1)  # lambda_0 = lambda^_1: the first update is MGDA's
    lam = 0.8 * hats[0] + 0.2 * hats[1]
    torch.testing.assert_close(smoothed(m2), lam @ m2)
    lam = 0.8 * lam + 0.2 * hats[2]
    torch.testing.assert_close(smoothed(m3), lam @ m3)
    torch.testing.assert_close(smoothed.weights, lam)
    unsmoothed = create_balancer("cr_mogm", TASKS, alpha=0.0)
    torch.testing.assert_close(unsmoothed(m3), base(m3))


def test_checkpoint_resumes_exactly_with_a_stateful_base():
    matrices = _matrices(5)
    trained = create_balancer("cr_mogm", TASKS, base="modo")
    for matrix in matrices[:2]:
        trained(matrix)
    state = trained.state_dict()
    assert {"smoothed", "started"} <= set(state) and any(k.startswith("base.") for k in state)
    restored = create_balancer("cr_mogm", TASKS, base="modo")
    restored.load_state_dict(state)
    for matrix in matrices[2:]:
        torch.testing.assert_close(restored(matrix), trained(matrix), atol=0, rtol=0)


def test_bases_without_weights_are_rejected():
    with pytest.raises(ValueError, match="loss weighting"):
        create_balancer("cr_mogm", TASKS, base="equal")
    graddrop = create_balancer("cr_mogm", TASKS, base="graddrop")  # per-coordinate masks: no task weights
    with pytest.raises(ValueError, match="does not combine the task gradients linearly"):
        graddrop(_matrices(1)[0])
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        create_balancer("cr_mogm", TASKS, alpha=1.5)
