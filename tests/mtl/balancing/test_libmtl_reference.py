"""Our balancers against LibMTL 1.1.5's weighting methods on the same model, batch and task losses.

LibMTL's methods are mixins of its model: they read ``task_num``, ``device``, ``rep_grad``, ``epoch``,
``train_loss_buffer``, ``get_share_params`` and ``zero_grad_share_params`` from ``self`` and leave the update of the
shared parameters in their ``.grad``. :func:`libmtl` gives them a minimal CPU host (:class:`_Host`) around a tiny shared
encoder with three heads; our side gets the same losses (loss weightings) or the (3, D) matrix of their gradients on
the shared parameters (aggregators), and the two shared-parameter updates are compared. Where LibMTL differs from ours
by design, the test configures ours to match or checks the documented relation (named in each test).

Needs ``LibMTL==1.1.5`` (skipped without it); its ``CAGrad`` imports scipy when the package is imported.
"""

from __future__ import annotations

import itertools
import random
import sys
import types

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lightning_mtl.mtl.balancing import create_balancer

# LibMTL/model/resnet.py imports torchvision.models.utils, which current torchvision no longer has.
_shim = types.ModuleType("torchvision.models.utils")
_shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
sys.modules.setdefault("torchvision.models.utils", _shim)
W = pytest.importorskip("LibMTL.weighting", reason="LibMTL==1.1.5 is not installed (pip install LibMTL==1.1.5)")

TASKS = ["a", "b", "c"]
TOL = {"atol": 1e-5, "rtol": 1e-5}


class _Net(nn.Module):
    """A shared encoder (positive outputs) and one linear head per task; squared-error losses."""

    def __init__(self, tasks: list[str], seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tasks = tasks
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Softplus())
        self.heads = nn.ModuleDict({t: nn.Linear(5, 1) for t in tasks})

    def batch(self, seed: int, size: int = 8) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        # targets of opposite signs make the task gradients conflict
        signs = torch.tensor([(-1.0) ** i * (i + 1) for i in range(len(self.tasks))])
        return torch.randn(size, 4, generator=g), signs * (1 + torch.rand(size, len(self.tasks), generator=g))

    def losses(self, z: Tensor | dict[str, Tensor], y: Tensor) -> list[Tensor]:
        reps = z if isinstance(z, dict) else dict.fromkeys(self.tasks, z)
        return [(self.heads[t](reps[t]).squeeze(1) - y[:, i]).pow(2).mean() for i, t in enumerate(self.tasks)]

    def shared(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())


class _Host:
    """What LibMTL's weighting mixins expect of the model they are mixed into (on the CPU)."""

    def __init__(self, net: _Net, rep_grad: bool = False) -> None:
        super().__init__()
        self.net, self.rep_grad = net, rep_grad
        self.task_name, self.task_num, self.device = net.tasks, len(net.tasks), torch.device("cpu")
        self.epoch, self.train_loss_buffer = 0, None

    def get_share_params(self):
        return self.net.encoder.parameters()

    def zero_grad_share_params(self) -> None:
        self.net.encoder.zero_grad(set_to_none=False)  # LibMTL writes into .grad.data afterwards

    def step(self, x: Tensor, y: Tensor, **kwargs) -> Tensor:
        """LibMTL's ``backward`` on the losses of ``(x, y)``; the flat update it leaves on the shared parameters."""
        self.net.zero_grad(set_to_none=False)
        z = self.net.encoder(x)
        if self.rep_grad:  # as LibMTL's AbsArchitecture._prepare_rep for one tensor shared by every task
            self.rep = dict.fromkeys(self.task_name, z)
            self.rep_tasks = {t: z.detach().clone().requires_grad_() for t in self.task_name}
            z = self.rep_tasks
        self.backward(torch.stack(self.net.losses(z, y)), **kwargs)
        return torch.cat([p.grad.flatten() for p in self.net.shared()])


