"""Our loss weightings against the torchjd 0.18 scalarizers that implement the same method.

Where the definitions coincide the values and the gradients in the losses (the weights) are compared on the same
inputs; where they differ, the test checks the documented relation:

* DWA: equal once our ``period`` is the number of batches per epoch. torchjd adds the losses to the epoch's sum in
  every call (evaluation calls included) and needs ``step()`` at the end of each epoch; ours adds them in
  ``after_step`` (training steps only) and closes a period every ``period`` steps.
* Uncertainty weighting: ours is sum_k exp(-s_k) L_k + s_k, exactly twice torchjd's ``UW`` (the paper's regression
  form 1/2 exp(-s) L + 1/2 s) at the same s: same weights up to the factor 2, same optimum. torchjd's ``IMTLL``
  (IMTL-L, sum_k e^{s_k} L_k - s_k) is ours at s = -log_scale, identical in value, loss gradient and (negated)
  parameter gradient, so trajectories coincide under any sign-symmetric optimiser: IMTL-L is not registered
  separately (``"uncertainty"``; the hybrid IMTL is ``"imtl"``).
* FAMO: equal under the protocol without recomputed losses (ours updates the logits at the next forward; torchjd
  when given the next losses through ``update``). torchjd also takes loss lower bounds ``min_losses`` (ours: 0) and
  records losses in evaluation calls too (ours: training mode only). test_famo.py covers recomputed losses.
* GLS (``"gls"``) is torchjd's ``GeometricMean``: exp(mean_k log L_k).
"""

from __future__ import annotations

import torch
from torchjd.scalarization import DWA, FAMO, IMTLL, UW, GeometricMean

from lightning_mtl.mtl.balancing import create_balancer

TASKS = ["a", "b", "c"]


def _dict(values: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(zip(TASKS, values, strict=True))


def _losses(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    decay = torch.tensor([0.7, 0.9, 0.98])  # the tasks' losses fall at different rates
    return [(2 * decay**i) * (1 + 0.1 * torch.rand(3, generator=gen)) for i in range(n)]


def _compare(ours_value, ours_input, theirs_value, theirs_input, factor: float = 1.0) -> None:
    torch.testing.assert_close(ours_value, factor * theirs_value, atol=1e-6, rtol=1e-6)
    ours_value.backward()
    theirs_value.backward()
    torch.testing.assert_close(ours_input.grad, factor * theirs_input.grad, atol=1e-6, rtol=1e-6)


def test_dwa_with_one_period_per_epoch():
    batches_per_epoch = 3
    ours, theirs = create_balancer("dwa", TASKS, period=batches_per_epoch), DWA(temperature=2.0)
    for i, losses in enumerate(_losses(4 * batches_per_epoch)):
        mine, reference = losses.clone().requires_grad_(), losses.clone().requires_grad_()
        _compare(ours(_dict(mine)), mine, theirs(reference), reference)
        ours.after_step(_dict(losses))
        if (i + 1) % batches_per_epoch == 0:
            theirs.step()
    assert not torch.allclose(ours.weights, torch.ones(3))  # the last epochs did use the loss ratios


def test_uncertainty_is_twice_torchjd_uw_and_is_imtl_l():
    s = torch.tensor([-0.5, 0.2, 1.0])
    ours, uw, imtl_l = create_balancer("uncertainty", TASKS), UW(3), IMTLL(3)
    with torch.no_grad():
        ours.log_vars.copy_(s)
        uw.log_var.copy_(s)
        imtl_l.log_scale.copy_(-s)
    for losses in _losses(3):
        for reference, parameter, factor, sign in ((uw, uw.log_var, 2.0, 1.0), (imtl_l, imtl_l.log_scale, 1.0, -1.0)):
            ours.zero_grad()
            reference.zero_grad()
            mine, theirs = losses.clone().requires_grad_(), losses.clone().requires_grad_()
            _compare(ours(_dict(mine)), mine, reference(theirs), theirs, factor)
            torch.testing.assert_close(ours.log_vars.grad, factor * sign * parameter.grad, atol=1e-6, rtol=1e-6)


def test_famo_without_recomputed_losses():
    ours, theirs = create_balancer("famo", TASKS), FAMO(3, lr=0.025, weight_decay=1e-3)
    previous = None
    for losses in _losses(6):
        if previous is not None:
            theirs.update(losses)  # the losses at the new parameters: this step's batch
        mine, reference = losses.clone().requires_grad_(), losses.clone().requires_grad_()
        _compare(ours(_dict(mine)), mine, theirs(reference), reference)
        ours.after_step(_dict(losses))  # the step's own losses: ours defers the update to the next forward
        previous = losses
    assert not torch.allclose(ours.z, torch.full((3,), 1 / 3))


def test_gls_is_torchjd_geometric_mean():
    gls, reference = create_balancer("gls", TASKS), GeometricMean()
    for losses in _losses(3):
        mine, theirs = losses.clone().requires_grad_(), losses.clone().requires_grad_()
        _compare(gls(_dict(mine)), mine, reference(theirs), theirs)
        torch.testing.assert_close(gls.weights, mine.grad, atol=1e-6, rtol=1e-6)
