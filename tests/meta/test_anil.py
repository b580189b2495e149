"""ANIL: meta-gradient against finite differences, head-only inner loop, closed form, real-data smoke."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from meta_helpers import meta_loss, tiny_episode
from torch import nn

from lightning_mtl.meta.anil import ANIL
from lightning_mtl.meta.maml import MAML


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def tiny_anil(**kw) -> ANIL:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh())
    return ANIL(ways=3, backbone=backbone, image_shape=(1, 2, 2), inner_lr=0.5, inner_steps=2, **kw).double()


def test_meta_gradient_matches_finite_differences():
    model, episode = tiny_anil(), tiny_episode()
    meta_loss(model, episode).backward()
    analytic = flat_grad(model)
    eps, numeric = 1e-6, []
    for p in model.parameters():
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            orig = flat[i].item()
            flat[i] = orig + eps
            up = meta_loss(model, episode).item()
            flat[i] = orig - eps
            down = meta_loss(model, episode).item()
            flat[i] = orig
            numeric.append((up - down) / (2 * eps))
    torch.testing.assert_close(analytic, torch.tensor(numeric, dtype=torch.float64), atol=1e-7, rtol=1e-5)

    # first order drops the path through the head updates: a different backbone gradient here
    model.zero_grad()
    model.first_order = True
    meta_loss(model, episode).backward()
    assert (flat_grad(model) - analytic).abs().max() > 1e-4


def test_inner_loop_adapts_only_the_head_and_runs_the_backbone_once_per_set():
    model, episode = tiny_anil(), tiny_episode()
    calls = []
    model.backbone.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    params = model.adapt(episode.support_x[0], episode.support_y[0], 3, "train", create_graph=True).params
    assert params.keys() == {"head.weight", "head.bias"}, "only the head is adapted"
    for name, p in model.head.named_parameters(prefix="head"):
        assert not torch.equal(params[name], p), f"head parameter {name} was not adapted"
    assert calls == [6], "the backbone must run once on the support set, not once per inner step"
    calls.clear()
    model.episode_logits(episode, "train")  # two tasks: support once and query once each
    assert calls == [6, 6, 6, 6]


def softmax_regression_grad(w, b, x, y, ways):
    """Closed-form gradient of mean cross-entropy for logits = x @ w.T + b."""
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = (p - np.eye(ways)[y]) / len(y)
    return d.T @ x, d.sum(0)


def test_linear_backbone_closed_form():
    """A linear backbone B: the head takes one softmax-regression step on the features x B^T."""
    torch.manual_seed(3)
    ways, lr = 3, 0.7
    model = ANIL(ways=ways, backbone=nn.Sequential(nn.Flatten(), nn.Linear(4, 6, bias=False)), image_shape=(1, 2, 2),
                 inner_lr=lr, inner_steps=1).double()
    episode = tiny_episode(ways=ways, meta_batch=1)
    logits = model.episode_logits(episode, "train")[0].detach().numpy()
    backbone = model.backbone[1].weight.detach().numpy()
    w, b = model.head.weight.detach().numpy(), model.head.bias.detach().numpy()
    zs = episode.support_x[0].reshape(-1, 4).numpy() @ backbone.T  # (6, 6) support features
    zq = episode.query_x[0].reshape(-1, 4).numpy() @ backbone.T
    gw, gb = softmax_regression_grad(w, b, zs, episode.support_y[0].numpy(), ways)
    np.testing.assert_allclose(logits, zq @ (w - lr * gw).T + (b - lr * gb), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("first_order", [False, True])
def test_equals_maml_when_the_backbone_has_no_parameters(first_order):
    kw = dict(ways=3, backbone=nn.Flatten(), image_shape=(1, 2, 2), inner_lr=0.3, inner_steps=2,
              first_order=first_order)
    anil, maml = ANIL(**kw).double(), MAML(**kw).double()
    maml.load_state_dict(anil.state_dict())
    episode = tiny_episode()
    meta_loss(anil, episode).backward()
    meta_loss(maml, episode).backward()
    torch.testing.assert_close(flat_grad(anil), flat_grad(maml), atol=1e-14, rtol=1e-12)


def test_rejects_mismatched_ways():
    model = ANIL(ways=5, backbone=nn.Flatten(), image_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="episodes are 3-way but the ANIL head has 5 outputs"):
        model.episode_logits(tiny_episode(ways=3), "train")


def test_real_omniglot_training_steps(omniglot_root, cache_dir, tmp_path):
    from lightning_mtl.datamodules import EpisodeSettings, OmniglotEpisodes

    dm = OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir), download=False,
                          episodes=EpisodeSettings(train_queries=1, meta_batch_size=2, eval_meta_batch_size=4,
                                                   val_episodes=4, test_episodes=4))
    model = ANIL(ways=5, eval_inner_steps=3)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = L.Trainer(max_steps=3, val_check_interval=3, limit_val_batches=1, logger=False, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and 0 <= metrics["val/acc"] <= 1
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)), "every layer trains"
