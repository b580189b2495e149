"""ExcessMTL equals torchjd's ExcessMTL, follows the paper's excess-risk update and resumes from checkpoints."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tjd

from lightning_mtl.mtl.balancing import create_balancer

TASKS = ["a", "b", "c"]


def _matrices(n: int, seed: int = 0, d: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([[0.5], [1.0], [2.0]])
    return [scale * torch.randn(3, d, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("warmup", [0, 2])
@pytest.mark.parametrize("step", [1.0, 0.05])
def test_matches_torchjd(warmup, step):
    ours = create_balancer("excess_mtl", TASKS, robust_step_size=step, n_warmup_steps=warmup)
    theirs = tjd.ExcessMTL(robust_step_size=step, n_warmup_steps=warmup)
    for matrix in _matrices(5):
        torch.testing.assert_close(ours(matrix), theirs(matrix), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.weights.sum(), torch.tensor(1.0))


def test_first_two_calls_follow_the_paper():
    """Equations 6-7 (AdaGrad-diagonal excess risk), Section 3.2 (baseline) and Equation 9 (exponentiated step)."""
    g1, g2 = _matrices(2)
    eta = 0.5
    excess = create_balancer("excess_mtl", TASKS, robust_step_size=eta)

    def risk(g, sq_sum):
        return (g**2 / torch.sqrt(sq_sum + 1e-7)).sum(dim=1)

    e1 = risk(g1, g1**2)
    w1 = torch.full((3,), 1 / 3) * torch.exp(eta * e1)
    w1 = w1 / w1.sum()  # the first call's excess risk is the baseline and is used undivided (official code)
    torch.testing.assert_close(excess(g1), w1 @ g1)
    torch.testing.assert_close(excess.weights, w1)
    e2 = risk(g2, g1**2 + g2**2) / (e1 + 1e-7)
    w2 = w1 * torch.exp(eta * e2)
    w2 = w2 / w2.sum()
    torch.testing.assert_close(excess(g2), w2 @ g2)


def test_uniform_weights_during_warmup():
    excess = create_balancer("excess_mtl", TASKS, n_warmup_steps=2)
    for matrix in _matrices(2):
        torch.testing.assert_close(excess(matrix), matrix.mean(0))


@pytest.mark.parametrize("saved_after", [0, 1, 3])
def test_checkpoint_resumes_exactly(saved_after):
    """Saved before the first call, during the warm-up (the call counter matters) and after it."""
    matrices = _matrices(6)
    trained = create_balancer("excess_mtl", TASKS, n_warmup_steps=2)
    for matrix in matrices[:saved_after]:
        trained(matrix)
    state = trained.state_dict()
    restored = create_balancer("excess_mtl", TASKS, n_warmup_steps=2)
    restored.load_state_dict(state)
    for matrix in matrices[saved_after:]:
        torch.testing.assert_close(restored(matrix), trained(matrix), atol=0, rtol=0)


def test_an_older_checkpoint_rewinds_a_used_instance():
    matrices = _matrices(4)
    early = create_balancer("excess_mtl", TASKS)
    early(matrices[0])
    state = early.state_dict()  # before the baseline-divided steps
    used = create_balancer("excess_mtl", TASKS)
    for matrix in matrices:
        used(matrix)
    used.load_state_dict(state)
    fresh = create_balancer("excess_mtl", TASKS)
    fresh.load_state_dict(create_balancer("excess_mtl", TASKS).state_dict())  # before any call
    fresh(matrices[0])
    for matrix in matrices[1:]:
        expected = early(matrix)
        torch.testing.assert_close(used(matrix), expected, atol=0, rtol=0)
        torch.testing.assert_close(fresh(matrix), expected, atol=0, rtol=0)


def test_a_float64_call_continues_the_float32_state():
    matrices = _matrices(4)
    reference, mixed = create_balancer("excess_mtl", TASKS), create_balancer("excess_mtl", TASKS)
    for matrix in matrices[:2]:
        reference(matrix)
        mixed(matrix)
    for matrix in matrices[2:]:
        out = mixed(matrix.double())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out.float(), reference(matrix), atol=1e-6, rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="robust_step_size must be positive"):
        create_balancer("excess_mtl", TASKS, robust_step_size=0.0)
    with pytest.raises(ValueError, match="n_warmup_steps"):
        create_balancer("excess_mtl", TASKS, n_warmup_steps=-1)
