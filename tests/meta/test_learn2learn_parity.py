"""Parity with learn2learn 0.2.0 on the same model and episode: MAML meta-gradients and ProtoNet logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl import Episode
from lightning_mtl.meta import MAML, prototypes, squared_euclidean_logits
from lightning_mtl.nn import Conv4


def _episode(ways=5, shots=1, queries=3, seed=0, dtype=torch.float64) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.rand(1, ways * shots, 1, 28, 28, generator=g, dtype=dtype),
                   torch.arange(ways).repeat_interleave(shots).unsqueeze(0),
                   torch.rand(1, ways * queries, 1, 28, 28, generator=g, dtype=dtype),
                   torch.arange(ways).repeat_interleave(queries).unsqueeze(0), ways)


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_equals_learn2learn(l2l, first_order):
    torch.manual_seed(0)
    backbone = Conv4(in_channels=1, hidden_channels=8, out_channels=8, track_running_stats=False, channels_last=False)
    ours = MAML(ways=5, backbone=backbone, inner_lr=0.4, inner_steps=2, first_order=first_order).double()
    net = nn.Sequential(copy.deepcopy(ours.backbone), nn.Flatten(), copy.deepcopy(ours.head))  # l2l's layout
    theirs = l2l.algorithms.MAML(net, lr=0.4, first_order=first_order)
    ep = _episode()

    loss, _ = ours._step(ep, "train")
    loss.backward()

    learner = theirs.clone()
    for _ in range(2):
        learner.adapt(F.cross_entropy(learner(ep.support_x[0]), ep.support_y[0]))
    their_loss = F.cross_entropy(learner(ep.query_x[0]), ep.query_y[0])
    their_loss.backward()

    # our base class takes the query cross-entropy in float32 (for bf16 models); the rest of both graphs is float64
    torch.testing.assert_close(loss, their_loss.float(), rtol=0, atol=1e-6)
    for (name, p), q in zip(ours.fast_parameters().items(), theirs.module.parameters(), strict=True):
        assert q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=f"meta-gradient of {name}")


def test_protonet_logits_equal_learn2learn(l2l):
    g = torch.Generator().manual_seed(0)
    support = torch.randn(15, 32, generator=g, dtype=torch.float64)
    labels = torch.tensor([3, 1, 0, 4, 2] * 3)  # unsorted: learn2learn orders prototypes by label value
    query = torch.randn(20, 32, generator=g, dtype=torch.float64)
    theirs = l2l.nn.PrototypicalClassifier(support, labels)(query)
    ours = squared_euclidean_logits(query.unsqueeze(0), prototypes(support.unsqueeze(0), labels.unsqueeze(0), 5))
    torch.testing.assert_close(ours[0], theirs, rtol=1e-12, atol=1e-10)