def libmtl(method: str, net: _Net, rep_grad: bool = False) -> _Host:
    """LibMTL's ``method`` hosted by ``net``. LibMTL builds its model class at run time from the weighting class;
    so does this helper, for LibMTL's sake only."""
    host = type(f"Hosted{method}", (_Host, getattr(W, method)), {})(net, rep_grad)
    host.init_param()
    return host


def _flat_grad(loss: Tensor, params: list[Tensor]) -> Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])


def ours_weighting(balancer, net: _Net, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Our loss weighting on the losses of ``(x, y)``: (shared update, the gradient of its own parameters)."""
    losses = dict(zip(net.tasks, net.losses(net.encoder(x), y), strict=True))
    loss = balancer(losses, net.shared() if balancer.needs_shared_params else None)
    own = [p for p in balancer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, net.shared() + own)
    shared = torch.cat([g.flatten() for g in grads[: len(net.shared())]])
    return shared, (torch.cat([g.flatten() for g in grads[len(net.shared()):]]) if own else torch.empty(0))


def task_matrix(net: _Net, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The (K, D) gradients of the task losses on the shared parameters, and the (K,) losses."""
    losses = net.losses(net.encoder(x), y)
    return torch.stack([_flat_grad(loss, net.shared()) for loss in losses]), torch.stack(losses).detach()


def _problem(tasks: list[str] = TASKS) -> tuple[_Net, Tensor, Tensor]:
    net = _Net(tasks)
    x, y = net.batch(0)
    return net, x, y


# --------------------------------------------------------------------------- loss weightings
def test_equal_weighting_is_libmtl_ew():
    net, x, y = _problem()
    expected = libmtl("EW", net).step(x, y)
    torch.testing.assert_close(ours_weighting(create_balancer("equal", TASKS), net, x, y)[0], expected, **TOL)


def test_gls_is_libmtl_gls():
    net, x, y = _problem()
    expected = libmtl("GLS", net).step(x, y)
    torch.testing.assert_close(ours_weighting(create_balancer("gls", TASKS), net, x, y)[0], expected, **TOL)


def test_uncertainty_is_twice_libmtl_uw():
    # LibMTL: sum L/(2 e^s) + s/2 with s = -0.5 at the start; ours: sum e^{-s} L + s, exactly twice that.
    net, x, y = _problem()
    host = libmtl("UW", net)
    expected = host.step(x, y)
    ours = create_balancer("uncertainty", TASKS, init_log_var=-0.5)
    shared, log_var_grad = ours_weighting(ours, net, x, y)
    torch.testing.assert_close(shared, 2 * expected, **TOL)
    torch.testing.assert_close(log_var_grad, 2 * host.loss_scale.grad, **TOL)


def test_dwa_is_libmtl_dwa_with_one_period_per_epoch():
    # LibMTL weights by the last two epochs' average losses: ours with period=1 and after_step fed those averages.
    net, _, _ = _problem()
    epoch_means = np.array([[2.0, 1.5, 1.2, 1.0], [3.0, 2.9, 2.0, 1.9], [1.0, 0.8, 0.79, 0.5]])  # (tasks, epochs)
    host, ours = libmtl("DWA", net), create_balancer("dwa", TASKS, temperature=2.0, period=1)
    host.train_loss_buffer = epoch_means
    for epoch in range(epoch_means.shape[1]):
        x, y = net.batch(epoch)
        host.epoch = epoch
        torch.testing.assert_close(ours_weighting(ours, net, x, y)[0], host.step(x, y, T=2.0), **TOL)
        ours.after_step(dict(zip(TASKS, torch.tensor(epoch_means[:, epoch], dtype=torch.float32), strict=True)))
    assert not torch.allclose(ours.weights, torch.ones(3))  # the last epochs were weighted


def test_rlw_draws_the_same_weights_from_the_same_seed():
    net, x, y = _problem()
    host, ours = libmtl("RLW", net), create_balancer("rlw", TASKS)
    for seed in range(3):
        torch.manual_seed(seed)
        expected = host.step(x, y, dist="Normal")  # softmax of a standard normal draw from torch's generator
        torch.manual_seed(seed)
        torch.testing.assert_close(ours_weighting(ours, net, x, y)[0], expected, **TOL)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 1.0, 1.5]], ids=["initial", "moved"])
