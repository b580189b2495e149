from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


def real_data_root() -> Path | None:
    """The real data folder: $LIGHTNING_MTL_DATA if it holds Omniglot, else ../shared/data; None when absent."""
    for candidate in (os.environ.get("LIGHTNING_MTL_DATA"), SHARED_DATA):
        if candidate and (Path(candidate) / "omniglot" / "images_background.zip").exists():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    root = real_data_root()
    if root is None:
        pytest.skip("real Omniglot archives absent: set LIGHTNING_MTL_DATA to a folder holding omniglot/*.zip")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One writable cache for the whole session, so the real archives are decoded once."""
    return Path(os.environ.get("LIGHTNING_MTL_TEST_CACHE") or tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def l2l():
    """The learn2learn package; skipped when absent unless $LIGHTNING_MTL_REQUIRE_LEARN2LEARN is set (as `make test`
    and CI do after `make learn2learn`), so that the parity tests cannot silently stop running there."""
    if os.environ.get("LIGHTNING_MTL_REQUIRE_LEARN2LEARN"):
        import learn2learn

        return learn2learn
    return pytest.importorskip("learn2learn", reason="learn2learn is not installed: run `make learn2learn`")


@pytest.fixture(autouse=True)
def _no_leaked_global_seed():
    """``seed_everything`` (a recipe's ``seed_everything: 0`` too) exports PL_GLOBAL_SEED, which makes Lightning reseed
    the ranks of any later DDP subprocess; keep each test's seed to itself."""
    yield
    os.environ.pop("PL_GLOBAL_SEED", None)
