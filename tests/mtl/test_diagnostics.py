"""Task-gradient diagnostics (lightning_mtl.mtl.diagnostics) on gradients whose cosines are known."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl.mtl import gradient_diagnostics


def test_cosines_conflicts_and_norm_ratios_of_known_gradients():
    # a ⟂ b, c = -2a: cos(a, b) = 0, cos(a, c) = -1, cos(b, c) = 0; norms 1, 1, 2 (mean 4/3)
    matrix = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-2.0, 0.0]])
    out = {k: float(v) for k, v in gradient_diagnostics(matrix, ["a", "b", "c"]).items()}
    assert out["cos/a|b"] == pytest.approx(0.0) and out["cos/a|c"] == pytest.approx(-1.0)
    assert out["cos/b|c"] == pytest.approx(0.0)
    assert out["cos_mean"] == pytest.approx(-1 / 3) and out["cos_min"] == pytest.approx(-1.0)
    assert out["conflict_frac"] == pytest.approx(1 / 3)
    assert [out[f"grad_norm_ratio/{t}"] for t in "abc"] == pytest.approx([0.75, 0.75, 1.5])


@pytest.mark.parametrize(("k", "pairs"), [(10, 45), (16, 120), (17, 0)])
def test_every_pair_is_logged_up_to_16_tasks(k, pairs):
    """The K x K heatmap of recipes/report.py needs every pair: logged for up to 16 tasks (10 Omniglot alphabets)."""
    tasks = [f"t{i}" for i in range(k)]
    out = gradient_diagnostics(torch.randn(k, 5, generator=torch.Generator().manual_seed(0)), tasks)
    assert sum(key.startswith("cos/") for key in out) == pairs
    assert 0.0 <= float(out["conflict_frac"]) <= 1.0 and len([key for key in out if "norm_ratio" in key]) == k
