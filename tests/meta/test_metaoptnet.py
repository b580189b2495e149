"""MetaOptNet: the batched QP solver against quadprog and finite differences, the Crammer-Singer SVM against closed
forms and a primal solve, and the module."""

from __future__ import annotations

import numpy as np
import pytest
import quadprog
import scipy.optimize
import torch
import torch.nn.functional as F
from meta_helpers import tiny_episode
from torch import nn

from lightning_mtl import Episode
from lightning_mtl.meta.metaoptnet import MetaOptNet, svm_dual_coefficients, svm_logits
from lightning_mtl.meta.qp import solve_qp


def random_qp(rng: np.random.Generator, n: int = 6, m: int = 8, r: int = 2):
    """A strictly convex QP, strictly feasible around a random point, with some constraints active at the optimum."""
    root = rng.standard_normal((n, n))
    q = root @ root.T + 0.5 * np.eye(n)
    p = rng.standard_normal(n) * 3  # pulls the optimum away from z0, against some constraints
    g = rng.standard_normal((m, n))
    z0 = rng.standard_normal(n)
    h = g @ z0 + np.abs(rng.standard_normal(m)) * 0.3
    a = rng.standard_normal((r, n))
    return q, p, g, h, a, a @ z0


def quadprog_solution(q, p, g, h, a, b):
    # quadprog: min 1/2 x^T G x - a^T x s.t. C^T x >= b, the first meq rows as equalities
    return quadprog.solve_qp(q, -p, np.vstack([a, -g]).T, np.concatenate([b, -h]), meq=len(b))[0]


@pytest.mark.parametrize("equalities", [2, 0])
def test_qp_matches_quadprog_on_a_batch(equalities):
    rng = np.random.default_rng(equalities)
    problems = [random_qp(rng, r=equalities) for _ in range(8)]
    expected = np.stack([quadprog_solution(*pr) for pr in problems])
    q, p, g, h, a, b = (torch.tensor(np.stack(x)) for x in zip(*problems, strict=True))
    got = solve_qp(q, p, g, h, a if equalities else None, b if equalities else None)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-7, rtol=0)
    # shared (unbatched) constraints are broadcast to every problem
    shared = solve_qp(q, p, g[0], h[0], a[0] if equalities else None, b[0] if equalities else None)
    expected_shared = [quadprog_solution(q[i].numpy(), p[i].numpy(), *(x[0].numpy() for x in (g, h, a, b)))
                       for i in range(8)]
    np.testing.assert_allclose(shared.numpy(), np.stack(expected_shared), atol=1e-7, rtol=0)


def test_qp_identity_constraints_match_explicit_ones_and_quadprog():
    rng = np.random.default_rng(5)
    q, p, *_ = random_qp(rng, n=5)
    h = rng.uniform(-0.5, 0.5, 5)  # upper bounds z <= h, some binding
    a, b = np.ones((1, 5)), np.array([h.sum() - 1.0])  # z = h - 0.2 is strictly feasible
    expected = quadprog_solution(q, p, np.eye(5), h, a, b)
    t = torch.tensor
    got_none = solve_qp(t(q), t(p), None, t(h), t(a), t(b))[0].numpy()
    got_eye = solve_qp(t(q), t(p), t(np.eye(5)), t(h), t(a), t(b))[0].numpy()
    np.testing.assert_allclose(got_none, expected, atol=1e-7, rtol=0)
    np.testing.assert_allclose(got_eye, got_none, atol=1e-9, rtol=0)
    assert (np.abs(expected - h) < 1e-9).sum() >= 1  # the bounds do bind


def test_qp_float32_is_close_to_quadprog():
    rng = np.random.default_rng(2)
    problems = [random_qp(rng) for _ in range(4)]
    expected = np.stack([quadprog_solution(*pr) for pr in problems])
    inputs = (torch.tensor(np.stack(x), dtype=torch.float32) for x in zip(*problems, strict=True))
    got = solve_qp(*inputs, tol=1e-6)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-3, rtol=0)


