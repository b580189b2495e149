"""Backbones and building blocks."""

from lightning_mtl.nn.conv4 import Conv4
from lightning_mtl.nn.resnet12 import DropBlock, ResNet12
from lightning_mtl.nn.segnet import SegNet
from lightning_mtl.nn.timm_backbone import TimmBackbone

__all__ = ["Conv4", "DropBlock", "ResNet12", "SegNet", "TimmBackbone"]
