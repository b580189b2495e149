"""A tiny deterministic multi-task problem shared by the MultiTaskModule tests and the DDP worker script."""

from __future__ import annotations

import torch
from torch import nn

from lightning_mtl import MultiTaskBatch
from lightning_mtl.mtl import MultiTaskModule

TASKS = {"a": 3, "b": 4, "c": 2}
IN_DIM = 6


def backbone() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(IN_DIM, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh())


def make_model(balancer: str = "equal", **kw) -> MultiTaskModule:
    torch.manual_seed(0)
    kw.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=0.1))
    kw.setdefault("diagnostics_every", 0)
    if "architecture" not in kw:
        kw["backbone"] = backbone()
    return MultiTaskModule(num_classes=dict(TASKS), input_shape=(IN_DIM,), balancer=balancer, **kw)


def global_batches(steps: int, batch_size: int = 8, seed: int = 0) -> list[MultiTaskBatch]:
    g = torch.Generator().manual_seed(seed)
    return [MultiTaskBatch(torch.randn(batch_size, IN_DIM, generator=g),
                           {t: torch.randint(0, c, (batch_size,), generator=g) for t, c in TASKS.items()})
            for _ in range(steps)]


def rank_slice(batch: MultiTaskBatch, rank: int, world: int) -> MultiTaskBatch:
    n = batch.x.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    return MultiTaskBatch(batch.x[sl], {t: y[sl] for t, y in batch.targets.items()})
