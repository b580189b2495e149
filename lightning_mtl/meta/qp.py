"""A small batched, differentiable solver of dense convex quadratic programs.

Solves B problems at once::

    minimise_z  1/2 z^T Q z + p^T z    subject to  G z <= h,  A z = b

with ``Q`` positive definite (at least on the null space of ``A``), ``G`` of ``m >= 1`` rows and ``A`` of full row
rank (or no equality at all).

Forward: a primal-dual interior point method with Mehrotra's predictor-corrector steps, the method of CVXOPT's
``coneqp`` (Vandenberghe, "The CVXOPT linear and quadratic cone program solvers", 2010) and of qpth, the solver of
OptNet. With slacks ``s >= 0`` (``G z + s = h``) and multipliers ``lam >= 0`` (inequalities) and ``nu``
(equalities), each Newton step on the KKT conditions is reduced to the positive definite system
``(Q + G^T diag(lam / s) G) dz + A^T dnu = r, A dz = r'``, solved by a Cholesky factorisation and, for the
equalities, a Cholesky-factorised Schur complement ``A (Q + G^T D G)^{-1} A^T``. One factorisation serves the
predictor and the corrector step.

Backward: implicit differentiation of the KKT conditions at the solution (Amos & Kolter, "OptNet: Differentiable
Optimization as a Layer in Neural Networks", ICML 2017, arXiv:1703.00443, Sec. 3). With the incoming gradient
``g = dl/dz*``, one solve of the transposed KKT system with ``w = diag(lam) dlam`` as unknown::

    [Q  G^T  A^T] [dz ]   [-g]
    [G  -E   0  ] [w  ] = [ 0]      E = diag(s / lam)
    [A  0    0  ] [dnu]   [ 0]

gives::

    dl/dQ = 1/2 (dz z^T + z dz^T)   dl/dp = dz
    dl/dG = lam dz^T + w z^T        dl/dh = -w
    dl/dA = nu dz^T + dnu z^T       dl/db = -dnu

Gradients are returned for all six inputs (the SVM of MetaOptNet only needs ``Q``). ``s`` and ``lam`` are the last
iterate's: active constraints have ``E ~ 0`` (they act as equalities), inactive ones a huge ``E`` (their ``w ~ 0``).
This symmetric form is factorised (LDL^T) as it is rather than reduced like the forward steps, whose ``lam / s``
would span more than float64 can factorise at a converged solution (qpth reduces it and clamps ``lam, s >= 1e-8``).

Precision: the solver works in the dtype of its inputs; float64 is the one to use. Near the solution ``lam / s``
spans ~20 orders of magnitude, which float32 cannot resolve: on 30 random problems of 6 variables, 8 inequalities and
2 equalities, float32 solutions were off by up to 5e-4 (relative) after 20 iterations, float64 ones (tol 1e-10) by
2e-9 against quadprog. qpth's float32 mode is known for "inaccurate solution" warnings. The problems are small
(hundreds of variables), so the float64 cost stays modest next to the embedding network.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _gmv(g: Tensor | None, x: Tensor) -> Tensor:
    """``G x`` for ``x`` ``(B, n)``; ``g = None`` is the identity."""
    return x if g is None else (g @ x.unsqueeze(-1)).squeeze(-1)


def _gtmv(g: Tensor | None, x: Tensor) -> Tensor:
    """``G^T x`` for ``x`` ``(B, m)``."""
    return x if g is None else (x.unsqueeze(-2) @ g).squeeze(-2)


def _factor(q: Tensor, g: Tensor | None, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cholesky factors of ``M = Q + G^T diag(d) G`` and of the Schur complement ``A M^{-1} A^T``, and a ``(B,)`` flag
    of the problems whose factorisation failed."""
    m = q + (torch.diag_embed(d) if g is None else g.transpose(-1, -2) @ (d.unsqueeze(-1) * g))  # (B, n, n)
    chol_m, info = torch.linalg.cholesky_ex(m)  # _ex: no device synchronisation for the error check
    minv_at = torch.cholesky_solve(a.transpose(-1, -2), chol_m)  # (B, n, r)
    if not a.shape[-2]:
        return chol_m, minv_at, minv_at.new_zeros(a.shape[0], 0, 0), info != 0
    chol_s, info_s = torch.linalg.cholesky_ex(a @ minv_at)
    return chol_m, minv_at, chol_s, (info != 0) | (info_s != 0)


