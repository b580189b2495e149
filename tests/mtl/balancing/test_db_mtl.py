"""DB-MTL: log-loss gradients (loss-scale invariance), equal norms after balancing, two steps by hand, lazy state."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl.mtl.balancing import create_balancer

TASKS = ["a", "b", "c"]


def _matrix(seed: int, d: int = 5) -> torch.Tensor:
    return torch.randn(3, d, generator=torch.Generator().manual_seed(seed))


def test_rescaling_a_loss_changes_nothing():
    # L_k -> c L_k multiplies grad L_k by c too; grad log L_k = grad L_k / L_k does not change.
    matrix, losses = _matrix(0), torch.tensor([0.5, 2.0, 4.0])
    scale = torch.tensor([100.0, 1.0, 0.01])
    plain, rescaled = create_balancer("db_mtl", TASKS), create_balancer("db_mtl", TASKS)
    for seed in range(3):
        matrix = _matrix(seed)
        torch.testing.assert_close(rescaled(scale[:, None] * matrix, scale * losses), plain(matrix, losses))


def test_every_task_enters_with_the_largest_norm():
    matrix, losses = _matrix(1), torch.tensor([0.5, 2.0, 4.0])
    db = create_balancer("db_mtl", TASKS, beta=0.0)  # no averaging: m_k = grad L_k / L_k
    out = db(matrix, losses)
    log_grads = matrix / losses[:, None]
    balanced = db.weights[:, None] * log_grads
    norms = balanced.norm(dim=1)
    torch.testing.assert_close(norms, log_grads.norm(dim=1).max().expand(3))
    torch.testing.assert_close(out, balanced.sum(0))


def test_two_steps_by_hand():
    db = create_balancer("db_mtl", ["a", "b"], beta=0.8, beta_sigma=1.0, eps=0.0)
    g1, l1 = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([2.0, 0.5])
    g2, l2 = torch.tensor([[0.0, 3.0], [1.0, 1.0]]), torch.tensor([1.0, 1.0])
    # step 1: beta_1 = 0.8; m = 0.2 * (g / L) = [[0.2, 0], [0, 0.4]]; norms (0.2, 0.4) -> factors (2, 1)
    torch.testing.assert_close(db(g1, l1), torch.tensor([0.4, 0.4]))
    # step 2: beta_2 = 0.4; m = 0.4 m + 0.6 (g2 / L2) = [[0.08, 1.8], [0.6, 0.76]]
    m = torch.tensor([[0.08, 1.8], [0.6, 0.76]])
    norms = m.norm(dim=1)
    torch.testing.assert_close(db(g2, l2), (norms.max() / norms) @ m)
    torch.testing.assert_close(db.grad_ema, m)


def test_lazy_state_round_trips_and_evaluation_leaves_it():
    assert create_balancer("db_mtl", TASKS).state_dict()["grad_ema"].shape == (3, 0)
    db, losses = create_balancer("db_mtl", TASKS), torch.tensor([0.5, 2.0, 4.0])
    for seed in range(3):
        db(_matrix(seed), losses)
    state = {k: v.clone() for k, v in db.state_dict().items()}
    db.eval()
    db(_matrix(8), losses)
    for key, value in db.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0)
    db.train()
    restored = create_balancer("db_mtl", TASKS)
    restored.load_state_dict(state)
    for seed in range(3, 5):
        torch.testing.assert_close(restored(_matrix(seed), losses), db(_matrix(seed), losses), atol=0, rtol=0)


def test_errors():
    db = create_balancer("db_mtl", TASKS)
    assert db.needs_losses
    with pytest.raises(ValueError, match="needs the"):
        db(_matrix(0))
    db(_matrix(0), torch.ones(3))
    with pytest.raises(ValueError, match="same entries at every step"):
        db(_matrix(1, d=4), torch.ones(3))
    with pytest.raises(ValueError, match="beta"):
        create_balancer("db_mtl", TASKS, beta=1.0)