def test_gradnorm_matches_libmtl_up_to_its_softmax_parametrisation(weights):
    # LibMTL learns logits theta with w = K softmax(theta); ours learns w (renormalised to sum K). Same w, same L(0)
    # (LibMTL's first-epoch average; ours records it at its first call, set here): same shared update, and the
    # logits' gradient is the chain rule of ours, K (diag(z) - z z^T) dL/dw with z = w / K.
    net, x, y = _problem()
    host, ours = libmtl("GradNorm", net), create_balancer("gradnorm", TASKS, alpha=1.5, norm_params="all")
    initial = np.array([[3.0], [1.0], [6.0]])
    host.epoch, host.train_loss_buffer = 1, initial
    w = torch.tensor(weights)
    with torch.no_grad():
        host.loss_scale.copy_(w.log())
        ours.task_weights.copy_(w)
        ours.initial_losses.copy_(torch.tensor(initial[:, 0], dtype=torch.float32))
        ours.initialized.fill_(True)
    expected = host.step(x, y, alpha=1.5)
    shared, weight_grad = ours_weighting(ours, net, x, y)
    torch.testing.assert_close(shared, expected, **TOL)
    z = w / 3
    torch.testing.assert_close(host.loss_scale.grad, 3 * (torch.diag(z) - torch.outer(z, z)) @ weight_grad, **TOL)
    assert weight_grad.abs().max() > 1e-3  # the norms were not already balanced


# --------------------------------------------------------------------------- gradient aggregators
def _min_norm_point(matrix: Tensor) -> Tensor:
    """The exact minimum-norm point of the convex hull of the rows (float64): the best over every face of the
    simplex of the affine-hull minimiser lambda = G^-1 1 / (1^T G^-1 1), where that lies in the face."""
    rows, best = matrix.double(), None
    for size in range(1, len(rows) + 1):
        for face in itertools.combinations(range(len(rows)), size):
            sub = rows[list(face)]
            lambd = torch.linalg.solve(sub @ sub.T, torch.ones(size, dtype=torch.float64))
            lambd = lambd / lambd.sum()
            if (lambd >= 0).all() and (best is None or (lambd @ sub).norm() < best.norm()):
                best = lambd @ sub
    return best


def test_mgda_and_libmtl_mgda_reach_the_same_min_norm_point():
    # Both solve min ||sum_k a_k g_k|| on the simplex (LibMTL's mgda_gn='l2'/'loss'/'loss+' first divide the
    # gradients, ours never does: 'none'). LibMTL's solver (Sener & Koltun's, with exact line searches) stops within
    # 1e-5 of the exact point, and so does ours (an exact QP on the Gramian). torchjd's plain Frank-Wolfe
    # (solver="frank_wolfe") converges slowly when the solution lies on a face, as here: with its defaults it stops
    # far from the point (relative error ~12% on this problem), so it is checked against Frank-Wolfe's own
    # certificate (the objective exceeds the minimum by at most the duality gap) and for convergence.
    net, x, y = _problem()
    matrix, _ = task_matrix(net, x, y)
    exact = _min_norm_point(matrix)
    torch.testing.assert_close(libmtl("MGDA", net).step(x, y, mgda_gn="none").double(), exact, **TOL)
    torch.testing.assert_close(create_balancer("mgda", TASKS)(matrix).double(), exact, **TOL)
    gram = (matrix @ matrix.T).double()
    for max_iters, rel_error in ((100, None), (3000, 1e-2)):
        ours = create_balancer("mgda", TASKS, solver="frank_wolfe", epsilon=1e-12, max_iters=max_iters)
        out = ours(matrix).double()
        lambd = ours.weights.double()
        excess = out.norm() ** 2 - exact.norm() ** 2
        gap = 2 * (lambd @ gram @ lambd - (gram @ lambd).min())  # Frank-Wolfe duality gap of f = |G^T lambda|^2
        assert -1e-6 <= excess <= gap + 1e-6
        if rel_error is not None:
            assert (out - exact).norm() <= rel_error * exact.norm()


