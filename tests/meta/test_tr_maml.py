"""TR-MAML: the simplex projection, a two-family min-max whose solution is known, and the module on family-labelled
episodes (real Omniglot alphabets)."""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
from torch import nn

from lightning_mtl.meta import TRMAML, family_ascent, family_weighted_loss, project_to_simplex


@pytest.mark.parametrize(("v", "expected"), [
    ([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),      # already on the simplex
    ([2.0, 0.0], [1.0, 0.0]),                # a vertex
    ([0.6, 0.6], [0.5, 0.5]),                # shifted down equally
    ([1.0, 0.4, -3.0], [0.8, 0.2, 0.0]),     # tau = 0.2; the negative entry clipped
])
def test_projection_onto_the_simplex_known_cases(v, expected):
    torch.testing.assert_close(project_to_simplex(torch.tensor(v, dtype=torch.float64)),
                               torch.tensor(expected, dtype=torch.float64))


def test_projection_is_the_closest_point_of_the_simplex():
    """Against a brute-force search on a fine grid of the 3-simplex, and the KKT form max(v - tau, 0)."""
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([(a / 200, b / 200, (200 - a - b) / 200) for a, b in itertools.product(range(201), repeat=2)
                         if a + b <= 200], dtype=torch.float64)
    for _ in range(20):
        v = torch.randn(3, generator=g, dtype=torch.float64) * 2
        p = project_to_simplex(v)
        assert p.min() >= 0 and abs(float(p.sum()) - 1) < 1e-12
        best = grid[(grid - v).norm(dim=1).argmin()]
        assert float((p - v).norm()) <= float((best - v).norm()) + 1e-12
        tau = (v - p)[p > 0]
        assert torch.allclose(tau, tau[0].expand_as(tau))  # one threshold on the support


def test_two_families_reach_the_known_min_max_solution():
    """F1 = (t - 1)^2, F2 = 4 (t + 1)^2: min_t max(F1, F2) is at t = -1/3 (F1 = F2 = 16/9) with weights (2/3, 1/3)
    (stationarity: 2 p1 (t - 1) + 8 p2 (t + 1) = 0); the average (MAML) is minimised at t = -0.6 instead."""
    t = torch.tensor(0.0, requires_grad=True)
    p = torch.tensor([0.5, 0.5])
    families = torch.tensor([0, 1])
    optimizer = torch.optim.SGD([t], lr=0.01)
    for _ in range(4000):
        losses = torch.stack([(t - 1) ** 2, 4 * (t + 1) ** 2])
        optimizer.zero_grad()
        family_weighted_loss(p, families, losses).backward()
        optimizer.step()
        p = family_ascent(p, families, losses, lr=0.01)
    assert abs(t.item() + 1 / 3) < 1e-4
    torch.testing.assert_close(p, torch.tensor([2 / 3, 1 / 3]), atol=1e-4, rtol=0)


def test_uniform_weights_give_mamls_loss():
    losses, families = torch.tensor([1.0, 3.0, 2.0, 6.0]), torch.tensor([0, 2, 1, 2])
    assert float(family_weighted_loss(torch.full((3,), 1 / 3), families, losses)) == pytest.approx(3.0)


def test_trmaml_on_alphabet_episodes_moves_weight_to_hard_alphabets_and_logs_the_worst(omniglot_root, cache_dir):
    from lightning_mtl.datamodules import EpisodeSettings, OmniglotEpisodes

    data = OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir), download=False, family_episodes=True,
                            episodes=EpisodeSettings(train_ways=5, eval_ways=5, meta_batch_size=4, val_episodes=20,
                                                     eval_meta_batch_size=10))
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Flatten())
    model = TRMAML(backbone=backbone, family_lr=0.05, inner_steps=1, eval_inner_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, val_check_interval=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        log_every_n_steps=1)
    trainer.fit(model, datamodule=data)
    weights = model.family_weights
    assert weights.numel() == data.samplers["train"].num_families == 33 == model.hparams.families
    assert abs(float(weights.sum()) - 1) < 1e-6 and float(weights.min()) >= 0
    assert float(weights.max()) > 1 / 33  # the ascent moved weight to the families with the largest losses
    metrics = trainer.callback_metrics
    assert 0 <= float(metrics["val/worst_family_acc"]) <= float(metrics["val/acc"]) <= 1


def test_trmaml_needs_family_episodes():
    with pytest.raises(ValueError, match="families"):
        TRMAML(families=1)
    with pytest.raises(ValueError, match="drop meta_balancer"):
        TRMAML(meta_balancer="pcgrad")


def test_trmaml_refuses_data_with_more_families_than_weights_before_training(omniglot_root, cache_dir):
    from lightning_mtl.datamodules import OmniglotEpisodes

    data = OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir), download=False, family_episodes=True)
    model = TRMAML(families=2, backbone=nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Flatten()))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="33 task families but the model weighs 2; set model families to 33"):
        trainer.fit(model, datamodule=data)
    assert trainer.global_step == 0