def _solve(factor: tuple[Tensor, ...], a: Tensor, rx: Tensor, ry: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, y)`` with ``M x + A^T y = rx`` and ``A x = ry`` (``rx`` ``(B, n)``, ``ry`` ``(B, r)``)."""
    chol_m, minv_at, chol_s, _ = factor
    x = torch.cholesky_solve(rx.unsqueeze(-1), chol_m)  # (B, n, 1)
    if not a.shape[-2]:
        return x.squeeze(-1), ry
    y = torch.cholesky_solve(a @ x - ry.unsqueeze(-1), chol_s)  # (B, r, 1)
    return (x - minv_at @ y).squeeze(-1), y.squeeze(-1)


def _outer(u: Tensor, v: Tensor) -> Tensor:
    return u.unsqueeze(-1) * v.unsqueeze(-2)


def _max_step(v: Tensor, dv: Tensor) -> Tensor:
    """Largest ``t`` with ``v + t dv >= 0`` per problem (inf when ``dv >= 0``)."""
    return torch.where(dv < 0, -v / dv, torch.full_like(v, float("inf"))).amin(-1)


def _newton(factor, g: Tensor | None, a: Tensor, s: Tensor, lam: Tensor, rd: Tensor, rp: Tensor, re: Tensor,
            rc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Newton direction ``(dz, ds, dlam, dnu)`` on the KKT conditions, ``s * lam`` driven to ``s * lam - rc``."""
    u = (lam * rp - rc) / s
    dz, dnu = _solve(factor, a, -rd - _gtmv(g, u), -re)
    gdz = _gmv(g, dz)
    # ds from G dz + ds = -rp, dlam from lam * ds + s * dlam = -rc
    return dz, -rp - gdz, u + lam / s * gdz, dnu


