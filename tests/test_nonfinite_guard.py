"""NonFiniteGuard: a NaN/Inf loss skips the optimizer step (weights unchanged) or stops training, for automatic
(ProtoNet) and manual (Reptile) optimisation."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_mtl import Episode
from lightning_mtl.callbacks import NonFiniteGuard
from lightning_mtl.meta import ProtoNet, Reptile


def episodes(poison_step: int, steps: int = 3) -> list[Episode]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(steps):
        sx, qx = torch.rand(1, 6, 1, 4, 4, generator=g), torch.rand(1, 6, 1, 4, 4, generator=g)
        if i == poison_step:
            sx[0, 0, 0, 0, 0] = float("nan")
        y = torch.arange(3).repeat_interleave(2)[None]
        out.append(Episode(sx, y, qx, y.clone(), 3))
    return out


def models() -> dict[str, L.LightningModule]:
    torch.manual_seed(0)
    return {
        "protonet": ProtoNet(backbone=nn.Sequential(nn.Flatten(), nn.Linear(16, 8))),
        "reptile": Reptile(ways=3, backbone=nn.Sequential(nn.Flatten(), nn.Linear(16, 8)), image_shape=(1, 4, 4),
                           inner_optimizer="sgd", inner_lr=0.1, inner_steps=1, inner_batch_size=None, outer_lr=1.0,
                           outer_lr_final=1.0),
    }


def fit(model: L.LightningModule, data: list[Episode], guard: NonFiniteGuard | None) -> None:
    trainer = L.Trainer(max_steps=len(data), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[guard] if guard else [])
    trainer.fit(model, DataLoader(data, batch_size=None, collate_fn=lambda e: e))


@pytest.mark.parametrize("name", ["protonet", "reptile"])
def test_skip_trains_as_if_the_bad_episode_were_absent(name):
    good = episodes(poison_step=-1, steps=2)
    clean = models()[name]
    fit(clean, good, None)
    guarded = models()[name]
    with pytest.warns(UserWarning, match=r"^step 1: non-finite gradient in .*; optimizer step skipped \(1 so far"):
        fit(guarded, [good[0], episodes(poison_step=1)[1], good[1]], NonFiniteGuard("skip"))
    # Adam (ProtoNet) counts steps per parameter, so a skipped step leaves no trace at all; Reptile (constant outer
    # step here) draws a permutation of each task's examples, which only reorders its whole-task inner batch
    tol = {"atol": 0.0, "rtol": 0.0} if name == "protonet" else {"atol": 1e-6, "rtol": 0.0}
    for (k, a), b in zip(clean.state_dict().items(), guarded.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, **tol, msg=k)


@pytest.mark.parametrize("name", ["protonet", "reptile"])
def test_unguarded_nan_corrupts_and_raise_stops(name):
    model = models()[name]
    fit(model, episodes(poison_step=0, steps=1), None)
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # what the guard prevents
    model = models()[name]
    with pytest.raises(FloatingPointError, match=r"^step 0: non-finite gradient in .* stopping \(nonfinite.mode="):
        fit(model, episodes(poison_step=0, steps=1), NonFiniteGuard("raise"))


def test_skipped_step_keeps_the_weights_bit_for_bit():
    model = models()["protonet"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="optimizer step skipped"):
        fit(model, episodes(poison_step=0, steps=1), NonFiniteGuard("skip"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be 'skip', 'raise' or 'off', got 'ignore'"):
        NonFiniteGuard("ignore")


def test_off_lets_the_nan_through():
    model = models()["protonet"]
    fit(model, episodes(poison_step=0, steps=1), NonFiniteGuard("off"))
    assert not all(torch.isfinite(p).all() for p in model.parameters())
