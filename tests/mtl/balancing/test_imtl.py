"""IMTL: impartial projections, agreement with IMTL-G at zero scales, the learned scales' fixed point and updates,
evaluation and checkpoints."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl.mtl.balancing import create_balancer

TASKS = ["a", "b", "c"]


def _matrix(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 7, generator=torch.Generator().manual_seed(seed))


def test_the_update_projects_equally_onto_every_task_gradient():
    imtl = create_balancer("imtl", TASKS, init_log_scale=0.3)
    matrix, losses = _matrix(), torch.tensor([0.2, 1.0, 5.0])
    for _ in range(3):
        d = imtl(matrix, losses)
        projections = matrix @ d / matrix.norm(dim=1)  # d . u_k
        torch.testing.assert_close(projections, projections.mean().expand(3))
        torch.testing.assert_close(d, imtl.weights @ matrix)


def test_zero_scales_give_imtl_g():
    matrix = _matrix(1)
    imtl = create_balancer("imtl", TASKS)
    imtl_g = create_balancer("imtl_g", TASKS)
    torch.testing.assert_close(imtl(matrix, torch.ones(3)), imtl_g(matrix), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(imtl.weights.sum(), torch.tensor(1.0))


def test_the_scale_update_is_the_gradient_of_the_scaled_loss():
    imtl = create_balancer("imtl", TASKS, scale_lr=0.1, scale_optimizer="sgd", init_log_scale=0.5)
    losses = torch.tensor([0.2, 1.0, 5.0])
    s = torch.full((3,), 0.5, requires_grad=True)
    (s.exp() * losses - s).sum().backward()  # IMTL-L's loss in s
    imtl(_matrix(), losses)
    torch.testing.assert_close(imtl.log_scales, 0.5 - 0.1 * s.grad)


def test_adam_scale_update_is_torch_adam():
    imtl = create_balancer("imtl", TASKS, scale_lr=0.05)
    s = torch.nn.Parameter(torch.zeros(3))
    adam = torch.optim.Adam([s], lr=0.05)
    for step in range(4):
        losses = torch.tensor([0.2, 1.0, 5.0]) * (1 + 0.1 * step)
        adam.zero_grad()
        (s.exp() * losses - s).sum().backward()
        adam.step()
        imtl(_matrix(step), losses)
        torch.testing.assert_close(imtl.log_scales, s.detach())
    assert int(imtl.scale_steps) == 4


def test_scaled_losses_settle_at_one():
    # e^{s_k} L_k - s_k is smallest at e^{s_k} L_k = 1: the scaled losses are made equal.
    imtl = create_balancer("imtl", TASKS, scale_lr=0.05)
    losses = torch.tensor([0.05, 1.0, 20.0])
    for _ in range(400):
        imtl(_matrix(), losses)
    torch.testing.assert_close(imtl.log_scales.exp() * losses, torch.ones(3), atol=2e-2, rtol=0)


def test_evaluation_leaves_the_scales_and_checkpoints_resume():
    imtl = create_balancer("imtl", TASKS, scale_lr=0.05)
    losses = torch.tensor([0.2, 1.0, 5.0])
    for step in range(3):
        imtl(_matrix(step), losses)
    state = {k: v.clone() for k, v in imtl.state_dict().items()}
    imtl.eval()
    imtl(_matrix(9), losses * 3)
    for key, value in imtl.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0)
    imtl.train()
    restored = create_balancer("imtl", TASKS, scale_lr=0.05)
    restored.load_state_dict(state)
    for step in range(3, 5):
        torch.testing.assert_close(restored(_matrix(step), losses), imtl(_matrix(step), losses), atol=0, rtol=0)


def test_bad_arguments_and_missing_losses():
    with pytest.raises(ValueError, match="scale_lr"):
        create_balancer("imtl", TASKS, scale_lr=-1.0)
    with pytest.raises(ValueError, match="scale_optimizer"):
        create_balancer("imtl", TASKS, scale_optimizer="rmsprop")
    imtl = create_balancer("imtl", TASKS)
    assert imtl.needs_losses
    with pytest.raises(ValueError, match=r"needs the \(3,\) task losses"):
        imtl(_matrix())
