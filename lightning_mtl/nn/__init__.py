"""Backbones and building blocks."""

from lightning_mtl.nn.conv4 import Conv4
from lightning_mtl.nn.conv_encoder_decoder import ConvEncoderDecoder
from lightning_mtl.nn.deeplab import ASPP, DeepLabHead, DeepLabResNet50
from lightning_mtl.nn.resnet12 import DropBlock, ResNet12
from lightning_mtl.nn.resnet18 import ResNet18
from lightning_mtl.nn.segnet import SegNet
from lightning_mtl.nn.timm_backbone import TimmBackbone

__all__ = [
    "ASPP",
    "Conv4",
    "ConvEncoderDecoder",
    "DeepLabHead",
    "DeepLabResNet50",
    "DropBlock",
    "ResNet12",
    "ResNet18",
    "SegNet",
    "TimmBackbone",
]
