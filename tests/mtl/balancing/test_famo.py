"""FAMO: equals torchjd's FAMO (official protocol), weights on the simplex, logit updates and their two protocols."""

from __future__ import annotations

import torch
from torchjd.scalarization import FAMO as TorchJDFAMO

from lightning_mtl.mtl.balancing import create_balancer

TASKS = ["a", "b", "c"]


def _dict(values: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(zip(TASKS, values, strict=True))


def _trajectory(steps: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(losses before, losses after) the model step; task c's loss falls slowest."""
    out, loss = [], torch.tensor([2.0, 1.0, 3.0])
    for _ in range(steps):
        after = loss * torch.tensor([0.8, 0.9, 0.99])
        out.append((loss, after))
        loss = after * 1.01
    return out


def test_matches_torchjd_famo_with_recomputed_losses():
    ours, theirs = create_balancer("famo", TASKS), TorchJDFAMO(3, lr=0.025, weight_decay=1e-3)
    for before, after in _trajectory():
        mine = before.clone().requires_grad_()
        reference = before.clone().requires_grad_()
        value, expected = ours(_dict(mine)), theirs(reference)
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6)
        value.backward()
        expected.backward()
        torch.testing.assert_close(mine.grad, reference.grad, atol=1e-6, rtol=1e-6)  # c z_k / L_k: depends on z
        ours.after_step(_dict(after))
        theirs.update(after)


def test_weights_are_a_convex_combination():
    famo = create_balancer("famo", TASKS)
    famo(_dict(torch.tensor([0.5, 2.0, 4.0])))
    torch.testing.assert_close(famo.weights.sum(), torch.tensor(1.0))
    torch.testing.assert_close(famo.z.sum(), torch.tensor(1.0))


def test_the_task_whose_loss_fell_least_gains_weight():
    famo = create_balancer("famo", TASKS)
    for before, after in _trajectory(3):
        famo(_dict(before))
        famo.after_step(_dict(after))
    z = famo.z
    assert z[2] > z[1] > z[0]


def test_without_recomputed_losses_the_next_forward_updates():
    lazy, forwards = create_balancer("famo", TASKS), [before for before, _ in _trajectory(4)]
    for before in forwards:
        lazy(_dict(before))
        lazy.after_step(_dict(before))  # the step's own losses (the usual contract): nothing to compare yet
    # Each forward paired its losses with the previous forward's: the same as recomputing and passing them.
    replay = create_balancer("famo", TASKS)
    for previous, current in zip(forwards[:-1], forwards[1:], strict=True):
        replay(_dict(previous))
        replay.after_step(_dict(current))
    assert not torch.equal(lazy.logits, torch.zeros(3))
    torch.testing.assert_close(lazy.logits, replay.logits, atol=0, rtol=0)
    torch.testing.assert_close(lazy.exp_avg_sq, replay.exp_avg_sq, atol=0, rtol=0)


def test_plain_gradient_step():
    famo = create_balancer("famo", TASKS, logit_optimizer="sgd", w_lr=0.5, gamma=0.1)
    before, after = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, 1.0, 2.0])
    famo(_dict(before))
    famo.after_step(_dict(after))
    delta = before.log() - after.log()
    z = torch.full((3,), 1 / 3)
    grad = z * (delta - z @ delta)  # logits start at 0, so no decay term
    torch.testing.assert_close(famo.logits, -0.5 * grad)


def test_evaluation_leaves_the_state_alone_and_state_is_checkpointed():
    famo = create_balancer("famo", TASKS)
    for before, after in _trajectory(2):
        famo(_dict(before))
        famo.after_step(_dict(after))
    state = {k: v.clone() for k, v in famo.state_dict().items()}
    famo.eval()
    famo(_dict(torch.tensor([9.0, 9.0, 9.0])))
    famo(_dict(torch.tensor([1.0, 5.0, 9.0])))
    for key, value in famo.state_dict().items():
        torch.testing.assert_close(value, state[key])
    restored = create_balancer("famo", TASKS)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.z, famo.z)
    assert {"logits", "exp_avg", "exp_avg_sq", "logit_steps"} <= set(state)


def test_a_non_finite_step_does_not_poison_the_logits():
    famo = create_balancer("famo", TASKS)
    famo(_dict(torch.tensor([1.0, 1.0, 1.0])))
    famo(_dict(torch.tensor([float("nan"), 1.0, 1.0])))  # a step the module skips
    famo.after_step(_dict(torch.tensor([float("inf"), 1.0, 1.0])))
    famo(_dict(torch.tensor([0.5, 0.9, 1.0])))
    famo.after_step(_dict(torch.tensor([0.4, 0.9, 1.0])))
    assert torch.isfinite(famo.logits).all() and not torch.equal(famo.logits, torch.zeros(3))
