"""STCH equals K x torchjd's STCH on the nadir-normalised log losses; it tends to the Tchebycheff max as mu -> 0;
warm-up and nadir phases; the weights are the loss gradient; checkpoints resume."""

from __future__ import annotations

import math

import pytest
import torch
from torchjd.scalarization import STCH as TorchJDSTCH

from lightning_mtl.mtl.balancing import create_balancer

TASKS = ["a", "b", "c"]


def _dict(values: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(zip(TASKS, values, strict=True))


def _calibrated(steps: list[list[float]], **kwargs):
    stch = create_balancer("stch", TASKS, **kwargs)
    for losses in steps:
        stch(_dict(torch.tensor(losses)))
        stch.after_step(_dict(torch.tensor(losses)))
    return stch


@pytest.mark.parametrize("preference", [None, [0.5, 1.0, 2.0]])
@pytest.mark.parametrize("mu", [1.0, 0.1])
def test_matches_torchjd_after_calibration(mu, preference):
    history = [[5.0, 5.0, 5.0], [2.0, 0.5, 4.0], [1.0, 0.3, 2.0]]
    stch = _calibrated(history, mu=mu, warmup_steps=1, nadir_steps=2, preference=preference)
    nadir = torch.tensor([1.5, 0.4, 3.0])  # the average of the two nadir steps; the warm-up step is not counted
    torch.testing.assert_close(stch.nadir, nadir)
    lam = torch.ones(3) if preference is None else torch.tensor(preference)
    reference = TorchJDSTCH(mu=mu, weights=lam)
    for losses in ([0.9, 0.35, 1.0], [0.1, 0.2, 3.0]):
        mine = torch.tensor(losses, requires_grad=True)
        theirs = torch.tensor(losses, requires_grad=True)
        value = stch(_dict(mine))
        expected = 3 * reference(torch.log(theirs / nadir + 1e-20))
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6)
        value.backward()
        expected.backward()
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(stch.weights, mine.grad, atol=1e-6, rtol=1e-6)  # the linearised weights


def test_calibration_phases_use_the_log_loss():
    stch = create_balancer("stch", TASKS, warmup_steps=2, nadir_steps=1)
    for step in range(3):
        losses = torch.tensor([1.0 + step, 2.0, 0.5], requires_grad=True)
        assert stch.calibrating
        value = stch(_dict(losses))
        torch.testing.assert_close(value, losses.log().sum())
        value.backward()
        torch.testing.assert_close(stch.weights, 1 / losses.detach())
        stch.after_step(_dict(losses.detach()))
    assert not stch.calibrating
    torch.testing.assert_close(stch.nadir, torch.tensor([3.0, 2.0, 0.5]))  # the third step only


def test_tends_to_the_tchebycheff_max():
    stch = _calibrated([[2.0, 1.0, 4.0]], nadir_steps=1)
    losses = _dict(torch.tensor([1.0, 0.8, 3.0]))
    f = torch.log(torch.tensor([1.0, 0.8, 3.0]) / torch.tensor([2.0, 1.0, 4.0]))
    worst = f.max()
    for mu in (1.0, 0.1, 0.01, 1e-3):
        stch.mu = mu
        value = stch(losses) / 3
        assert worst <= value + 1e-6 <= worst + mu * math.log(3) + 2e-6  # the paper's bounds
    torch.testing.assert_close(value, worst, atol=1e-3 * math.log(3), rtol=0)
    share = stch.weights * torch.tensor([1.0, 0.8, 3.0]) / 3
    torch.testing.assert_close(share, torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)  # only the worst: b


def test_checkpoint_resumes_mid_calibration():
    history = [[3.0, 2.0, 1.0], [2.5, 1.0, 0.8], [2.0, 0.9, 0.7], [1.5, 0.8, 0.6]]
    trained = _calibrated(history[:2], warmup_steps=1, nadir_steps=2)
    restored = create_balancer("stch", TASKS, warmup_steps=1, nadir_steps=2)
    restored.load_state_dict(trained.state_dict())
    assert restored.steps == 2 and restored.calibrating
    for losses in history[2:]:
        for stch in (trained, restored):
            stch.after_step(_dict(torch.tensor(losses)))
        torch.testing.assert_close(restored(_dict(torch.tensor(losses))), trained(_dict(torch.tensor(losses))),
                                   atol=0, rtol=0)
    torch.testing.assert_close(restored.nadir, torch.tensor([2.25, 0.95, 0.75]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="mu must be positive"):
        create_balancer("stch", TASKS, mu=0.0)
    with pytest.raises(ValueError, match="one positive entry per task"):
        create_balancer("stch", TASKS, preference=[1.0, 1.0])
    with pytest.raises(ValueError, match="must be >= 0"):
        create_balancer("stch", TASKS, warmup_steps=-1)
