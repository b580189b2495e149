"""EmbeddingBaseline (Tian et al. 2020): hand-computed prototype logits, L2 normalisation, the logistic-regression
optimum, supervised pre-training through a Trainer, and the errors that say what to fix."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl import Episode
from lightning_mtl.batches import LabelledBatch
from lightning_mtl.datamodules._episodic import EpisodeSettings, EpisodicImages
from lightning_mtl.meta.pretrained_embedding import EmbeddingBaseline, logistic_regression_logits


def points_episode(support: list, support_y: list, query: list, ways: int = 2) -> Episode:
    """An episode of 2-D points as (1, 1, 2) "images"."""
    s, q = torch.tensor(support, dtype=torch.float32), torch.tensor(query, dtype=torch.float32)
    return Episode(s.view(1, -1, 1, 1, 2), torch.tensor([support_y]), q.view(1, -1, 1, 1, 2),
                   torch.zeros(1, len(query), dtype=torch.long), ways)


def flat_model(**kw) -> EmbeddingBaseline:
    return EmbeddingBaseline(backbone=nn.Flatten(), image_shape=(1, 1, 2), num_classes=2, **kw)


def test_prototype_logits_without_normalisation_match_protonet():
    # class 0: (0, 0), (2, 0) → prototype (1, 0); class 1: (0, 2) twice → (0, 2)
    episode = points_episode([[0, 0], [2, 0], [0, 2], [0, 2]], [0, 0, 1, 1], [[1, 1], [0, 3]])
    logits = flat_model(normalize=False).episode_logits(episode, "test")
    torch.testing.assert_close(logits, torch.tensor([[[-1.0, -2.0], [-10.0, -1.0]]]))


def test_l2_normalised_prototypes():
    # normalised supports: class 0 (1, 0) and (1, 0) → prototype (1, 0); class 1 (0, 1)
    episode = points_episode([[2, 0], [4, 0], [0, 3]], [0, 0, 1], [[5, 0], [0, -1], [1, 1]])
    logits = flat_model().episode_logits(episode, "test")
    half = 2 - math.sqrt(2)  # ||(1, 1) / sqrt(2) - (1, 0)||^2
    torch.testing.assert_close(logits, torch.tensor([[[0.0, -2.0], [-2.0, -4.0], [-half, -half]]]))
    scaled = Episode(episode.support_x * 7, episode.support_y, episode.query_x * 0.1, episode.query_y, 2)
    torch.testing.assert_close(flat_model().episode_logits(scaled, "test"), logits)
    unnormalised = flat_model(normalize=False).episode_logits(episode, "test")  # prototypes (3, 0) and (0, 3)
    torch.testing.assert_close(unnormalised[0, 0], torch.tensor([-4.0, -34.0]))


def test_cosine_prototypes():
    episode = points_episode([[2, 0], [0, 3]], [0, 1], [[1, 1], [-1, 0]])
    logits = flat_model(normalize=False, distance="cosine").episode_logits(episode, "test")
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(logits, torch.tensor([[[r, r], [-1.0, 0.0]]]))


def test_logistic_regression_reaches_the_regularised_optimum_even_in_inference_mode():
    g = torch.Generator().manual_seed(0)
    b, ways, shots, d, c = 2, 3, 4, 5, 0.5
    support = torch.randn(b, ways * shots, d, generator=g, dtype=torch.float64)
    labels = torch.arange(ways).repeat_interleave(shots).expand(b, -1)
    # queries e_1 .. e_d and 0 read the fitted parameters back: logits(e_i) = W[i] + bias, logits(0) = bias
    probe = torch.cat([torch.eye(d), torch.zeros(1, d)]).to(torch.float64).expand(b, -1, -1)
    with torch.inference_mode():
        logits = logistic_regression_logits(support, labels, probe, ways, c=c, steps=200)
    bias = logits[:, -1:].clone().requires_grad_()
    weight = (logits[:, :-1] - logits[:, -1:]).clone().requires_grad_()  # (B, D, ways)
    n = ways * shots
    ce = F.cross_entropy((support @ weight + bias).flatten(0, 1), labels.flatten(), reduction="sum") / n
    (ce + weight.pow(2).sum() / (2 * c * n)).backward()
    assert weight.grad.abs().max() < 1e-5 and bias.grad.abs().max() < 1e-5


def test_logistic_classifier_separates_clusters():
    episode = points_episode([[3, 0], [3, 1], [0, 3], [1, 3]], [0, 0, 1, 1], [[4, 1], [1, 4]])
    logits = flat_model(classifier="logistic").episode_logits(episode, "test")
    assert logits.argmax(-1).tolist() == [[0, 1]]


class Blobs(EpisodicImages):
    """4x4 images: a class-specific bright pixel (16 classes: 8 train, 4 val, 4 test) on low noise."""

    def __init__(self) -> None:
        super().__init__(EpisodeSettings(eval_ways=4, eval_queries=5, eval_meta_batch_size=4, val_episodes=8,
                                         test_episodes=8, train_mode="classes", train_batch_size=32))

    def setup(self, stage: str | None = None) -> None:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 40, (16, 10, 1, 4, 4), dtype=np.uint8)
        images.reshape(16, 10, 16)[np.arange(16), :, np.arange(16)] = 255
        self.set_splits({"train": images[:8], "val": images[8:12], "test": images[12:]}, "blobs")


def small_backbone() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU())


def trainer(steps: int, **kw) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, **kw)


def test_pretraining_takes_the_classes_from_the_datamodule_and_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    model = EmbeddingBaseline(backbone=small_backbone(), image_shape=(1, 4, 4),
                              optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    dm = Blobs()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))

    def loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model.head(model(batch.x)), batch.y).item()

    t = trainer(60)
    t.fit(model, datamodule=dm)
    assert model.head.out_features == 8 and model.hparams.num_classes == 8
    assert loss() < 0.3 < math.log(8)
    assert t.test(model, datamodule=dm, verbose=False)[0]["test/acc"] > 0.5  # 4-way chance 0.25
    t.save_checkpoint(tmp_path / "model.ckpt")
    again = EmbeddingBaseline.load_from_checkpoint(tmp_path / "model.ckpt", backbone=small_backbone())
    torch.testing.assert_close(again.head.weight, model.head.weight)


def test_untrained_head_loss_is_log_classes():
    model = EmbeddingBaseline(backbone=nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), image_shape=(1, 4, 4),
                              num_classes=8)
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    batch = LabelledBatch(torch.randint(0, 255, (6, 1, 4, 4), dtype=torch.uint8), torch.arange(6))
    with pytest.warns(UserWarning, match="self.log"):  # no trainer to log to
        assert model.training_step(batch, 0).item() == pytest.approx(math.log(8))


class EpisodesOnly(L.LightningDataModule):
    def train_dataloader(self):
        return [points_episode([[0, 1], [1, 0]], [0, 1], [[0, 1]])]


def test_datamodule_without_class_count_says_what_to_fix():
    with pytest.raises(ValueError, match="num_train_classes.*EpisodesOnly has none; pass model num_classes"):
        trainer(1).fit(EmbeddingBaseline(backbone=nn.Flatten(), image_shape=(1, 1, 2)), datamodule=EpisodesOnly())


def test_episode_training_batch_says_to_switch_the_train_mode():
    episode = points_episode([[0, 1], [1, 0]], [0, 1], [[0, 1]])
    with pytest.raises(TypeError, match="got Episode; set the datamodule's train_mode to 'classes'"):
        flat_model().training_step(episode, 0)


@pytest.mark.parametrize("kw", [{"classifier": "svm"}, {"distance": "l1"}, {"logistic_c": 0}, {"num_classes": 1}])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        EmbeddingBaseline(**{"backbone": nn.Flatten(), "image_shape": (1, 1, 2), **kw})