@pytest.mark.parametrize("c", [0.4, 0.8])
def test_cagrad_is_libmtl_cagrad_before_its_rescale(c):
    # LibMTL's rescale=1 (its default) divides g0 + lambda g_w by 1 + c^2, rescale=0 does not; ours is unscaled.
    # Both solve CAGrad's dual approximately (LibMTL: SLSQP at ftol 1e-6 on the Gramian; ours: torchjd's CLARABEL
    # on the normalised Gramian); their directions agree to ~5e-4 here, as each does with the exact solution.
    net, x, y = _problem()
    matrix, _ = task_matrix(net, x, y)
    out = create_balancer("cagrad", TASKS, c=c)(matrix)
    g0 = matrix.mean(0)
    torch.testing.assert_close((out - g0).norm(), c * g0.norm(), **TOL)  # on the boundary of CAGrad's ball
    host = libmtl("CAGrad", net)
    torch.testing.assert_close(out, host.step(x, y, calpha=c, rescale=0), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out / (1 + c**2), host.step(x, y, calpha=c, rescale=1), atol=1e-3, rtol=1e-3)


def _outcomes(draw, seeds: int = 48) -> list[Tensor]:
    """The distinct results of ``draw(seed)`` over ``seeds`` seeds."""
    found: list[Tensor] = []
    for seed in range(seeds):
        out = draw(seed)
        if not any(torch.allclose(out, f, **TOL) for f in found):
            found.append(out)
    return found


def _same_sets(ours: list[Tensor], theirs: list[Tensor]) -> None:
    assert len(ours) == len(theirs)
    for out in theirs:
        assert any(torch.allclose(out, o, **TOL) for o in ours)


def test_pcgrad_has_libmtl_pcgrads_outcomes():
    # Both visit the other tasks in a random order (LibMTL: Python's random, ours: torch's generator), so the
    # results of many seeds are compared as sets; with three tasks the order matters here.
    net, x, y = _problem()
    matrix, _ = task_matrix(net, x, y)
    assert (matrix @ matrix.T < 0).any()  # some task gradients conflict
    host, ours = libmtl("PCGrad", net), create_balancer("pcgrad", TASKS)

    def theirs(seed):
        random.seed(seed)
        return host.step(x, y)

    def mine(seed):
        torch.manual_seed(seed)
        return ours(matrix)

    found = _outcomes(mine)
    _same_sets(found, _outcomes(theirs))
    assert len(found) > 1


def test_gradvac_first_step_has_libmtl_gradvacs_outcomes():
    net, x, y = _problem()
    matrix, _ = task_matrix(net, x, y)
    host = libmtl("GradVac", net)

    def theirs(seed):
        random.seed(seed)
        host.rho_T = torch.zeros(3, 3)  # a fresh first step
        return host.step(x, y, beta=0.5)

    def mine(seed):
        torch.manual_seed(seed)
        return create_balancer("gradvac", TASKS, beta=0.5)(matrix)

    found = _outcomes(mine)
    _same_sets(found, _outcomes(theirs))
    assert len(found) > 1


