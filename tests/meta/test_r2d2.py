"""R2D2's closed-form ridge head: the Woodbury solve against the primal one, gradients, and the module."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl import Episode
from lightning_mtl.meta.r2d2 import R2D2, ridge_logits


def primal_ridge_logits(support, labels, query, ways, lam):
    """``X_q (X^T X + lambda I)^{-1} X^T Y`` for one episode, with the same bias column."""
    x = torch.cat([support, torch.ones(len(support), 1, dtype=support.dtype)], 1)
    xq = torch.cat([query, torch.ones(len(query), 1, dtype=query.dtype)], 1)
    y = torch.nn.functional.one_hot(labels, ways).to(x.dtype)
    w = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    return xq @ w


@pytest.mark.parametrize("dim", [3, 40])  # fewer and more features than support examples
def test_woodbury_solution_equals_the_primal_one(dim):
    g = torch.Generator().manual_seed(0)
    support = torch.randn(2, 10, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(5).repeat(2, 2)
    query = torch.randn(2, 7, dim, generator=g, dtype=torch.float64)
    got = ridge_logits(support, labels, query, 5, 0.3)
    for b in range(2):
        torch.testing.assert_close(got[b], primal_ridge_logits(support[b], labels[b], query[b], 5, 0.3))


def test_ridge_interpolates_the_support_set_as_lambda_vanishes():
    support = torch.eye(4, 6, dtype=torch.float64).unsqueeze(0) * 3  # 4 orthogonal examples, one per class
    labels = torch.tensor([[2, 0, 3, 1]])
    logits = ridge_logits(support, labels, support, 4, 1e-9)
    torch.testing.assert_close(logits[0], torch.nn.functional.one_hot(labels[0], 4).double(), atol=1e-6, rtol=0)


def test_ridge_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(1)
    support = torch.randn(1, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    query = torch.randn(1, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert torch.autograd.gradcheck(lambda s, q, lm: ridge_logits(s, labels, q, 3, lm), (support, query, lam))


def test_module_trains_lambda_scale_and_backbone():
    torch.manual_seed(0)
    model = R2D2(init_lambda=0.5)
    ep = Episode(torch.randint(0, 255, (2, 5, 1, 28, 28), dtype=torch.uint8), torch.arange(5).repeat(2, 1),
                 torch.randint(0, 255, (2, 10, 1, 28, 28), dtype=torch.uint8), torch.arange(5).repeat(2, 2), 5)
    loss, accs = model._step(ep, "train")
    loss.backward()
    assert accs.shape == (2,) and torch.isfinite(loss)
    assert model.log_lambda.exp().item() == pytest.approx(0.5)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert R2D2(learn_lambda=False).log_lambda.requires_grad is False
    with pytest.raises(ValueError, match="init_lambda must be positive"):
        R2D2(init_lambda=0)
