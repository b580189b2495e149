"""lightning_mtl.checkpointing: atomic writes, weights-only loads, RNG states per rank, last.ckpt every N steps."""

from __future__ import annotations

import random
from fractions import Fraction
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.checkpointing import AtomicCheckpointIO, RecipeCheckpoint, RNGStates, write_atomic


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.ckpt"
    write_atomic(b"old", path)
    write_atomic(memoryview(b"new" * 1000), path)
    assert path.read_bytes() == b"new" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_write_atomic_survives_short_writes(tmp_path, monkeypatch):
    """``os.write`` may write fewer bytes than asked (a slow or full device): every byte still lands, in order."""
    import os

    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    payload = bytes(range(256)) * 10
    write_atomic(payload, tmp_path / "x.ckpt")
    assert (tmp_path / "x.ckpt").read_bytes() == payload


def test_checkpoint_io_loads_weights_only_unless_told_otherwise(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.arange(3), "n": 1}, tmp_path / "a" / "plain.ckpt")  # creates the folder
    assert torch.equal(io.load_checkpoint(tmp_path / "a" / "plain.ckpt")["w"], torch.arange(3))
    io.save_checkpoint({"odd": Fraction(1, 3)}, tmp_path / "pickled.ckpt")
    with pytest.raises(Exception, match="Weights only load failed"):
        io.load_checkpoint(tmp_path / "pickled.ckpt")
    assert io.load_checkpoint(tmp_path / "pickled.ckpt", weights_only=False)["odd"] == Fraction(1, 3)


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.randn()  # a cached Gaussian is part of numpy's state
    saved = RNGStates().state_dict()
    torch.save(saved, tmp_path / "rng.pt")
    expected = _draws()
    _draws(), torch.manual_seed(99)  # move on
    callback = RNGStates()
    callback.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    callback.on_train_start(SimpleNamespace(world_size=1, global_rank=0), None)
    got = _draws()
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_rng_states_of_another_world_size_are_not_restored():
    callback = RNGStates()
    callback.load_state_dict({"ranks": [RNGStates().state_dict()["ranks"][0]] * 2})
    state = torch.get_rng_state()
    with pytest.warns(UserWarning, match="random states of 2 ranks, this run has 1"):
        callback.on_train_start(SimpleNamespace(world_size=1, global_rank=0), None)
    assert torch.equal(torch.get_rng_state(), state)


class _Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/score", -nn.functional.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Recorded(RecipeCheckpoint):
    """Records the step and validation count of every last.ckpt written."""

    def _save_last_checkpoint(self, trainer, monitor_candidates):
        super()._save_last_checkpoint(trainer, monitor_candidates)
        state = torch.load(self.last_model_path, weights_only=True)
        vals = state["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]["completed"]
        self.written = [*getattr(self, "written", []), (state["global_step"], vals)]


def test_last_ckpt_every_n_steps_and_after_a_validation_at_that_step(tmp_path):
    data = TensorDataset(torch.randn(64, 2), torch.randn(64, 1))
    checkpoint = _Recorded(dirpath=tmp_path, filename="best-{step}", monitor="val/score", mode="max", save_last=True,
                           every_n_train_steps=3)
    trainer = L.Trainer(max_steps=12, val_check_interval=6, check_val_every_n_epoch=None, limit_val_batches=1,
                        num_sanity_val_steps=0, callbacks=[checkpoint], plugins=[AtomicCheckpointIO()],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(_Regression(), DataLoader(data, batch_size=2), DataLoader(data, batch_size=8))
    # steps 3 and 9 at once; 6 and 12 after their validation (1 and 2 validation batches done): never a stale best
    written = sorted(set(checkpoint.written))
    assert written == [(3, 0), (6, 1), (9, 1), (12, 2)], written
    best = torch.load(checkpoint.best_model_path, weights_only=True)
    assert best["global_step"] in (6, 12)  # chosen at a validation, with that validation's weights


def test_run_dirpath_names_config_and_model():
    from lightning_mtl.cli import model_identity, run_dirpath

    class File:  # a --config file as jsonargparse hands it over
        def __init__(self, path, text):
            self.path, self.text = path, text

        def get_content(self):
            return self.text

        def __str__(self):
            return self.path

    protonet = File("recipes/configs/omniglot/protonet.yaml",
                    "model:\n  class_path: lightning_mtl.meta.ProtoNet\n  init_args:\n    backbone:\n"
                    "      class_path: lightning_mtl.nn.Conv4\ncheckpoint:\n  dirpath: runs/o/protonet/checkpoints\n")
    conv4 = {"backbone": {"class_path": "lightning_mtl.nn.Conv4"}}
    same = {"class_path": "lightning_mtl.meta.ProtoNet", "init_args": conv4}
    maml = {"class_path": "lightning_mtl.meta.MAML", "init_args": conv4}
    assert model_identity(maml) == ["MAML", "Conv4"]
    assert run_dirpath("runs/o/protonet/checkpoints", [protonet], same) == ("runs/o/protonet/checkpoints", None)
    path, why = run_dirpath("runs/o/protonet/checkpoints", [protonet], maml)
    assert path == "runs/o/protonet-MAML/checkpoints" and "ProtoNet" in why and "MAML" in why
    assert run_dirpath("/tmp/x/ckpt", [protonet], maml) == ("/tmp/x/ckpt", None)  # given on the command line
    assert run_dirpath(None, [protonet], maml)[0] == "runs/protonet-MAML/checkpoints"
    assert run_dirpath(None, [], maml)[0] == "runs/MAML/checkpoints"
    hps = File("hps.yaml", "model:\n  class_path: lightning_mtl.mtl.MultiTaskModule\n  init_args:\n    architecture:\n"
                           "      class_path: lightning_mtl.mtl.architectures.HardSharing\n    balancer: equal\n"
                           "checkpoint:\n  dirpath: runs/m/hps/checkpoints\n")
    mtan = {"class_path": "lightning_mtl.mtl.MultiTaskModule",
            "init_args": {"architecture": {"class_path": "lightning_mtl.mtl.architectures.MTAN"}, "balancer": "pcgrad"}}
    assert run_dirpath("runs/m/hps/checkpoints", [hps], mtan)[0] == "runs/m/hps-MTAN-pcgrad/checkpoints"
