from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from lightning_mtl import Episode
from lightning_mtl.datamodules import EpisodeSettings, OmniglotEpisodes
from lightning_mtl.meta.matching import MatchingNetwork, matching_log_probs


def random_episode(ways=5, shots=2, queries=3, meta_batch=2, seed=0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randint(0, 255, (meta_batch, ways * shots, 1, 28, 28), generator=g, dtype=torch.uint8)
    qx = torch.randint(0, 255, (meta_batch, ways * queries, 1, 28, 28), generator=g, dtype=torch.uint8)
    sy = torch.arange(ways).repeat_interleave(shots).expand(meta_batch, -1)
    qy = torch.arange(ways).repeat_interleave(queries).expand(meta_batch, -1)
    return Episode(sx, sy, qx, qy, ways)


def test_attention_and_predictions_match_hand_computed_example():
    model = MatchingNetwork(backbone=nn.Flatten())
    # 2-D "images": class 0 has support points (1, 0) and (1, 1), class 1 has (0, 2) and (-1, 1)
    support_x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [-1.0, 1.0]]).view(1, 4, 1, 1, 2)
    query_x = torch.tensor([[3.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 1, 2)
    episode = Episode(support_x, torch.tensor([[0, 0, 1, 1]]), query_x, torch.tensor([[0, 1]]), ways=2)
    logits = model.episode_logits(episode, "train")
    # cosines: query (3, 0) → (1, r, 0, -r); query (0, 1) → (0, r, 1, r) with r = 1/√2; a = softmax of the cosines
    r = 1 / math.sqrt(2)
    expected = []
    for cos in ((1.0, r, 0.0, -r), (0.0, r, 1.0, r)):
        e = [math.exp(c) for c in cos]
        expected.append([math.log((e[0] + e[1]) / sum(e)), math.log((e[2] + e[3]) / sum(e))])
    torch.testing.assert_close(logits, torch.tensor([expected]))
    # the base cross-entropy on log-probabilities is the paper's -log P(y | x, S)
    loss = model.episode_loss(logits, episode.query_y)
    torch.testing.assert_close(loss, torch.tensor(-(expected[0][0] + expected[1][1]) / 2))


def test_identical_support_embeddings_give_uniform_predictions():
    support = torch.ones(2, 6, 4)
    log_probs = matching_log_probs(torch.randn(2, 5, 4), support, torch.tensor([[0, 1, 2, 0, 1, 2]] * 2), 3)
    torch.testing.assert_close(log_probs, torch.full((2, 5, 3), math.log(1 / 3)))


def test_empty_class_gets_a_finite_floor():
    log_probs = matching_log_probs(torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.tensor([[0, 0]]), 2)
    assert torch.isfinite(log_probs).all() and (log_probs[..., 1] == math.log(1e-8)).all()


def test_support_permutation_does_not_change_predictions_without_fce():
    torch.manual_seed(0)
    model = MatchingNetwork().eval()
    ep = random_episode()
    perm = torch.randperm(ep.support_x.shape[1])
    permuted = Episode(ep.support_x[:, perm], ep.support_y[:, perm], ep.query_x, ep.query_y, ep.ways)
    with torch.no_grad():
        torch.testing.assert_close(model.episode_logits(ep, "val"), model.episode_logits(permuted, "val"))


@pytest.mark.parametrize("fce", [False, True])
def test_fce_on_and_off_train_end_to_end(fce):
    torch.manual_seed(0)
    model = MatchingNetwork(fce=fce, fce_steps=3)
    ep = random_episode()
    logits = model.episode_logits(ep, "train")
    assert logits.shape == (2, 15, 5)
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(2, 15))
    model.episode_loss(logits, ep.query_y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert (model.fce is not None) == fce
    if fce:  # the LSTMs take part in the predictions
        assert model.fce.support_lstm.weight_ih_l0.grad.abs().sum() > 0
        assert model.fce.query_cell.weight_ih.grad.abs().sum() > 0


def test_bad_input_and_settings_give_clear_errors():
    model = MatchingNetwork()
    ep = random_episode(ways=5, shots=1)
    with pytest.raises(ValueError, match="not a positive multiple of ways=3"):
        model.validate_episode(Episode(*ep[:4], ways=3))
    with pytest.raises(ValueError, match="query_y has shape"):
        model.validate_episode(Episode(ep.support_x, ep.support_y, ep.query_x, ep.query_y[:, :2], 5))
    with pytest.raises(ValueError, match="must be \\(B, N, C, H, W\\)"):
        model.validate_episode(Episode(ep.support_x[0], ep.support_y, ep.query_x, ep.query_y, 5))
    with pytest.raises(ValueError, match="at least 2 ways"):
        model.validate_episode(Episode(ep.support_x[:, :1], ep.support_y[:, :1], ep.query_x, ep.query_y, 1))
    with pytest.raises(ValueError, match="fce_steps must be >= 1"):
        MatchingNetwork(fce=True, fce_steps=0)
    with pytest.raises(ValueError, match="cosine_scale must be > 0"):
        MatchingNetwork(cosine_scale=0.0)


def test_real_omniglot_few_training_steps(omniglot_root, cache_dir):
    torch.manual_seed(0)  # not L.seed_everything: it leaks PL_GLOBAL_SEED into later subprocesses
    dm = OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir), download=False,
                          episodes=EpisodeSettings(train_queries=5, meta_batch_size=2, val_episodes=16,
                                                   eval_meta_batch_size=16))
    model = MatchingNetwork(fce=True, fce_steps=2)
    trainer = L.Trainer(max_steps=20, val_check_interval=20, log_every_n_steps=5, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["val/acc"] > 0.4  # 5-way chance is 0.2
