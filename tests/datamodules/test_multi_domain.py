"""Multi-domain episodes: the image policy, and episodes of Omniglot and the Tiny-ImageNet subset (real data)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lightning_mtl.datamodules import EpisodeSettings, ImageFolderEpisodes, MultiDomainEpisodes, OmniglotEpisodes
from lightning_mtl.datamodules.multi_domain import convert_images
from lightning_mtl.meta import ProtoNet


def test_image_policy_grey_colour_and_size():
    grey = np.arange(16, dtype=np.uint8).reshape(1, 1, 1, 4, 4) * 10
    colour = convert_images(grey, 3, 4)
    assert colour.shape == (1, 1, 3, 4, 4) and all(np.array_equal(colour[0, 0, c], grey[0, 0, 0]) for c in range(3))
    rgb = np.zeros((1, 1, 3, 2, 2), dtype=np.uint8)
    rgb[0, 0, 0], rgb[0, 0, 1], rgb[0, 0, 2] = 100, 200, 50
    luma = convert_images(rgb, 1, 2)
    assert luma.shape == (1, 1, 1, 2, 2) and (luma == round(0.299 * 100 + 0.587 * 200 + 0.114 * 50)).all()
    halved = convert_images(grey, 1, 2)  # area average of 2x2 blocks
    assert halved[0, 0, 0, 0, 0] == round((0 + 10 + 40 + 50) / 4)
    assert convert_images(grey, 1, 8).shape == (1, 1, 1, 8, 8)


@pytest.fixture
def domains(omniglot_root, cache_dir):
    tiny = omniglot_root / "tiny-imagenet" / "tiny-imagenet-200-subset.zip"
    if not tiny.exists():
        pytest.skip(f"the Tiny-ImageNet subset is absent ({tiny})")
    return [OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir), download=False),
            ImageFolderEpisodes(path=str(tiny), layout="tiny_imagenet", image_size=32, channels=3,
                                cache_dir=str(cache_dir))]


def test_episodes_come_from_one_domain_each_in_one_format(domains):
    data = MultiDomainEpisodes(domains, names=["omniglot", "tiny_imagenet"], image_size=28, channels=1,
                               episodes=EpisodeSettings(train_ways=5, train_queries=2, meta_batch_size=16,
                                                        val_episodes=40, eval_meta_batch_size=20))
    data.prepare_data()
    data.setup("fit")
    episode = next(iter(data.train_dataloader()))
    assert episode.support_x.shape == (16, 5, 1, 28, 28) and episode.support_x.dtype == torch.uint8
    assert set(episode.family.tolist()) == {0, 1}  # both domains appear in 16 draws (seed 0)
    # an Omniglot episode is strokes on black (mostly 0), a Tiny-ImageNet one natural images
    for i, d in enumerate(episode.family.tolist()):
        dark = float((episode.support_x[i] == 0).float().mean())
        assert (dark > 0.5) == (d == 0), (i, d, dark)
    again = next(iter(data.train_dataloader()))
    assert torch.equal(again.support_x, episode.support_x) and torch.equal(again.family, episode.family)
    val = [e.family for e in data.val_dataloader()]
    assert sum(len(f) for f in val) == 40 and set(torch.cat(val).tolist()) == {0, 1}


def test_a_learner_logs_each_domains_accuracy_and_the_worst(domains):
    data = MultiDomainEpisodes(domains, names=["omniglot", "tiny_imagenet"], image_size=28, channels=1,
                               episodes=EpisodeSettings(train_ways=5, train_queries=2, meta_batch_size=2,
                                                        val_episodes=30, eval_meta_batch_size=10))
    torch.manual_seed(0)
    model = ProtoNet(backbone=nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Flatten()))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, val_check_interval=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    m = trainer.callback_metrics
    accs = [float(m[f"val/{name}/acc"]) for name in ("omniglot", "tiny_imagenet")]
    assert float(m["val/worst_family_acc"]) == pytest.approx(min(accs))
    assert all(0 <= a <= 1 for a in accs) and float(m["val/omniglot/acc_ci95"]) >= 0


def test_bad_domains_are_refused():
    with pytest.raises(ValueError, match="at least one domain"):
        MultiDomainEpisodes([])
    with pytest.raises(ValueError, match="episodic datamodule"):
        MultiDomainEpisodes([object()])
