"""Every registered aggregator returns exactly what its torchjd aggregator returns, and the weights it reports."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tjd

from lightning_mtl.mtl.balancing import create_balancer, list_balancers

# Nash-MTL's cvxpy problem is not DPP and ECOS may report an inaccurate solution: torchjd's behaviour, not ours.
pytestmark = [pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP"),
              pytest.mark.filterwarnings("ignore:Solution may be inaccurate")]

# name -> (our hyper-parameters, torchjd's aggregator with the same settings, built for k tasks)
REFERENCES = {
    "mean": ({}, lambda k: tjd.Mean()),
    "pcgrad": ({}, lambda k: tjd.PCGrad()),
    "mgda": ({"solver": "frank_wolfe"}, lambda k: tjd.MGDA()),  # the exact QP (default): test_aggregators.py
    "cagrad": ({}, lambda k: tjd.CAGrad(c=0.4)),
    "nash_mtl": ({}, lambda k: tjd.NashMTL(n_tasks=k)),
    "imtl_g": ({}, lambda k: tjd.IMTLG()),
    "aligned_mtl": ({}, lambda k: tjd.AlignedMTL()),
    "upgrad": ({}, lambda k: tjd.UPGrad()),
    "graddrop": ({}, lambda k: tjd.GradDrop()),
    "gradvac": ({}, lambda k: tjd.GradVac()),
    "conflict_free": ({}, lambda k: tjd.ConFIG()),
    "dualproj": ({}, lambda k: tjd.DualProj()),
    "fairgrad": ({}, lambda k: tjd.FairGrad(alpha=1.0)),
    "excess_mtl": ({}, lambda k: tjd.ExcessMTL()),
    "modo": ({}, lambda k: tjd.GramianWeightedAggregator(tjd.MoDoWeighting())),
    "sdmgrad": ({}, lambda k: tjd.GramianWeightedAggregator(tjd.SDMGradWeighting())),
    "cr_mogm": ({"base_args": {"solver": "frank_wolfe"}},
                lambda k: tjd.GramianWeightedAggregator(tjd.CRMOGMWeighting(tjd.MGDAWeighting()))),
    "pcd": ({}, lambda k: tjd.PCD()),
    "rgw": ({}, lambda k: tjd.Random()),
}
# aggregators torchjd does not have: tested against LibMTL 1.1.5 or analytic cases in their own test files
NOT_IN_TORCHJD = {"db_mtl", "imtl", "moco"}
# ConFIG's float32 update lies ~2e-5 outside the span of the rows (torchjd's own rounding): its weights, recovered in
# float64, reproduce it to that tolerance only
WEIGHTS_ATOL = {"conflict_free": 1e-4}
WITH_ARGUMENTS = {
    "cagrad": ({"c": 0.8, "norm_eps": 1e-3}, lambda k: tjd.CAGrad(c=0.8, norm_eps=1e-3)),
    "mgda": ({"solver": "frank_wolfe", "epsilon": 1e-4, "max_iters": 7}, lambda k: tjd.MGDA(epsilon=1e-4, max_iters=7)),
    "nash_mtl": ({"max_norm": 0.0, "optim_niter": 5}, lambda k: tjd.NashMTL(n_tasks=k, max_norm=0.0, optim_niter=5)),
    "aligned_mtl": (
        {"pref_vector": [0.5, 0.25, 0.25], "scale_mode": "rmse"},
        lambda k: tjd.AlignedMTL(pref_vector=torch.tensor([0.5, 0.25, 0.25]), scale_mode="rmse"),
    ),
    "upgrad": ({"pref_vector": [2.0, 1.0, 0.5]}, lambda k: tjd.UPGrad(pref_vector=torch.tensor([2.0, 1.0, 0.5]))),
    "graddrop": ({"leak": [0.1, 0.5, 0.0]}, lambda k: tjd.GradDrop(leak=torch.tensor([0.1, 0.5, 0.0]))),
    "gradvac": ({"beta": 0.1}, lambda k: tjd.GradVac(beta=0.1)),
}


def test_every_registered_aggregator_has_a_reference():
    assert sorted([*REFERENCES, *NOT_IN_TORCHJD]) == list_balancers("aggregator")


def _matrices(k: int, d: int, conflicting: bool, seed: int) -> list[torch.Tensor]:
    """Three (k, d) gradient matrices; ``conflicting`` makes the rows nearly (anti-)parallel with opposite signs."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        if conflicting:
            base = torch.randn(d, generator=gen)
            signs = torch.tensor([(-1.0) ** i * (i + 1) for i in range(k)])[:, None]
            out.append(signs * base + 0.1 * torch.randn(k, d, generator=gen))
        else:
            out.append(torch.randn(k, d, generator=gen))
    return out


