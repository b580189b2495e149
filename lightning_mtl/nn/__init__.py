"""Backbones and building blocks."""

from lightning_mtl.nn.conv4 import Conv4

__all__ = ["Conv4"]