def test_gradvac_differs_from_libmtl_only_in_when_it_updates_its_targets():
    # LibMTL 1.1.5 updates the EMA target rho_ij only when the cosine is below it (so its targets never rise);
    # ours, like the paper, updates it at every step. Two tasks (the visiting order cannot matter): with LibMTL's
    # targets set to ours before each step the updates agree, and LibMTL's own targets follow its rule.
    net = _Net(TASKS[:2])
    flips = [1.0, 1.0, -1.0, 1.0]  # step 2 makes the gradients agree (cosine > 0 > target): the rules part there
    batches = [(x, y * torch.tensor([1.0, flip])) for flip, (x, y) in zip(flips, map(net.batch, range(4)), strict=True)]
    host, ours = libmtl("GradVac", net), create_balancer("gradvac", TASKS[:2], beta=0.5)
    ema, libmtl_rule = torch.zeros(()), torch.zeros(())  # the paper's target and LibMTL's, replayed here
    for x, y in batches:
        matrix, _ = task_matrix(net, x, y)
        host.rho_T = ours.aggregator.gramian_weighting._phi_t.clone()
        torch.testing.assert_close(ours(matrix), host.step(x, y, beta=0.5), **TOL)
        cosine = torch.nn.functional.cosine_similarity(matrix[0], matrix[1], dim=0)  # the same for (0,1) and (1,0)
        ema = 0.5 * ema + 0.5 * cosine
        libmtl_rule = 0.5 * libmtl_rule + 0.5 * cosine if cosine < libmtl_rule else libmtl_rule
    off_diagonal = 1 - torch.eye(2)
    torch.testing.assert_close(ours.aggregator.gramian_weighting._phi_t, ema * off_diagonal, **TOL)
    replay = libmtl("GradVac", net)
    replay.rho_T = torch.zeros(2, 2)
    for x, y in batches:
        replay.step(x, y, beta=0.5)
    torch.testing.assert_close(replay.rho_T, libmtl_rule * off_diagonal, **TOL)
    assert (ema - libmtl_rule).abs() > 0.1  # the rules do differ on this run


def test_graddrop_is_libmtl_graddrop_on_one_sample_with_positive_features():
    # LibMTL (representation gradients only) draws the sign per feature from the batch-summed gradients times
    # sign(features); ours per entry of the (tasks, batch * features) matrix. With one sample and positive features
    # (Softplus) both see the same (K, 5) matrix and draw U = rand(5) from torch's generator: same seed, same update.
    net = _Net(TASKS)
    host = libmtl("GradDrop", net, rep_grad=True)
    for seed in range(4):
        x, y = net.batch(seed, size=1)
        z = net.encoder(x)
        leaf = z.detach().requires_grad_()
        losses = net.losses(leaf, y)
        matrix = torch.stack([torch.autograd.grad(loss, leaf, retain_graph=True)[0].flatten() for loss in losses])
        for leak in (0.0, 0.3):
            torch.manual_seed(seed)
            direction = create_balancer("graddrop", TASKS, leak=[leak] * 3)(matrix)
            back = torch.autograd.grad(z, net.shared(), direction.view_as(z), retain_graph=True)  # the module's pass
            ours = torch.cat([g.flatten() for g in back])
            torch.manual_seed(seed)
            torch.testing.assert_close(ours, host.step(x, y, leak=leak), **TOL)


def test_imtl_is_libmtl_imtl_over_several_steps():
    # LibMTL trains the log-scales with the model's optimizer; ours steps them itself: both plain SGD here.
    net = _Net(TASKS)
    host, ours = libmtl("IMTL", net), create_balancer("imtl", TASKS, scale_lr=0.05, scale_optimizer="sgd")
    optimizer = torch.optim.SGD([host.loss_scale], lr=0.05)
    for step in range(4):
        x, y = net.batch(step)
        matrix, losses = task_matrix(net, x, y)
        optimizer.zero_grad()
        expected = host.step(x, y)
        torch.testing.assert_close(ours(matrix, losses), expected, **TOL)
        optimizer.step()
        torch.testing.assert_close(ours.log_scales, host.loss_scale.detach(), **TOL)
    assert not torch.allclose(ours.log_scales, torch.zeros(3), atol=0.1)  # the scales did move
