"""Balancing paths: from a step's task losses to the gradients the optimizer applies.

One small piece per kind of balancing, each returning an :class:`Update`: the gradients to assign (aligned with the
parameters it names) and, when it computed one, the ``(tasks, dims)`` matrix of true task gradients on the shared
parameters for diagnostics. Each path reduces what its balancer consumes across ranks *before* the balancer sees it,
so a DDP step equals the single-process step on the global batch, and removes the 16-bit loss scale before
aggregation; the model only checks :attr:`Update.finite`, assigns the gradients and steps.

* :func:`loss_weighting`: the balancer maps the losses to one loss; its weights are evaluated at the losses averaged
  over ranks and applied to this rank's losses (exact under DDP for any weighting of loss values).
* :func:`parameter_aggregation`: one gradient per task on the shared parameters (``torch.autograd.grad``), averaged
  over ranks, aggregated into the shared update; task parameters get the gradient of the summed loss.
* :func:`representation_aggregation`: task gradients w.r.t. the representations (gathered over ranks), aggregated,
  then one backward pass through the architecture (MGDA-UB, Sener & Koltun 2018). Tasks that read different
  representation tensors (per-task inputs, MMoE's gates, MTAN's attention) give block-structured rows: zero outside
  the task's own block.

On every path the architecture's penalty (soft sharing) is added to the loss of the step: in the weighted loss, or,
when aggregating, as its own gradient added to the aggregated update (it is not a task's loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_mtl.mtl import gradients as G
from lightning_mtl.mtl.balancing import GradientAggregator, LossWeighting


@dataclass
class StepInputs:
    """What every balancing path reads.

    Attributes:
        tasks: task names, in the order of ``losses``.
        task_losses: this rank's task losses (float32 scalars, differentiable), one tensor per task.
        losses: ``(K,)`` the same, stacked. Per-task gradients start from ``task_losses``: a backward pass from one
            element of the stacked vector would also run through every other task's graph (with zero gradients),
            K times the work when tasks have their own inputs.
        global_losses: ``(K,)`` the losses averaged over ranks (detached).
        shared: the architecture's shared parameters (what aggregation acts on).
        others: every other trainable parameter of the model (task parameters, heads).
        penalty: the architecture's penalty, or ``None``.
        scale: the 16-bit loss scale of this step.
        diagnose: whether to return the task-gradient matrix for diagnostics.
    """

    tasks: list[str]
    task_losses: list[Tensor]
    losses: Tensor
    global_losses: Tensor
    shared: list[Tensor]
    others: list[Tensor]
    penalty: Tensor | None
    scale: G.LossScale
    diagnose: bool = False


@dataclass
class Update:
    """The gradients a balancing path computed.

    Attributes:
        params: the parameters to assign ``grads`` to.
        grads: their true (unscaled) gradients, averaged over ranks; empty when not :attr:`finite`.
        matrix: ``(K, D)`` task gradients on the shared parameters (averaged over ranks), if computed.
        finite: whether every loss and gradient the balancer read was finite; if not, nothing was aggregated.
    """

    params: list[Tensor]
    grads: list[Tensor] = field(default_factory=list)
    matrix: Tensor | None = None
    finite: bool = True


def diagnostic_matrix(inputs: StepInputs, through: tuple[list[Tensor], list[Tensor]] | None = None) -> Tensor:
    """The ``(K, D)`` true task gradients on the shared parameters, averaged over ranks: one backward per task,
    directly or (``through=(leaves, graphs)``) via the representations' leaf copies and then the architecture."""
    scale, rows = inputs.scale, []
    for task_loss in inputs.task_losses:
        loss = scale.scale(task_loss)
        if through is None:
            rows.append(G.flatten(G.grads(loss, inputs.shared, retain_graph=True)))
        else:
            leaves, graphs = through
            g_z = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
            # only the representations this task reads: with per-task inputs, one pass instead of K
            used = [(z, g) for z, g in zip(graphs, g_z, strict=True) if g is not None]
            rows.append(G.flatten(G.grads([z for z, _ in used], inputs.shared, retain_graph=True,
                                          grad_outputs=[g for _, g in used])))
    return scale.unscale_(G.all_reduce_(torch.stack(rows)))


def _reduce(grads: list[Tensor], scale: G.LossScale) -> Tensor | None:
    """Flattened, averaged over ranks and unscaled; ``None`` for no gradients."""
    return scale.unscale_(G.all_reduce_(G.flatten(grads))) if grads else None


def _unflatten(flat: Tensor | None, like: list[Tensor]) -> list[Tensor]:
    return [] if flat is None else G.unflatten(flat, like)


def _penalty_grads(penalty: Tensor | None, params: list[Tensor]) -> list[Tensor] | None:
    """The penalty's gradients, averaged over ranks (a penalty read from the batch differs between ranks). The graph
    is kept: a penalty may share it with the losses (DSelect-k's per-example gates), whose backward comes later."""
    if penalty is None or not params:
        return None
    return G.unflatten(G.all_reduce_(G.flatten(G.grads(penalty, params, retain_graph=True))), params)


def _add(grads: list[Tensor], extra: list[Tensor] | None) -> list[Tensor]:
    return grads if extra is None else [g + e for g, e in zip(grads, extra, strict=True)]


