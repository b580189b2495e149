from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from lightning_mtl import Episode
from lightning_mtl.datamodules import EpisodeSettings, OmniglotEpisodes
from lightning_mtl.meta.relation import RelationEmbedding, RelationNetwork, class_features


def random_episode(ways=5, shots=2, queries=3, meta_batch=2, seed=0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randint(0, 255, (meta_batch, ways * shots, 1, 28, 28), generator=g, dtype=torch.uint8)
    qx = torch.randint(0, 255, (meta_batch, ways * queries, 1, 28, 28), generator=g, dtype=torch.uint8)
    sy = torch.arange(ways).repeat_interleave(shots).expand(meta_batch, -1)
    qy = torch.arange(ways).repeat_interleave(queries).expand(meta_batch, -1)
    return Episode(sx, sy, qx, qy, ways)


def test_class_features_are_shot_sums_with_unsorted_labels():
    maps = torch.randn(2, 6, 3, 2, 2)
    labels = torch.tensor([[2, 0, 1, 0, 2, 1], [1, 1, 0, 2, 0, 2]])
    feats = class_features(maps, labels, 3)
    assert feats.shape == (2, 3, 3, 2, 2)
    for b in range(2):
        for k in range(3):
            torch.testing.assert_close(feats[b, k], maps[b][labels[b] == k].sum(0))


def test_embedding_and_score_shapes():
    assert RelationEmbedding()(torch.zeros(3, 1, 28, 28)).shape == (3, 64, 5, 5)
    model = RelationNetwork()
    ep = random_episode(ways=5, shots=2, queries=3)
    scores = model.episode_logits(ep, "train")
    assert scores.shape == (2, 15, 5) and ((scores > 0) & (scores < 1)).all()


def test_relation_module_sees_summed_class_maps_then_query_maps():
    model = RelationNetwork(backbone=nn.Identity(), image_shape=(2, 5, 5))
    ep = random_episode(ways=3, shots=2, queries=1, meta_batch=1)
    ep = Episode(torch.randn(1, 6, 2, 5, 5), ep.support_y, torch.randn(1, 3, 2, 5, 5), ep.query_y, 3)
    seen = []
    model.relation.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model.eval()
    model.episode_logits(ep, "val")
    pairs = seen[0].view(1, 3, 3, 4, 5, 5)  # (B, Q, ways, 2C, h, w)
    for j in range(3):
        for k in range(3):
            torch.testing.assert_close(pairs[0, j, k, :2], ep.support_x[0, 2 * k] + ep.support_x[0, 2 * k + 1])
            torch.testing.assert_close(pairs[0, j, k, 2:], ep.query_x[0, j])


def test_mse_loss_matches_hand_computation_and_trains_everything():
    torch.manual_seed(0)
    model = RelationNetwork()
    ep = random_episode()
    scores = model.episode_logits(ep, "train")
    loss = model.episode_loss(scores, ep.query_y)
    hand = sum(
        (scores[b, j, k] - float(ep.query_y[b, j] == k)) ** 2 for b in range(2) for j in range(15) for k in range(5)
    ) / (2 * 15 * 5)
    torch.testing.assert_close(loss, hand)
    # by hand on a tiny example: scores (0.9, 0.2) for a class-0 query → ((0.9 - 1)^2 + 0.2^2) / 2 = 0.025
    torch.testing.assert_close(model.episode_loss(torch.tensor([[[0.9, 0.2]]]), torch.tensor([[0]])),
                               torch.tensor(0.025))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_backbone_input_and_sizes_give_clear_errors():
    with pytest.raises(ValueError, match="backbone returning feature maps"):
        RelationNetwork(backbone=nn.Flatten())
    with pytest.raises(ValueError, match="too small for two relation blocks"):
        RelationNetwork(relation_padding=0)  # 5x5 maps → 3 → 1 → nothing left for the second block
    model = RelationNetwork()
    ep = random_episode(ways=5, shots=1)
    with pytest.raises(ValueError, match="not a positive multiple of ways=4"):
        model.validate_episode(Episode(*ep[:4], ways=4))
    with pytest.raises(ValueError, match="support_y has shape"):
        model.validate_episode(Episode(ep.support_x, ep.support_y[:, :3], ep.query_x, ep.query_y, 5))


def test_real_omniglot_few_training_steps(omniglot_root, cache_dir):
    torch.manual_seed(0)  # not L.seed_everything: it leaks PL_GLOBAL_SEED into later subprocesses
    dm = OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir), download=False,
                          episodes=EpisodeSettings(train_queries=5, meta_batch_size=2, val_episodes=16, eval_queries=5,
                                                   eval_meta_batch_size=16))
    model = RelationNetwork()
    trainer = L.Trainer(max_steps=40, val_check_interval=40, log_every_n_steps=5, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["val/loss"] < 0.16  # constant 0.2 scores: 0.16
    assert metrics["val/acc"] > 0.35  # 5-way chance is 0.2
