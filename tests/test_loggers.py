"""W&B never stops a run: no key or no network → offline, with the reason."""

from __future__ import annotations

import pytest

from lightning_mtl.loggers import WandbLogger, wandb_offline_reason


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc


def test_no_api_key_means_offline(no_wandb_env):
    assert wandb_offline_reason() == "no W&B API key (set WANDB_API_KEY or run `wandb login`)"


def test_unreachable_host_means_offline(no_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://127.0.0.1:9")  # nothing listens on the discard port
    reason = wandb_offline_reason(timeout=0.5)
    assert reason is not None and reason.startswith("127.0.0.1 is unreachable")


def test_explicit_mode_is_respected(no_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_offline_reason() == "WANDB_MODE=disabled"


def test_logger_goes_offline_with_one_warning(no_wandb_env, tmp_path):
    with pytest.warns(UserWarning, match="W&B logging offline: no W&B API key"):
        logger = WandbLogger(save_dir=str(tmp_path / "runs"))
    assert logger._offline
    forced = WandbLogger(save_dir=str(tmp_path / "runs"), offline=True)
    assert forced._offline