def _run(aggregator, matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    torch.manual_seed(1234)  # the random methods (PCGrad, GradDrop, GradVac) draw from the global generator
    return [aggregator(m) for m in matrices]


@pytest.mark.parametrize("conflicting", [False, True], ids=["random", "conflicting"])
@pytest.mark.parametrize("d", [5, 100])
@pytest.mark.parametrize("k", [2, 4, 7])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_matches_torchjd(name, k, d, conflicting):
    matrices = _matrices(k, d, conflicting, seed=10 * k + d)
    tasks = [f"t{i}" for i in range(k)]
    kwargs, reference = REFERENCES[name]
    ours = create_balancer(name, tasks, **kwargs)
    # Three calls in a row: stateful methods (Nash-MTL's warm start, GradVac's EMA) must evolve identically.
    outputs = _run(ours, matrices)
    for mine, theirs in zip(outputs, _run(reference(k), matrices), strict=True):
        assert mine.shape == (d,)
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)
    if name == "graddrop":
        assert ours.weights is None
    else:  # the reported weights are the ones of the last call
        assert ours.weights.shape == (k,)
        atol = WEIGHTS_ATOL.get(name, 1e-5)
        torch.testing.assert_close(ours.weights @ matrices[-1], outputs[-1], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(WITH_ARGUMENTS))
def test_hyper_parameters_reach_torchjd(name):
    matrices = _matrices(3, 20, conflicting=True, seed=3)
    kwargs, reference = WITH_ARGUMENTS[name]
    ours = create_balancer(name, ["a", "b", "c"], **kwargs)
    for mine, theirs in zip(_run(ours, matrices), _run(reference(3), matrices), strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)
    # The default settings give a different answer, so the comparison above did test the arguments.
    default = create_balancer(name, ["a", "b", "c"])
    assert not all(torch.allclose(a, b) for a, b in zip(_run(default, matrices), _run(ours, matrices), strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["mean", "upgrad", "mgda", "imtl_g"])
def test_half_precision_is_computed_in_float32(name, dtype):
    matrix = _matrices(3, 50, conflicting=True, seed=5)[0].to(dtype)
    out = create_balancer(name, ["a", "b", "c"])(matrix)
    assert out.dtype == dtype
    expected = create_balancer(name, ["a", "b", "c"])(matrix.float())  # the same (rounded) inputs in float32
    torch.testing.assert_close(out, expected.to(dtype), atol=0, rtol=0)


def test_float64_is_kept():
    matrix = _matrices(3, 10, conflicting=False, seed=6)[0].double()
    out = create_balancer("upgrad", ["a", "b", "c"])(matrix)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, tjd.UPGrad()(matrix))


@pytest.mark.parametrize("name", ["mean", "pcgrad", "graddrop"])
def test_wrong_matrix_shape_raises(name):
    aggregator = create_balancer(name, ["a", "b", "c"])
    with pytest.raises(ValueError, match="one row per task"):
        aggregator(torch.randn(2, 5))
    with pytest.raises(ValueError, match="one row per task"):
        aggregator(torch.randn(3))


@pytest.mark.parametrize(("name", "argument"), [("upgrad", "pref_vector"), ("aligned_mtl", "pref_vector"),
                                                ("graddrop", "leak")])
def test_vector_argument_of_wrong_length_raises(name, argument):
    with pytest.raises(ValueError, match=f"{argument} needs one entry per task"):
        create_balancer(name, ["a", "b", "c"], **{argument: [1.0, 1.0]})