def _interior_point(q, p, g, h, a, b, max_iter: int, tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Primal-dual interior point iterations; returns ``z, s, lam, nu`` of the last iterate."""
    # start (CVXOPT): the solution with D = I, i.e. of min 1/2 z^T Q z + p^T z + 1/2 ||G z - h||^2 s.t. A z = b,
    # then slacks and multipliers shifted into the positive orthant
    z, nu = _solve(_factor(q, g, a, torch.ones_like(h)), a, -p + _gtmv(g, h), b)
    s = h - _gmv(g, z)
    lam = -s

    def shift(v: Tensor) -> Tensor:
        low = v.amin(-1, keepdim=True)
        return torch.where(low < 1e-8, v + 1 - low, v)

    s, lam = shift(s), shift(lam)
    for _ in range(max_iter):
        rd = _gmv(q, z) + p + _gtmv(g, lam) + _gtmv(a, nu)  # dual residual (B, n)
        rp = _gmv(g, z) + s - h  # primal residual (B, m)
        re = _gmv(a, z) - b  # (B, r)
        mu = (s * lam).mean(-1)  # (B,) duality measure
        # the largest complementarity product, not mu: one loose near-active constraint shifts the solution
        error = torch.cat([rd.abs(), rp.abs(), re.abs(), s * lam], -1).amax(-1)
        done = error <= tol  # (B,) converged problems stay where they are
        if tol > 0 and bool(done.all()):  # the only device synchronisation; tol = 0 runs all iterations
            break
        factor = _factor(q, g, a, lam / s)
        # predictor (affine scaling) step, then the corrector aiming at sigma * mu with Mehrotra's second-order term
        _, ds, dlam, _ = _newton(factor, g, a, s, lam, rd, rp, re, s * lam)
        step = torch.minimum(_max_step(s, ds), _max_step(lam, dlam)).clamp(max=1).unsqueeze(-1)
        sigma = (((s + step * ds) * (lam + step * dlam)).sum(-1) / (s * lam).sum(-1)).pow(3)
        rc = s * lam + ds * dlam - (sigma * mu).unsqueeze(-1)
        dz, ds, dlam, dnu = _newton(factor, g, a, s, lam, rd, rp, re, rc)
        step = (0.99 * torch.minimum(_max_step(s, ds), _max_step(lam, dlam))).clamp(max=1).unsqueeze(-1)
        # Past convergence lam / s spans more than float64 can factorise: a problem whose factorisation fails or whose
        # step is not finite keeps its last iterate (where(), not step = 0, as the direction may hold inf / nan)
        finite = torch.stack([x.isfinite().all(-1) for x in (dz, ds, dlam, dnu, step)], -1).all(-1)
        keep = (done | factor[3] | ~finite).unsqueeze(-1)
        z = torch.where(keep, z, z + step * dz)
        s = torch.where(keep, s, s + step * ds)
        lam = torch.where(keep, lam, lam + step * dlam)
        nu = torch.where(keep, nu, nu + step * dnu)
    return z, s, lam, nu


def _batched(x: Tensor | None, ndim: int, batch: int) -> Tensor | None:
    """``x`` with a leading batch dimension of size ``batch`` (an unbatched input is shared by every problem)."""
    if x is None:
        return None
    return (x if x.ndim == ndim + 1 else x.unsqueeze(0)).expand(batch, *x.shape[-ndim:])


def _unbatched_like(grad: Tensor, x: Tensor) -> Tensor:
    """Sum ``grad`` over the batch where ``x`` was broadcast to it."""
    if grad.ndim > x.ndim:
        return grad.sum(0)
    return grad.sum(0, keepdim=True) if x.shape[0] == 1 and grad.shape[0] != 1 else grad


class _QPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, p, g, h, a, b, max_iter, tol):
        shaped = ((q, 2), (p, 1), (g, 2), (h, 1), (a, 2), (b, 1))
        batch = max(x.shape[0] if x is not None and x.ndim == nd + 1 else 1 for x, nd in shaped)
        z, s, lam, nu = _interior_point(*(_batched(x, nd, batch) for x, nd in shaped), max_iter, tol)
        ctx.save_for_backward(q, p, g, h, a, b, z, s, lam, nu)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        q, p, g, h, a, b, z, s, lam, nu = ctx.saved_tensors
        (batch, n), m, r = z.shape, s.shape[-1], nu.shape[-1]
        # the KKT system transposed (symmetric for a symmetric Q), with w = diag(lam) dlam as unknown:
        #   [Q  G^T  A^T] [dz ]   [-g]
        #   [G  -E   0  ] [w  ] = [ 0]     E = diag(s / lam): ~0 for active, huge for inactive constraints,
        #   [A  0    0  ] [dnu]   [ 0]     a well-scaled system where the reduced one holds lam / s in (0, inf)
        gm = torch.eye(n, dtype=z.dtype, device=z.device) if g is None else g
        kkt = z.new_zeros(batch, n + m + r, n + m + r)
        kkt[:, :n, :n] = q
        kkt[:, n : n + m, :n] = gm
        kkt[:, :n, n : n + m] = gm.transpose(-1, -2)
        kkt[:, n + m :, :n] = a
        kkt[:, :n, n + m :] = a.transpose(-1, -2)
        tiny = torch.finfo(s.dtype).tiny  # only guards the division: E may span any range
        kkt[:, n : n + m, n : n + m] = -torch.diag_embed(s.clamp(min=tiny) / lam.clamp(min=tiny))
        # LDL^T (Bunch-Kaufman) of the symmetric indefinite matrix; it also avoids batched CPU LU, which returns wrong
        # pivots from 200x200 up with several threads in torch 2.14 + MKL 2024.2
        ld, pivots, _ = torch.linalg.ldl_factor_ex(kkt)
        rhs = torch.cat([-grad_z, grad_z.new_zeros(batch, m + r)], -1).unsqueeze(-1)
        dz, w, dnu = torch.linalg.ldl_solve(ld, pivots, rhs).squeeze(-1).split([n, m, r], -1)
        grads = (
            0.5 * (_outer(dz, z) + _outer(z, dz)),  # Q
            dz,  # p
            _outer(lam, dz) + _outer(w, z),  # G
            -w,  # h
            _outer(nu, dz) + _outer(dnu, z),  # A
            -dnu,  # b
        )
        inputs, needs = (q, p, g, h, a, b), ctx.needs_input_grad[:6]
        return (*(_unbatched_like(gr, x) if need else None for gr, x, need in zip(grads, inputs, needs, strict=True)),
                None, None)


def solve_qp(
    Q: Tensor,
    p: Tensor,
    G: Tensor | None,
    h: Tensor,
    A: Tensor | None = None,
    b: Tensor | None = None,
    max_iter: int = 20,
    tol: float = 1e-10,
) -> Tensor:
    """Solutions ``z*`` ``(B, n)`` of ``min 1/2 z^T Q z + p^T z s.t. G z <= h, A z = b``, differentiable in every input.

    Any argument may drop its leading batch dimension to be shared by all ``B`` problems.

    Args:
        Q: ``(B, n, n)`` symmetric positive definite quadratic term.
        p: ``(B, n)`` linear term.
        G: ``(B, m, n)`` inequality matrix, ``m >= 1``; ``None`` for the identity (upper bounds ``z <= h``), which
            saves a dense ``G^T D G`` product per iteration.
        h: ``(B, m)`` inequality bounds; the inequalities must be strictly feasible.
        A: ``(B, r, n)`` equality matrix of full row rank, or ``None`` for no equality.
        b: ``(B, r)`` equality right-hand side (``None`` with ``A``).
        max_iter: most interior point iterations (each one Cholesky factorisation and two solves).
        tol: a problem stops once its residuals ``|Q z + p + G^T lam + A^T nu|``, ``|G z + s - h|``, ``|A z - b|``
            and complementarity products ``s_j lam_j`` are all ``<= tol``; the loop ends when all have stopped.
            ``tol > 0`` costs one device synchronisation per iteration; ``tol = 0`` always runs ``max_iter``.

    Returns:
        ``(B, n)`` solutions in the dtype of the inputs (``B = 1`` when no input is batched).

    Raises:
        ValueError: shapes do not fit, no inequality, ``max_iter < 1`` or ``tol < 0``.
    """
    n = Q.shape[-1]
    if A is None:
        A, b = Q.new_zeros(0, n), Q.new_zeros(0)
    elif b is None:
        raise ValueError("solve_qp: give b with A (A z = b)")
    if max_iter < 1 or tol < 0:
        raise ValueError(f"solve_qp needs max_iter >= 1 and tol >= 0, got {max_iter} and {tol}")
    m, r = (n if G is None else G.shape[-2]), A.shape[-2]
    expected = ((Q, 2, (n, n)), (p, 1, (n,)), (G, 2, (m, n)), (h, 1, (m,)), (A, 2, (r, n)), (b, 1, (r,)))
    given = [(name, *item) for name, item in zip("QpGhAb", expected, strict=True) if item[0] is not None]
    for name, x, nd, shape in given:
        if x.ndim not in (nd, nd + 1) or tuple(x.shape[-nd:]) != shape:
            raise ValueError(f"solve_qp: {name} must be {shape} or (B, *{shape}) for n={n}, m={m}, r={r}; got "
                             f"{tuple(x.shape)}")
    if m == 0:
        raise ValueError("solve_qp needs at least one inequality (G with m >= 1 rows)")
    batches = {x.shape[0] for _, x, nd, _ in given if x.ndim == nd + 1} - {1}
    if len(batches) > 1:
        raise ValueError(f"solve_qp: the batched inputs disagree on the batch size B: {sorted(batches)}")
    return _QPFunction.apply(Q, p, G, h, A, b, max_iter, tol)
