"""Meta-SGD: meta-gradient (theta and alpha) against finite differences, MAML equivalence, real-data smoke."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from meta_helpers import meta_loss, tiny_episode
from torch import nn

from lightning_mtl.meta.maml import MAML
from lightning_mtl.meta.meta_sgd import MetaSGD


def tiny_meta_sgd(**kw) -> MetaSGD:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh())
    model = MetaSGD(ways=3, backbone=backbone, image_shape=(1, 2, 2), alpha_init=0.5, **kw).double()
    with torch.no_grad():  # distinct step sizes, so that a mix-up of alpha entries would show
        for a in model.alpha:
            a.uniform_(0.1, 0.9)
    return model


def test_meta_gradient_wrt_theta_and_alpha_matches_finite_differences():
    model, episode = tiny_meta_sgd(inner_steps=2), tiny_episode()
    meta_loss(model, episode).backward()
    params = list(model.parameters())
    assert len(params) == 2 * len(model.fast_parameters()), "theta and alpha are both meta-learned"
    analytic = torch.cat([p.grad.flatten() for p in params])
    eps, numeric = 1e-6, []
    for p in params:
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


@pytest.mark.parametrize("first_order", [False, True])
def test_one_step_alpha_gradient_is_minus_support_grad_times_query_grad(first_order):
    """theta' = theta - alpha * g_s with g_s free of alpha, so dL_q(theta')/dalpha = -g_s * grad L_q(theta')."""
    model, episode = tiny_meta_sgd(first_order=first_order), tiny_episode(meta_batch=1)
    meta_loss(model, episode).backward()
    theta = model.fast_parameters()
    g_s = torch.autograd.grad(F.cross_entropy(model(episode.support_x[0]), episode.support_y[0]), list(theta.values()))
    steps = zip(theta.items(), model.alpha, g_s, strict=True)
    adapted = {n: (p - a * g).detach().requires_grad_() for (n, p), a, g in steps}
    loss_q = F.cross_entropy(model(episode.query_x[0], adapted), episode.query_y[0])
    g_q = torch.autograd.grad(loss_q, list(adapted.values()))
    for a, gs, gq in zip(model.alpha, g_s, g_q, strict=True):
        torch.testing.assert_close(a.grad, -gs * gq, atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("steps", [1, 3])
def test_constant_alpha_gives_exactly_maml_adapted_parameters(steps):
    c = 0.37
    torch.manual_seed(1)
    kw = dict(ways=3, image_shape=(1, 2, 2))
    meta_sgd = MetaSGD(alpha_init=c, backbone=nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh()), **kw).double()
    maml = MAML(inner_lr=c, backbone=nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh()), **kw).double()
    maml.load_state_dict(meta_sgd.state_dict(), strict=False)  # alpha.* are Meta-SGD's only extra entries
    with torch.no_grad():  # refill in float64: alpha was created in float32, where 0.37 is not the double 0.37
        for a in meta_sgd.alpha:
            a.fill_(c)
    episode = tiny_episode()
    x, y = episode.support_x[0], episode.support_y[0]
    ours = meta_sgd.adapt(x, y, steps, "train", create_graph=True).params
    theirs = maml.adapt(x, y, steps, "train", create_graph=True).params
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_alpha_shapes_defaults_and_optimizer():
    model = MetaSGD(ways=5, alpha_init=0.1)
    for a, p in zip(model.alpha, model.fast_parameters().values(), strict=True):
        assert a.shape == p.shape and torch.all(a == 0.1)
    assert model.hparams.inner_steps == model.hparams.eval_inner_steps == 1  # the paper adapts in one step
    optimized = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert {id(a) for a in model.alpha} <= optimized


def test_rejects_mismatched_ways():
    model = MetaSGD(ways=5, backbone=nn.Flatten(), image_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="episodes are 3-way but the MetaSGD head has 5 outputs"):
        model.episode_logits(tiny_episode(ways=3), "train")


def test_real_omniglot_training_steps(omniglot_root, cache_dir, tmp_path):
    from lightning_mtl.datamodules import EpisodeSettings, OmniglotEpisodes

    dm = OmniglotEpisodes(root=str(omniglot_root), cache_dir=str(cache_dir), download=False,
                          episodes=EpisodeSettings(train_queries=1, meta_batch_size=2, eval_meta_batch_size=4,
                                                   val_episodes=4, test_episodes=4))
    model = MetaSGD(ways=5)
    alpha_before = [a.detach().clone() for a in model.alpha]
    trainer = L.Trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, logger=False, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and 0 <= metrics["val/acc"] <= 1
    changed = [not torch.equal(b, a) for b, a in zip(alpha_before, model.alpha, strict=True)]
    # conv biases feed BatchNorm, which cancels them (zero gradient); every other step size is learned
    assert sum(changed) >= len(changed) - 4 and changed[0] and changed[-1]