def test_qp_gradients_match_finite_differences_with_active_and_inactive_constraints():
    g = torch.Generator().manual_seed(3)
    n, m = 4, 6
    root = torch.randn(n, n, generator=g, dtype=torch.float64)
    q = (root @ root.T + torch.eye(n, dtype=torch.float64)).requires_grad_()
    p = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    gm = torch.randn(m, n, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.rand(m, generator=g, dtype=torch.float64).mul(0.5).requires_grad_()
    a = torch.randn(1, n, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, generator=g, dtype=torch.float64, requires_grad=True)

    def solve(q, p, gm, h, a, b):  # Q symmetrised: finite differences perturb one entry at a time
        return solve_qp(0.5 * (q + q.T), p, gm, h, a, b, max_iter=50, tol=1e-13)

    with torch.no_grad():
        slack = h - gm @ solve(q, p, gm, h, a, b)[0]
    assert (slack < 1e-9).sum() >= 1 and (slack > 1e-2).sum() >= 1  # both kinds at the solution
    assert torch.autograd.gradcheck(solve, (q, p, gm, h, a, b), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_qp_gradients_with_identity_constraints_and_a_batch():
    g = torch.Generator().manual_seed(4)
    root = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    q = (root @ root.mT + torch.eye(5, dtype=torch.float64)).requires_grad_()
    p = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 5, generator=g, dtype=torch.float64).mul(0.3).requires_grad_()
    with torch.no_grad():
        z = solve_qp(q, p, None, h, max_iter=50, tol=1e-13)
    assert ((h - z).abs() < 1e-9).any() and ((h - z) > 1e-2).any()
    assert torch.autograd.gradcheck(lambda q, p, h: solve_qp(0.5 * (q + q.mT), p, None, h, max_iter=50, tol=1e-13),
                                    (q, p, h), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_qp_rejects_bad_inputs():
    q, p, g, h = torch.eye(3), torch.zeros(3), torch.eye(3), torch.ones(3)
    with pytest.raises(ValueError, match="G must be"):
        solve_qp(q, p, torch.eye(3, 2), h)
    with pytest.raises(ValueError, match="batch size"):
        solve_qp(q.expand(2, 3, 3), p.expand(3, 3), g, h)
    with pytest.raises(ValueError, match="give b with A"):
        solve_qp(q, p, g, h, A=torch.ones(1, 3))
    with pytest.raises(ValueError, match="max_iter"):
        solve_qp(q, p, g, h, max_iter=0)


@pytest.mark.parametrize("c", [0.05, 10.0])  # soft margin (box active) and hard margin
def test_svm_two_symmetric_points_closed_form(c):
    # x1 = r e1 (class 0), x2 = -r e1 (class 1): w_0 = -w_1 = min(2 C r, 1 / (2 r)) e1, the Crammer-Singer optimum
    r = 1.5
    support = torch.tensor([[[r, 0.0], [-r, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[0, 1]])
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    scores = svm_logits(support, labels, query, 2, c, ridge=0.0, max_iter=30, tol=1e-12)[0]
    w0 = min(2 * c * r, 1 / (2 * r))
    torch.testing.assert_close(scores, torch.tensor([[w0, -w0], [0.0, 0.0]], dtype=torch.float64), atol=1e-8, rtol=0)


def primal_cs_svm(x: np.ndarray, y: np.ndarray, ways: int, c: float) -> np.ndarray:
    """Crammer-Singer primal ``min 1/2 ||W||^2 + C sum xi`` by SLSQP: weights ``(ways, d)``."""
    n, d = x.shape
    rows, bounds = [], []
    for i in range(n):
        for k in range(ways):  # w_{y_i} x_i - w_k x_i + xi_i >= 1 - delta(y_i, k)
            row = np.zeros(ways * d + n)
            row[y[i] * d : (y[i] + 1) * d] += x[i]
            row[k * d : (k + 1) * d] -= x[i]
            row[ways * d + i] = 1
            rows.append(row)
            bounds.append(float(y[i] != k))
    mat, rhs = np.array(rows), np.array(bounds)
    res = scipy.optimize.minimize(
        lambda v: 0.5 * v[: ways * d] @ v[: ways * d] + c * v[ways * d :].sum(), np.zeros(ways * d + n),
        jac=lambda v: np.concatenate([v[: ways * d], np.full(n, c)]), method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda v: mat @ v - rhs, "jac": lambda v: mat}],
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert res.success, res.message
    return res.x[: ways * d].reshape(ways, d)


@pytest.mark.parametrize("c", [0.1, 1.0])
def test_svm_dual_weights_equal_the_primal_solution(c):
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((6, 8)), np.arange(6) % 3
    alpha = svm_dual_coefficients(torch.tensor(x)[None], torch.tensor(y)[None], 3, c, ridge=0.0, max_iter=30,
                                  tol=1e-12)[0]
    np.testing.assert_allclose((x.T @ alpha.numpy()).T, primal_cs_svm(x, y, 3, c), atol=1e-6, rtol=0)
    # dual feasibility: rows sum to zero, alpha_ik <= C y_ik
    assert torch.allclose(alpha.sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-9)
    assert (alpha <= c * F.one_hot(torch.tensor(y), 3) + 1e-9).all()


def test_kernel_ridge_is_a_private_feature_per_support_example():
    g = torch.Generator().manual_seed(0)
    support, query = (torch.randn(2, k, 3, generator=g, dtype=torch.float64) for k in (8, 5))
    labels = torch.arange(4).repeat(2, 2)
    ridge = 0.7
    augmented = torch.cat([support, ridge**0.5 * torch.eye(8, dtype=torch.float64).expand(2, 8, 8)], -1)
    query_aug = torch.cat([query, query.new_zeros(2, 5, 8)], -1)
    expected = svm_logits(augmented, labels, query_aug, 4, 0.5, ridge=0.0, max_iter=30, tol=1e-12)
    torch.testing.assert_close(svm_logits(support, labels, query, 4, 0.5, ridge, 30, 1e-12), expected, atol=1e-7,
                               rtol=0)


def flat_model(**kwargs) -> MetaOptNet:
    torch.manual_seed(0)
    return MetaOptNet(backbone=nn.Sequential(nn.Flatten(), nn.Linear(4, 6)).double(), **kwargs)


def test_module_logits_shape_gradients_and_query_permutation():
    model = flat_model()
    ep = tiny_episode(ways=3, shots=2, queries=4, meta_batch=2)
    logits = model.episode_logits(ep, "train")
    assert logits.shape == (2, 12, 3) and logits.dtype == torch.float32
    F.cross_entropy(logits.flatten(0, 1), ep.query_y.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in model.parameters())
    perm = torch.randperm(12)
    permuted = Episode(ep.support_x, ep.support_y, ep.query_x[:, perm], ep.query_y[:, perm], 3)
    with torch.no_grad():
        torch.testing.assert_close(model.episode_logits(permuted, "val"), model.episode_logits(ep, "val")[:, perm])
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the head still runs in float64
            assert torch.isfinite(model.episode_logits(ep, "val")).all()


def test_module_default_backbone_on_images():
    model = MetaOptNet()
    ep = Episode(torch.randint(0, 255, (1, 5, 1, 28, 28), dtype=torch.uint8), torch.arange(5)[None],
                 torch.randint(0, 255, (1, 10, 1, 28, 28), dtype=torch.uint8), torch.arange(5).repeat(1, 2), 5)
    loss, accs = model._step(ep, "train")
    loss.backward()
    assert accs.shape == (1,) and torch.isfinite(loss) and model.scale.grad is not None


def test_module_test_stage_uses_its_own_solver_iterations():
    model = flat_model(test_solver_iters=1, solver_tol=0.0)
    ep = tiny_episode()
    with torch.no_grad():
        assert not torch.allclose(model.episode_logits(ep, "test"), model.episode_logits(ep, "val"))


def test_label_smoothing_only_in_training():
    model = flat_model(label_smoothing=0.1)
    logits, y = torch.randn(2, 6, 3), torch.randint(0, 3, (2, 6))
    target = F.one_hot(y, 3) * 0.9 + (1 - F.one_hot(y, 3)) * 0.05
    expected = -(target * F.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(model.train().episode_loss(logits, y), expected)
    torch.testing.assert_close(model.eval().episode_loss(logits, y), F.cross_entropy(logits.flatten(0, 1), y.flatten()))


class BatchMean(nn.Module):
    def forward(self, x):
        return x.flatten(1).mean(0, keepdim=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"C": 0.0}, "C must be positive"), ({"C": -1.0}, "C must be positive"),
     ({"kernel_ridge": -1.0}, "kernel_ridge"), ({"solver_iters": 0}, "solver_iters"),
     ({"test_solver_iters": 0}, "solver_iters"), ({"label_smoothing": 1.0}, "label_smoothing")],
)
def test_module_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetaOptNet(**kwargs)


def test_module_rejects_a_backbone_that_does_not_embed_each_image():
    model = MetaOptNet(backbone=BatchMean())
    with pytest.raises(ValueError, match="one embedding|embeddings"):
        model.episode_logits(tiny_episode(), "train")


def test_a_few_steps_reduce_the_loss_on_a_fixed_episode():
    model = flat_model()
    ep = tiny_episode(ways=3, shots=2, queries=3, meta_batch=2, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    losses = []
    for _ in range(15):
        loss, _ = model._step(ep, "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0] and model.scale.item() > 1, losses  # 15 steps: 1.06 -> 0.85
