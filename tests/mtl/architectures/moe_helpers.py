"""Checks shared by the mixture-of-experts architecture tests: which task losses each parameter's gradient depends on,
forward-call counting, and gradcheck over an architecture's parameters."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_mtl.mtl.architectures.base import Architecture


def task_losses(arch: Architecture, x: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """One scalar per task: its representation read by a fixed random linear head (generic, so no gradient vanishes
    by accident)."""
    reps = arch(x)
    gen = torch.Generator().manual_seed(seed)
    return {t: (z * torch.randn(z.shape, generator=gen, dtype=z.dtype)).sum() for t, z in reps.items()}


def gradient_owners(arch: Architecture, x: Tensor) -> dict[int, set[str]]:
    """id(parameter) -> the tasks whose loss has a nonzero gradient on it."""
    params = [p for p in arch.parameters() if p.requires_grad]
    owners: dict[int, set[str]] = {id(p): set() for p in params}
    for t, loss in task_losses(arch, x).items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            if g is not None and bool(g.ne(0).any()):
                owners[id(p)].add(t)
    return owners


def check_ownership(arch: Architecture, x: Tensor) -> None:
    """``task_parameters()[t]`` is exactly what only task t's loss depends on, the shared parameters are what every
    task's loss depends on, and together they partition the trainable parameters."""
    params = [p for p in arch.parameters() if p.requires_grad]
    own = arch.task_parameters()
    assert set(own) == set(arch.tasks)
    listed = [id(p) for ps in own.values() for p in ps] + [id(p) for p in arch.shared_parameters()]
    assert len(listed) == len(set(listed)), "a parameter is listed twice (shared and task, or two tasks)"
    assert set(listed) == {id(p) for p in params}, "shared and task parameters must cover every trainable parameter"
    owners = gradient_owners(arch, x)
    for t, ps in own.items():
        for p in ps:
            assert owners[id(p)] == {t}, f"task {t}'s parameter {tuple(p.shape)} gets gradients from {owners[id(p)]}"
    for p in arch.shared_parameters():
        assert owners[id(p)] == set(arch.tasks), f"shared {tuple(p.shape)} gets gradients from {owners[id(p)]} only"


def count_calls(modules: list[nn.Module]) -> list[int]:
    """A list whose i-th entry counts the forward calls of ``modules[i]`` from now on."""
    counts = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def gradcheck_architecture(arch: Architecture, x: Tensor) -> bool:
    """``torch.autograd.gradcheck`` of every task's representation with respect to the input and every parameter
    (float64)."""
    arch = arch.double()
    names = [n for n, p in arch.named_parameters() if p.requires_grad]
    values = [p.detach().clone().requires_grad_() for n, p in arch.named_parameters() if p.requires_grad]

    def representations(x: Tensor, *params: Tensor) -> tuple[Tensor, ...]:
        reps = functional_call(arch, dict(zip(names, params, strict=True)), (x,))
        return tuple(reps[t] for t in arch.tasks)

    return torch.autograd.gradcheck(representations, (x.double().requires_grad_(), *values), eps=1e-6, atol=1e-5)
