"""timm models as backbones."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl import Episode
from lightning_mtl.meta import ProtoNet
from lightning_mtl.nn import TimmBackbone

pytest.importorskip("timm", reason="timm is an optional extra: pip install 'lightning-mtl[timm]'")


def test_features_without_classifier_and_grayscale_input():
    model = TimmBackbone("resnet18", in_channels=1).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, model.num_features) == (2, 512)


def test_protonet_trains_on_a_timm_backbone():
    torch.manual_seed(0)
    model = ProtoNet(backbone=TimmBackbone("resnet18", in_channels=1))
    ep = Episode(torch.randint(0, 255, (1, 5, 1, 28, 28), dtype=torch.uint8), torch.arange(5).unsqueeze(0),
                 torch.randint(0, 255, (1, 10, 1, 28, 28), dtype=torch.uint8), torch.arange(5).repeat(2)[None], 5)
    loss, _ = model._step(ep, "train")
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unknown_model_lists_close_names():
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet19'; close names: .*resnet18"):
        TimmBackbone("resnet19")