def loss_weighting(balancer: LossWeighting, inputs: StepInputs) -> Update:
    """One backward pass of ``sum_k w_k L_k`` (+ penalty), ``w_k = d balancer / d L_k`` at the rank-averaged losses.

    The gradient of the balanced loss of the global batch is then the rank average of this loss's gradients, and the
    balancer's own parameters (e.g. log-variances) get their gradient at the averaged losses, the same on every rank.
    Methods that need the shared parameters (GradNorm) weigh this rank's losses; their own gradients then come from
    this rank's loss and are averaged over ranks.
    """
    shared, others, scale, tasks = inputs.shared, inputs.others, inputs.scale, inputs.tasks
    own = [p for p in balancer.parameters() if p.requires_grad]
    losses = dict(zip(tasks, inputs.task_losses, strict=True))
    with torch.autocast(inputs.losses.device.type, enabled=False):
        if balancer.needs_shared_params:
            total, own_grads = balancer(losses, shared), None
        else:
            leaves = inputs.global_losses.detach().clone().requires_grad_()
            balanced = balancer({t: leaves[k] for k, t in enumerate(tasks)})
            outs = G.grads(balanced, [leaves, *own])
            weights = outs[0].detach()  # (K,)
            total, own_grads = (weights * inputs.losses).sum(), outs[1:]
    if inputs.penalty is not None:
        total = total + inputs.penalty
    matrix = diagnostic_matrix(inputs) if inputs.diagnose and shared else None
    with_own = own_grads is None  # GradNorm: its weights' gradients come from this loss
    params = shared + others + (own if with_own else [])
    flat = _reduce(G.grads(scale.scale(total), params), scale)
    grads = _unflatten(flat, params)
    if not with_own:
        params, grads = params + own, grads + list(own_grads)
    return Update(params, grads, matrix, G.all_finite(inputs.global_losses, flat))


def parameter_aggregation(
    balancer: GradientAggregator, inputs: StepInputs, buffer: Tensor, vmap_through: Tensor | None = None
) -> Update:
    """Aggregate the ``(K, D)`` task gradients on the shared parameters into their update.

    Args:
        balancer: the aggregator.
        inputs: the step's losses and parameters.
        buffer: a ``(K, D)`` float32 buffer the task gradients are written into (reused across steps).
        vmap_through: the one representation every loss depends on through, to compute the matrix in two vmapped
            backward passes (:func:`~lightning_mtl.mtl.gradients.task_matrix_vmap`); ``None``: one pass per task.
    """
    shared, others, scale = inputs.shared, inputs.others, inputs.scale
    if vmap_through is not None:
        G.task_matrix_vmap(scale.scale(inputs.losses), vmap_through, shared, buffer)
    else:
        G.task_matrix([scale.scale(loss) for loss in inputs.task_losses], shared, buffer)
    matrix = scale.unscale_(G.all_reduce_(buffer))  # (K, D): true gradients, averaged over ranks
    extra = _penalty_grads(inputs.penalty, shared + others)
    other_flat = _reduce(G.grads(scale.scale(inputs.losses.sum()), others), scale)
    if not G.all_finite(inputs.global_losses, matrix, other_flat):  # deciding needs a host sync
        return Update(shared + others, matrix=None, finite=False)
    direction = _aggregate(balancer, matrix, inputs.global_losses)
    grads = _add(G.unflatten(direction, shared) + _unflatten(other_flat, others), extra)
    return Update(shared + others, grads, matrix if inputs.diagnose else None)


def representation_aggregation(
    balancer: GradientAggregator, inputs: StepInputs, leaves: list[Tensor], graphs: list[Tensor], world_size: int
) -> Update:
    """Aggregate task gradients w.r.t. the representations, then back-propagate the result once.

    Args:
        balancer: the aggregator.
        inputs: the step's losses (computed from the heads on ``leaves``) and parameters.
        leaves: detached, grad-requiring copies of the distinct representation tensors the heads read.
        graphs: the representation tensors themselves, in the order of ``leaves``.
        world_size: number of ranks (each rank's rows are its share of the global-batch mean loss).
    """
    shared, others, scale = inputs.shared, inputs.others, inputs.scale
    matrix = diagnostic_matrix(inputs, (leaves, graphs)) if inputs.diagnose and shared else None
    extra = _penalty_grads(inputs.penalty, shared + others)
    rows = [G.flatten(G.grads(scale.scale(loss), leaves, retain_graph=True)) for loss in inputs.task_losses]
    # the gradient of the global-batch mean loss w.r.t. this rank's rows of the representation: local / W
    gathered, offset = G.all_gather_columns(torch.stack(rows) / world_size)
    z_matrix = scale.unscale_(gathered.float())  # (K, global B * R)
    # task parameters get the summed loss's gradient: heads directly, the architecture's own (gates, attention) by
    # carrying the leaves' gradient on through the graphs; each call gives zeros for the parameters of the other
    outs = G.grads(scale.scale(inputs.losses.sum()), [*leaves, *others], retain_graph=True)
    through = G.grads(graphs, others, retain_graph=True, grad_outputs=outs[: len(leaves)])
    other_flat = _reduce([a + b for a, b in zip(outs[len(leaves):], through, strict=True)], scale)
    if not G.all_finite(inputs.global_losses, z_matrix, other_flat):
        return Update(shared + others, finite=False)
    direction = _aggregate(balancer, z_matrix, inputs.global_losses)
    mine = direction[offset: offset + sum(z.numel() for z in leaves)]
    d_z = [scale.scale(d.view_as(z).to(z.dtype)) for d, z in zip(G.unflatten(mine, leaves), leaves, strict=True)]
    back = G.grads(graphs, shared, grad_outputs=d_z)
    shared_flat = scale.unscale_(G.all_reduce_(G.flatten(back), op="sum"))
    grads = _add(G.unflatten(shared_flat, shared) + _unflatten(other_flat, others), extra)
    return Update(shared + others, grads, matrix)


def _aggregate(balancer: GradientAggregator, matrix: Tensor, losses: Tensor) -> Tensor:
    # aggregators solve small QPs / Gramians: keep autocast out of them
    with torch.autocast(matrix.device.type, enabled=False):
        return balancer(matrix, losses if balancer.needs_losses else None)
