"""SDMGrad equals torchjd's SDMGrad weighting on the Gramian; lambda_ = 0 converges to MGDA and a large lambda_ to
the target direction; its warm start is checkpointed."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tjd

from lightning_mtl.mtl.balancing import create_balancer

TASKS = ["a", "b", "c"]


# few, short inner steps: the warm start changes the answer (long solves reach the same weights from anywhere)
WARM = {"n_iter": 3, "lr": 0.5}


def _matrices(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 5, generator=gen) * torch.tensor([[0.5], [1.0], [2.0]]) for _ in range(n)]


@pytest.mark.parametrize("kwargs", [{}, {"lambda_": 1.0, "n_iter": 5, "pref_vector": [0.6, 0.3, 0.1]},
                                    {"lr": 1.0, "momentum": 0.0}])
def test_matches_torchjd(kwargs):
    ours = create_balancer("sdmgrad", TASKS, **kwargs)
    theirs_args = dict(kwargs)
    if "pref_vector" in theirs_args:
        theirs_args["pref_vector"] = torch.tensor(theirs_args["pref_vector"])
    theirs = tjd.GramianWeightedAggregator(tjd.SDMGradWeighting(**theirs_args))
    for matrix in _matrices(4):
        torch.testing.assert_close(ours(matrix), theirs(matrix), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.weights.sum(), torch.tensor(1.0))


def test_lambda_zero_converges_to_mgda():
    g1, g2 = torch.tensor([1.0, 0.2, 0.0]), torch.tensor([-0.5, 1.0, 0.3])
    alpha = ((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1)
    sdmgrad = create_balancer("sdmgrad", ["a", "b"], lambda_=0.0, lr=0.5, momentum=0.0, n_iter=50)
    for _ in range(10):  # warm-started: every call continues the inner solve
        out = sdmgrad(torch.stack([g1, g2]))
    torch.testing.assert_close(sdmgrad.weights, torch.stack([alpha, 1 - alpha]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, alpha * g1 + (1 - alpha) * g2, atol=1e-5, rtol=0)


def test_a_large_lambda_follows_the_target_direction():
    matrix = _matrices(1)[0]
    pref = torch.tensor([0.2, 0.5, 0.3])
    out = create_balancer("sdmgrad", TASKS, lambda_=1e6, pref_vector=pref.tolist())(matrix)
    torch.testing.assert_close(out, pref @ matrix, atol=1e-5, rtol=0)


def test_checkpoint_resumes_exactly():
    matrices = _matrices(4)
    trained = create_balancer("sdmgrad", TASKS, **WARM)
    for matrix in matrices[:2]:
        trained(matrix)
    restored = create_balancer("sdmgrad", TASKS, **WARM)
    restored.load_state_dict(trained.state_dict())
    expected = [trained(matrix) for matrix in matrices[2:]]
    for matrix, out in zip(matrices[2:], expected, strict=True):
        torch.testing.assert_close(restored(matrix), out, atol=0, rtol=0)
    fresh = create_balancer("sdmgrad", TASKS, **WARM)
    assert not torch.allclose(fresh(matrices[2]), expected[0])  # without the warm start the answer differs


def test_a_float64_call_continues_the_float32_warm_start():
    matrices = _matrices(4)
    reference, mixed = create_balancer("sdmgrad", TASKS, **WARM), create_balancer("sdmgrad", TASKS, **WARM)
    for matrix in matrices[:2]:
        reference(matrix)
        mixed(matrix)
    for matrix in matrices[2:]:
        out = mixed(matrix.double())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out.float(), reference(matrix), atol=1e-6, rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="momentum"):
        create_balancer("sdmgrad", TASKS, momentum=1.0)
    with pytest.raises(ValueError, match="one entry per task"):
        create_balancer("sdmgrad", TASKS, pref_vector=[1.0])
