"""lightning_mtl.history.MetricsHistory: the metric history of a fit as JSON lines, for recipes/report.py."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.history import MetricsHistory, read_history


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        self.log("train/nan", torch.tensor(float("nan")))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", torch.tensor(0.5 + 0.01 * self.global_step))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 2, generator=g), torch.randn(16, 1, generator=g)), batch_size=4)


def fit(tmp_path, steps: int, append: bool = False) -> None:
    trainer = L.Trainer(max_steps=steps, logger=MetricsHistory(tmp_path, append=append), log_every_n_steps=2,
                        val_check_interval=4, check_val_every_n_epoch=None, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Tiny(), loader(), loader())


def test_every_logged_row_with_its_step_and_time(tmp_path):
    fit(tmp_path, 8)
    rows = read_history(tmp_path / "metrics.jsonl")
    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if "val/acc" in r]
    # Lightning's step of a row (as W&B and CSV show it): the 0-based index of the last optimizer step before it
    assert [r["step"] for r in train] == [1, 3, 5, 7]
    assert [r["step"] for r in val] == [3, 7] and [r["val/acc"] for r in val] == pytest.approx([0.54, 0.58])
    assert all(math.isnan(r["train/nan"]) for r in train)  # written as "nan" (JSON has none), read back as float
    seconds = [r["seconds"] for r in rows]
    assert seconds == sorted(seconds) and seconds[0] >= 0


def test_a_new_fit_starts_the_file_again_and_a_resumed_one_appends(tmp_path):
    fit(tmp_path, 4)
    first = read_history(tmp_path / "metrics.jsonl")
    fit(tmp_path, 4)
    assert len(read_history(tmp_path / "metrics.jsonl")) == len(first)
    fit(tmp_path, 4, append=True)
    rows = read_history(tmp_path / "metrics.jsonl")
    assert len(rows) == 2 * len(first)
    clock = [r["seconds"] for r in rows]
    assert clock == sorted(clock)  # the appended rows continue the clock of the first ones


def test_no_file_reads_as_no_history(tmp_path):
    assert read_history(tmp_path / "missing.jsonl") == []
