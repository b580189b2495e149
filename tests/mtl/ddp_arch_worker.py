"""Fit the toy multi-task model on one architecture of the contract test for a few steps, in one process or under
2-process CPU DDP, and save its weights.

    python tests/mtl/ddp_arch_worker.py ARCHITECTURE:BALANCER:LEVEL[,...] DEVICES OUT.pt

ARCHITECTURE is a class name of ``FACTORIES`` in ``test_architecture_contract.py``; the cases run one after the
other in the same processes (one launch and one process group for all: starting them is most of the cost), and
OUT.pt maps each case to its final weights. Each rank trains on its
contiguous slice of the same global batches, so the DDP run must equal the single-process run on the global batch.

BatchNorm (MTAN's attention and f blocks) normalises with the statistics of the batch it sees: under DDP, of the
rank's slice, unless converted to SyncBatchNorm, which needs GPUs (Lightning's ``sync_batchnorm=True``). On CPU the
two runs then differ by design, so here BatchNorm layers normalise with their running statistics (evaluation mode)
in both runs; their affine parameters still train.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_mtl.cli import end_distributed

sys.path.insert(0, str(Path(__file__).parent))
from test_architecture_contract import batches, build  # noqa: E402
from toy import rank_slice  # noqa: E402


class Slices(L.LightningDataModule):
    def __init__(self, name: str, steps: int) -> None:
        super().__init__()
        self.batches = batches(name, steps)

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader([rank_slice(b, rank, world) for b in self.batches], batch_size=None)


class RunningStatsBatchNorm(L.Callback):
    """BatchNorm in evaluation mode during training (see the module docstring)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for m in pl_module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def fit(name: str, balancer: str, level: str, devices: int, steps: int = 4) -> tuple[int, dict]:
    model = build(name, balancer, level=level, diagnostics_every=2)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[RunningStatsBatchNorm()],
    )
    trainer.fit(model, datamodule=Slices(name, steps))
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
