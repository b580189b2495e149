from __future__ import annotations

import math

import torch
from torch import nn

from lightning_mtl import Episode
from lightning_mtl.meta import ProtoNet, prototypes, squared_euclidean_logits


def test_protonet_loss_matches_hand_computed_example():
    model = ProtoNet(backbone=nn.Flatten())
    # 2-D "images": class 0 has support points (0, 0) and (2, 0) → prototype (1, 0); class 1 has (0, 2) and (0, 2).
    support_x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]]).view(1, 4, 1, 1, 2)
    query_x = torch.tensor([[1.0, 1.0], [0.0, 3.0]]).view(1, 2, 1, 1, 2)
    episode = Episode(support_x, torch.tensor([[0, 0, 1, 1]]), query_x, torch.tensor([[0, 1]]), ways=2)
    logits = model.episode_logits(episode, "train")
    # query (1, 1): distances 1 and 2; query (0, 3): distances 10 and 1
    torch.testing.assert_close(logits, torch.tensor([[[-1.0, -2.0], [-10.0, -1.0]]]))
    loss, accs = model._step(episode, "train")
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-9))) / 2
    assert abs(loss.item() - expected) < 1e-6
    assert accs.tolist() == [1.0]


def test_prototypes_handle_unsorted_labels_and_meta_batches():
    z = torch.randn(3, 6, 4)
    y = torch.tensor([[2, 0, 1, 0, 2, 1]] * 3)
    protos = prototypes(z, y, 3)
    for b in range(3):
        for k in range(3):
            torch.testing.assert_close(protos[b, k], z[b][y[b] == k].mean(0))
    q = torch.randn(3, 5, 4)
    torch.testing.assert_close(squared_euclidean_logits(q, protos), -torch.cdist(q, protos).pow(2), atol=1e-5, rtol=0)


def test_protonet_gradient_reaches_backbone():
    model = ProtoNet()
    ep = Episode(torch.randint(0, 255, (2, 10, 1, 28, 28), dtype=torch.uint8), torch.arange(5).repeat(2, 2),
                 torch.randint(0, 255, (2, 15, 1, 28, 28), dtype=torch.uint8), torch.arange(5).repeat(2, 3), 5)
    loss, accs = model._step(ep, "train")
    loss.backward()
    assert accs.shape == (2,)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
