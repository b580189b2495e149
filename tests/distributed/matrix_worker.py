"""Train every recipe family for a few steps on fixed global batches, in one process or under 2-process CPU DDP.

    python tests/distributed/matrix_worker.py DEVICES PRECISION OUT.pt

Each family (metric-based, second-order gradient-based, Reptile's own outer update, multi-task loss weighting and
multi-task gradient aggregation) sees the same global batches: one process takes each whole batch, each DDP rank
its contiguous slice (episodes of a meta-batch, samples of a multi-task batch). Rank 0 saves every family's state
dict before training, after the first step and at the end, for ``test_matrix.py`` to compare across process counts
and precisions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_mtl import Episode
from lightning_mtl.cli import end_distributed
from lightning_mtl.meta import MAML, TRMAML, ProtoNet, Reptile
from lightning_mtl.nn import Conv4

sys.path.insert(0, str(Path(__file__).parents[1] / "mtl"))
from toy import global_batches, make_model, rank_slice  # noqa: E402

STEPS, WAYS, SHOTS, QUERIES, META_BATCH = 3, 3, 1, 2, 2
FAMILIES = ("protonet", "maml", "reptile", "reptile_carried", "mtl_uncertainty", "mtl_upgrad", "protonet_pcgrad",
            "maml_upgrad", "reptile_mgda", "tr_maml")


def episodes(seed: int = 0, families: bool = False) -> list[Episode]:
    """``STEPS`` global meta-batches of ``META_BATCH`` random 28x28 uint8 episodes (``families``: labelled with task
    families that differ between the halves of a meta-batch, so that DDP ranks see different families)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        def images(n: int) -> torch.Tensor:
            return torch.randint(0, 256, (META_BATCH, n, 1, 28, 28), generator=g, dtype=torch.uint8)

        labels = lambda n: torch.arange(WAYS).repeat_interleave(n).expand(META_BATCH, -1).clone()  # noqa: E731
        family = torch.arange(META_BATCH) % 2 if families else None
        out.append(Episode(images(WAYS * SHOTS), labels(SHOTS), images(WAYS * QUERIES), labels(QUERIES), WAYS, family))
    return out


def episode_slice(e: Episode, rank: int, world: int) -> Episode:
    n = e.meta_batch_size // world
    family = None if e.family is None else e.family[rank * n: (rank + 1) * n]
    return Episode(*(t[rank * n: (rank + 1) * n] for t in e[:4]), e.ways, family)


def build(family: str) -> L.LightningModule:
    """The family's module; BatchNorm-free where one process would normalise over several episodes at once."""
    torch.manual_seed(0)
    sgd = lambda p: torch.optim.SGD(p, lr=0.05)  # noqa: E731  (Adam would magnify rounding differences)
    if family in ("protonet_pcgrad", "maml_upgrad", "reptile_mgda"):  # outer-loop balancing of the meta-batch
        model = build(family.split("_")[0])
        model.meta_balancer_spec = family.split("_")[1]
        return model
    if family == "protonet":  # ProtoNet embeds a whole meta-batch in one pass: no BatchNorm across episodes
        backbone = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten())
        # random images give small gradients: a larger step makes the update well above rounding
        return ProtoNet(backbone=backbone, optimizer=lambda p: torch.optim.SGD(p, lr=2.0))
    if family == "maml":  # episodes adapted one by one: transductive BatchNorm per episode is rank-independent
        return MAML(ways=WAYS, backbone=Conv4(hidden_channels=8, out_channels=8, track_running_stats=False),
                    inner_steps=1, optimizer=sgd)
    if family == "tr_maml":  # family weights from the global meta-batch's losses: the same on every rank
        return TRMAML(ways=WAYS, backbone=Conv4(hidden_channels=8, out_channels=8, track_running_stats=False),
                      families=2, family_lr=0.5, inner_steps=1, optimizer=sgd)
    if family == "reptile":  # whole-task inner batches: no random mini-batch order to differ between ranks
        return Reptile(ways=WAYS, backbone=Conv4(hidden_channels=8, out_channels=8, track_running_stats=False),
                       inner_optimizer="sgd", inner_lr=0.05, inner_steps=2, inner_batch_size=None, outer_lr=0.5)
    if family == "reptile_carried":  # inner Adam with one state across tasks, averaged over the ranks
        return Reptile(ways=WAYS, backbone=Conv4(hidden_channels=8, out_channels=8, track_running_stats=False),
                       inner_optimizer="adam", inner_state="carried", inner_lr=1e-2, inner_steps=2,
                       inner_batch_size=None, outer_lr=0.5)
    balancer = family.removeprefix("mtl_")
    return make_model(balancer, level="parameter", diagnostics_every=2)


class Slices(L.LightningDataModule):
    def __init__(self, family: str) -> None:
        super().__init__()
        self.family = family

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if self.family.startswith("mtl_"):
            batches = [rank_slice(b, rank, world) for b in global_batches(STEPS)]
        else:
            batches = [episode_slice(e, rank, world) for e in episodes(families=self.family == "tr_maml")]
        return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


class FirstStep(L.Callback):
    """Keeps the floating-point state after the first optimizer step."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.state is None:
            self.state = floating_state(pl_module)


def floating_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def main(devices: int, precision: str, out: str) -> None:
    torch.use_deterministic_algorithms(True)
    states = {}
    for family in FAMILIES:
        model, first = build(family), FirstStep()
        trainer = L.Trainer(
            callbacks=[first], accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
            precision=precision, max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0,
        )
        initial = floating_state(model)
        trainer.fit(model, datamodule=Slices(family))
        assert trainer.global_step == STEPS and trainer.world_size == devices, (family, trainer.global_step)
        states[family] = {"initial": initial, "first": first.state, "final": floating_state(model)}
    if trainer.global_rank == 0:
        torch.save(states, out)
    end_distributed()  # as the recipes do: no gloo thread left to abort the exit


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
