"""Gradient plumbing for manual multi-task optimisation: per-task gradients, flattening, cross-rank reduction and
loss scaling for 16-bit mixed precision."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def grads(
    output: Tensor | Sequence[Tensor],
    params: Sequence[Tensor],
    retain_graph: bool = False,
    grad_outputs: Tensor | Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """``d output / d p`` (a vector-Jacobian product with ``grad_outputs`` for a non-scalar ``output``) for every
    ``p``, with zeros where ``output`` does not depend on ``p``."""
    if not params:
        return []
    out = torch.autograd.grad(output, list(params), grad_outputs=grad_outputs, retain_graph=retain_graph,
                              allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out, strict=True)]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def task_matrix(losses: Sequence[Tensor], params: Sequence[Tensor], out: Tensor) -> Tensor:
    """Write ``d losses[k] / d params`` (flattened) into row ``k`` of ``out``, a ``(K, sum numel)`` buffer, with one
    ``torch.autograd.grad`` call per task. The graph is retained for later passes."""
    for k, loss in enumerate(losses):
        torch.cat([g.reshape(-1) for g in grads(loss, params, retain_graph=True)], out=out[k])
    return out


def task_matrix_vmap(losses: Tensor, z: Tensor, params: Sequence[Tensor], out: Tensor) -> Tensor:
    """:func:`task_matrix` for losses that all depend on ``params`` through one tensor ``z``, in two batched passes.

    The ``(K, *z.shape)`` task gradients w.r.t. ``z`` come from one vmapped backward of ``losses`` (shape ``(K,)``)
    through the heads, then the rows from one vmapped backward of ``z`` (``is_grads_batched=True``) through the
    backbone, as torchjd's ``mtl_backward`` does. Fewer, larger kernels: on an H200 faster than the loop at
    K = 4 (launch-bound backward passes), but slower at K = 50, and slower on CPU at both (docs/history.md).
    """
    k = losses.shape[0]
    eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
    (g_z,) = torch.autograd.grad(losses, z, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
    columns = torch.autograd.grad(z, list(params), grad_outputs=g_z, is_grads_batched=True, retain_graph=True,
                                  allow_unused=True)
    offset = 0
    for p, c in zip(params, columns, strict=True):
        block = out[:, offset: offset + p.numel()]
        block.zero_() if c is None else block.copy_(c.reshape(k, -1))
        offset += p.numel()
    return out


class Buffer:
    """A float32 matrix kept from step to step.

    Per-task gradient matrices are megabytes; allocating a fresh one every step makes the allocator map new pages
    and fault them in, which on CPU cost more than the arithmetic (docs/history.md).
    """

    def __init__(self) -> None:
        self._tensor: Tensor | None = None

    def get(self, rows: int, cols: int, device: torch.device) -> Tensor:
        t = self._tensor
        if t is None or t.shape != (rows, cols) or t.device != device:
            self._tensor = t = torch.empty(rows, cols, device=device, dtype=torch.float32)
        return t


def all_finite(*tensors: Tensor | None) -> bool:
    """Whether every element of every tensor is finite; one host synchronisation.

    A sum is non-finite whenever an element is, so one reduction per tensor decides the common case without a
    boolean copy of each tensor; only a non-finite sum (which a huge finite sum can also give) is checked exactly.
    """
    present = [t for t in tensors if t is not None and t.numel()]
    if not present:
        return True
    total = torch.stack([t.sum(dtype=torch.float32) for t in present]).sum()
    if bool(torch.isfinite(total)):
        return True
    return all(bool(torch.isfinite(t).all()) for t in present)


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    sizes = [p.numel() for p in like]
    return [v.view_as(p) for v, p in zip(vector.split(sizes), like, strict=True)]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: Tensor, op: str = "mean") -> Tensor:
    """In-place sum or mean over ranks (a no-op in a single process)."""
    if distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        if op == "mean":
            tensor.div_(dist.get_world_size())
    return tensor


def all_gather_columns(matrix: Tensor) -> tuple[Tensor, int]:
    """Concatenate ``(K, n)`` matrices of all ranks along columns (rank order); returns it and this rank's offset.

    Every rank must hold the same ``n`` (equal per-rank batch sizes).
    """
    if not distributed():
        return matrix, 0
    parts = [torch.empty_like(matrix) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, matrix.contiguous())
    return torch.cat(parts, dim=1), dist.get_rank() * matrix.shape[1]


class LossScale:
    """The loss scale of 16-bit mixed precision for gradients obtained with ``torch.autograd.grad``.

    Per-task gradients never pass through ``GradScaler.step``'s unscaling, so losses are scaled with the scaler's
    current scale, the gradients divided by it before aggregation, and the final update multiplied by it again
    before ``optimizer.step()``, where GradScaler unscales, checks for overflow (skipping the step and backing off
    the scale) and updates the scale as usual.
    """

    def __init__(self, scaler: torch.amp.GradScaler | None) -> None:
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self._value = 1.0
        self.refresh()

    def refresh(self) -> None:
        """Read the scaler's current scale (one host synchronisation); call once per step, before :meth:`value`.

        ``GradScaler.get_scale()`` synchronises with the device on every call, so a step that divided each
        parameter's gradient by it stalled the GPU dozens of times; the scale only changes in ``scaler.update()``,
        after the optimizer step.
        """
        if self.scaler is not None:
            self._value = self.scaler.get_scale()

    @property
    def enabled(self) -> bool:
        return self.scaler is not None

    def scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, tensor: Tensor) -> Tensor:
        """Divide ``tensor`` (a fresh gradient buffer) by the scale in place; a no-op without 16-bit precision."""
        return tensor.div_(self._value) if self.scaler is not None else tensor

    def value(self) -> float:
        """The scale read by the last :meth:`refresh` (1 without 16-bit mixed precision)."""
        return self._value
