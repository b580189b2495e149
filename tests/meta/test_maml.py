from __future__ import annotations

import numpy as np
import pytest
import torch
from meta_helpers import meta_loss, tiny_episode
from torch import nn

from lightning_mtl import Episode
from lightning_mtl.meta import MAML


def test_second_order_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh())
    model = MAML(ways=3, backbone=backbone, image_shape=(1, 2, 2), inner_lr=0.5, inner_steps=2).double()
    episode = tiny_episode()
    meta_loss(model, episode).backward()
    analytic = torch.cat([p.grad.flatten() for p in model.parameters()])

    eps = 1e-6
    numeric = []
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
    numeric = torch.tensor(numeric, dtype=torch.float64)
    torch.testing.assert_close(analytic, numeric, atol=1e-7, rtol=1e-5)

    # first order differs from the true meta-gradient here (non-linear network, two inner steps)
    model.zero_grad()
    model.first_order = True
    meta_loss(model, episode).backward()
    fo = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (fo - analytic).abs().max() > 1e-4


def softmax_regression_grad(w, b, x, y, ways):
    """Closed-form gradient of mean cross-entropy for logits = x @ w.T + b."""
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = (p - np.eye(ways)[y]) / len(y)  # (n, ways)
    return d.T @ x, d.sum(0)


def test_fomaml_gradient_matches_closed_form():
    torch.manual_seed(1)
    ways, lr = 3, 0.3
    model = MAML(ways=ways, backbone=nn.Flatten(), image_shape=(1, 2, 2), inner_lr=lr, first_order=True).double()
    episode = tiny_episode(ways=ways, meta_batch=2)
    meta_loss(model, episode).backward()

    head = model.head
    w0, b0 = head.weight.detach().numpy().copy(), head.bias.detach().numpy().copy()
    gw_total, gb_total = 0, 0
    for t in range(2):
        xs, ys = episode.support_x[t].reshape(-1, 4).numpy(), episode.support_y[t].numpy()
        xq, yq = episode.query_x[t].reshape(-1, 4).numpy(), episode.query_y[t].numpy()
        gw, gb = softmax_regression_grad(w0, b0, xs, ys, ways)
        w1, b1 = w0 - lr * gw, b0 - lr * gb  # one inner step
        qw, qb = softmax_regression_grad(w1, b1, xq, yq, ways)
        gw_total, gb_total = gw_total + qw / 2, gb_total + qb / 2  # mean over the meta-batch
    np.testing.assert_allclose(head.weight.grad.numpy(), gw_total, atol=1e-12, rtol=1e-9)
    np.testing.assert_allclose(head.bias.grad.numpy(), gb_total, atol=1e-12, rtol=1e-9)


def test_adaptation_never_rewrites_module_parameters():
    model = MAML(ways=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ep = Episode(torch.randint(0, 255, (2, 5, 1, 28, 28), dtype=torch.uint8), torch.arange(5).repeat(2, 1),
                 torch.randint(0, 255, (2, 10, 1, 28, 28), dtype=torch.uint8), torch.arange(5).repeat(2, 2), 5)
    with torch.inference_mode():  # evaluation path: adapts with gradients despite inference mode
        logits = model.episode_logits(ep, "test")
    assert logits.shape == (2, 10, 5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_maml_rejects_mismatched_ways():
    model = MAML(ways=5, backbone=nn.Flatten(), image_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="episodes are 3-way but the MAML head has 5 outputs"):
        model.episode_logits(tiny_episode(ways=3), "train")


def test_maml_rejects_images_the_head_was_not_sized_for():
    model = MAML(ways=5, backbone=nn.Flatten(), image_shape=(1, 3, 3))  # the head expects 9 features
    with pytest.raises(ValueError, match=r"images of shape \(1, 2, 2\) but the head was sized for image_shape "
                                         r"\(1, 3, 3\); set model image_shape"):
        model.episode_logits(tiny_episode(ways=5), "train")


@pytest.mark.parametrize("name", ["MAML", "Reptile", "ProtoNet", "MatchingNetwork", "SiameseNetwork",
                                  "EmbeddingBaseline", "RelationNetwork"])
def test_sizing_the_head_leaves_the_backbones_batchnorm_statistics_alone(name):
    """Probing the feature size runs the backbone once, in eval mode: a train-mode probe on zeros would move BatchNorm
    running statistics (MAML's and Reptile's did)."""
    from lightning_mtl import meta
    from lightning_mtl.nn import Conv4

    backbone = Conv4(track_running_stats=True)
    if name == "RelationNetwork":  # it reads feature maps: the first two blocks of Conv-4
        backbone = backbone.features[:8]
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    assert any("running_mean" in k for k in before)
    model = getattr(meta, name)(backbone=backbone)
    assert backbone.training and model.training
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())
