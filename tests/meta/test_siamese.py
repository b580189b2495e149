from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from lightning_mtl import Episode
from lightning_mtl.datamodules import EpisodeSettings, OmniglotEpisodes
from lightning_mtl.meta.siamese import SiameseNetwork, nearest_support_logits


def random_episode(ways=5, shots=2, queries=3, meta_batch=2, seed=0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randint(0, 255, (meta_batch, ways * shots, 1, 28, 28), generator=g, dtype=torch.uint8)
    qx = torch.randint(0, 255, (meta_batch, ways * queries, 1, 28, 28), generator=g, dtype=torch.uint8)
    sy = torch.arange(ways).repeat_interleave(shots).expand(meta_batch, -1)
    qy = torch.arange(ways).repeat_interleave(queries).expand(meta_batch, -1)
    return Episode(sx, sy, qx, qy, ways)


# training_step outside a Trainer: self.log has nowhere to write, which Lightning warns about
no_trainer_log = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def l1_model() -> SiameseNetwork:
    """Identity embedding of 2-D points, s = -|h1 - h2|_1: the most similar example is the L1-nearest one."""
    model = SiameseNetwork(backbone=nn.Flatten(), image_shape=(1, 1, 2))
    with torch.no_grad():
        model.head.weight.fill_(-1.0)
        model.head.bias.zero_()
    return model


def test_similarity_is_weighted_l1_and_symmetric():
    torch.manual_seed(0)
    model = SiameseNetwork()
    h1, h2 = torch.randn(4, 64), torch.randn(4, 64)
    torch.testing.assert_close(model.similarity(h1, h2), model.similarity(h2, h1))
    expected = (h1 - h2).abs() @ model.head.weight[0] + model.head.bias
    torch.testing.assert_close(model.similarity(h1, h2), expected)
    ep = random_episode()
    model.eval()
    with torch.no_grad():  # swapping the twins' inputs: the (query, support) score matrix is transposed
        flipped = Episode(ep.query_x, ep.query_y, ep.support_x, ep.support_y, ep.ways)
        torch.testing.assert_close(model.pair_scores(ep), model.pair_scores(flipped).transpose(1, 2))


def test_classification_picks_the_nearest_support_example():
    model = l1_model()
    # class 0: (0, 0) and (10, 10), mean (5, 5); class 1: (6, 6) and (4, 4), mean (5, 5)
    support_x = torch.tensor([[0.0, 0.0], [10.0, 10.0], [6.0, 6.0], [4.0, 4.0]]).view(1, 4, 1, 1, 2)
    query_x = torch.tensor([[9.0, 9.0], [1.0, 1.0], [5.0, 5.5]]).view(1, 3, 1, 1, 2)
    ep = Episode(support_x, torch.tensor([[0, 0, 1, 1]]), query_x, torch.tensor([[0, 0, 1]]), ways=2)
    logits = model.episode_logits(ep, "val")
    torch.testing.assert_close(logits, torch.tensor([[[-2.0, -6.0], [-2.0, -6.0], [-9.5, -1.5]]]))
    assert logits.argmax(-1).tolist() == [[0, 0, 1]]


def test_nearest_support_logits_with_unsorted_labels():
    scores = torch.randn(2, 4, 6)
    labels = torch.tensor([[2, 0, 1, 0, 2, 1], [1, 1, 0, 2, 0, 2]])
    logits = nearest_support_logits(scores, labels, 3)
    for b in range(2):
        for k in range(3):
            torch.testing.assert_close(logits[b, :, k], scores[b][:, labels[b] == k].amax(-1))


@no_trainer_log
@pytest.mark.parametrize("pairs", ["balanced", "all"])
def test_training_pairs_and_labels(pairs):
    torch.manual_seed(0)
    model = SiameseNetwork(pairs=pairs)
    ep = random_episode(ways=5, shots=2, queries=3)
    same = ep.query_y.unsqueeze(2) == ep.support_y.unsqueeze(1)  # (B, Q, S)
    for b in range(2):  # pair labels: query j and support i match exactly when their classes do
        for j in range(15):
            for i in range(10):
                assert same[b, j, i] == (j // 3 == i // 2)
    weights = model.pair_weights(same, ep.shots)
    assert ((weights == 0) | (weights == 1)).all() and (weights[same] == 1).all()
    negatives = (weights * ~same).sum(-1)
    assert (negatives == (2 if pairs == "balanced" else 8)).all()  # K per query, or all (ways - 1) K
    loss = model.training_step(ep, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


@no_trainer_log
def test_training_loss_is_the_pair_bce():
    model = l1_model()
    ep = Episode(torch.tensor([[0.0, 0.0], [3.0, 0.0]]).view(1, 2, 1, 1, 2), torch.tensor([[0, 1]]),
                 torch.tensor([[1.0, 0.0]]).view(1, 1, 1, 1, 2), torch.tensor([[0]]), ways=2)
    # 2-way 1-shot: balanced = all pairs; scores -1 (same class) and -2 (other class)
    sig = torch.sigmoid
    expected = -(torch.log(sig(torch.tensor(-1.0))) + torch.log(1 - sig(torch.tensor(-2.0)))) / 2
    torch.testing.assert_close(model.training_step(ep, 0), expected)
    # evaluation loss of the per-class maxima equals the all-pairs BCE in one-shot
    torch.testing.assert_close(model.episode_loss(model.episode_logits(ep, "val"), ep.query_y), expected)


def test_bad_settings_and_input_give_clear_errors():
    with pytest.raises(ValueError, match="pairs must be 'balanced' or 'all'"):
        SiameseNetwork(pairs="some")
    model = SiameseNetwork()
    ep = random_episode(ways=5, shots=1)
    with pytest.raises(ValueError, match="not a positive multiple of ways=2"):
        model.training_step(Episode(*ep[:4], ways=2), 0)
    with pytest.raises(ValueError, match="must share the meta-batch size"):
        model.validate_episode(Episode(ep.support_x, ep.support_y, ep.query_x[:1], ep.query_y[:1], 5))


def test_real_omniglot_few_training_steps(omniglot_root, cache_dir):
    torch.manual_seed(0)  # not L.seed_everything: it leaks PL_GLOBAL_SEED into later subprocesses
    dm = OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir), download=False,
                          episodes=EpisodeSettings(train_queries=5, meta_batch_size=2, val_episodes=16, eval_queries=5,
                                                   eval_meta_batch_size=16))
    model = SiameseNetwork()
    trainer = L.Trainer(max_steps=40, val_check_interval=40, log_every_n_steps=5, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/acc", "train/pair_acc"} <= metrics.keys() and torch.isfinite(metrics["train/loss"])
    assert metrics["train/pair_acc"] > 0.5 and metrics["val/acc"] > 0.35  # chance: 0.5 (balanced pairs), 0.2
