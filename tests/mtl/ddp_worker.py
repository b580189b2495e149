"""Fit the toy multi-task model for a few steps, in one process or under 2-process CPU DDP, and save its weights.

    python tests/mtl/ddp_worker.py BALANCER:LEVEL[,...] DEVICES OUT.pt
Each rank trains on its contiguous slice of the same global batches, so the DDP run must equal the single-process
run on the global batch. The cases run one after the other in the same processes (launching them is most of the
cost); OUT.pt maps each case to its final weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_mtl.cli import end_distributed

sys.path.insert(0, str(Path(__file__).parent))
from toy import global_batches, make_model, rank_slice  # noqa: E402


class Slices(L.LightningDataModule):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.batches = global_batches(steps)

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader([rank_slice(b, rank, world) for b in self.batches], batch_size=None)


def fit(balancer: str, level: str, devices: int, steps: int = 4) -> tuple[int, dict]:
    model = make_model(balancer, level=level, diagnostics_every=2)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=Slices(steps))
    return trainer.global_rank, {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(cases: str, devices: int, out: str) -> None:
    torch.use_deterministic_algorithms(True)
    results, rank = {}, 0
    for case in cases.split(","):
        rank, results[case] = fit(*case.split(":"), devices)
    if rank == 0:
        torch.save(results, out)
    end_distributed()  # as the recipes do: no gloo thread left to abort the exit


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
