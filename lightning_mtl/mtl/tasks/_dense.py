"""What the dense (per-pixel) tasks share: the feature-map check, the prediction head, and resizing to the target.

The head is the prediction layer of MTAN's SegNet (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019, arXiv:1803.10704; ``lorenmt/mtan`` ``im2im_pred/model_segnet_*.py``,
``conv_layer(..., pred=True)``): a 3x3 convolution ``C -> C`` then a 1x1 convolution ``C -> out_channels``, with
biases and nothing between them (no normalisation, no activation). Weights are Xavier-normal and biases zero, as MTAN
initialises them. LibMTL's NYUv2 SegNet example (``examples/nyu/segnet_mtan.py``, ``SegNet_MTAN_decoder``) uses the
same two convolutions but keeps PyTorch's default initialisation. Its DeepLab-ResNet example (and MTAN's ResNet code)
gives every task its own ASPP decoder instead: pass ``head=lightning_mtl.nn.DeepLabHead`` (in YAML a ``class_path``
with its ``init_args``), or any callable ``(in_channels, out_channels) -> nn.Module``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtl.mtl.tasks.base import Task

HeadCallable = Callable[[int, int], nn.Module]
"""A dense head factory: ``(in_channels, out_channels) -> nn.Module``, ``(B, in, h, w)`` to ``(B, out, h, w)``."""


def prediction_head(in_channels: int, out_channels: int) -> nn.Sequential:
    """MTAN's dense prediction head: ``Conv3x3(in, in) -> Conv1x1(in, out)``, Xavier-normal weights, zero biases."""
    head = nn.Sequential(nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1),
                         nn.Conv2d(in_channels, out_channels, kernel_size=1))
    for conv in head:
        nn.init.xavier_normal_(conv.weight)
        nn.init.zeros_(conv.bias)
    return head


def resize_to(output: Tensor, size: tuple[int, int]) -> Tensor:
    """``output`` ``(B, K, h, w)`` resized to ``(B, K, *size)`` (bilinear, ``align_corners=False``); unchanged if the
    sizes already agree."""
    if tuple(output.shape[-2:]) == tuple(size):
        return output
    return F.interpolate(output, size=tuple(size), mode="bilinear", align_corners=False)


class DenseTask(Task):
    """A task predicting ``out_channels`` values per pixel from a ``(C, H, W)`` representation.

    Its head is ``head(C, out_channels)`` for a ``(C, H, W)`` representation, MTAN's :func:`prediction_head` by
    default; :meth:`align` resizes the output to the target's last two dimensions, so the
    representation may be coarser (or finer) than the labels.

    Args:
        out_channels: values predicted per pixel (classes, 1 for depth, 3 for normals).
        head: builds the head from ``(in_channels, out_channels)``; ``None`` → :func:`prediction_head`. E.g.
            :class:`lightning_mtl.nn.DeepLabHead` (an ASPP decoder per task, as LibMTL's DeepLab-ResNet).

    Raises:
        ValueError: ``out_channels`` is not positive.
    """

    any_spatial_size = True  # a convolutional head: multi-scale inputs give other map sizes, which align resizes

    def __init__(self, out_channels: int, head: HeadCallable | None = None) -> None:
        super().__init__()
        if out_channels < 1:
            raise ValueError(f"a dense task predicts at least one channel, got out_channels={out_channels}")
        self.out_channels, self.head_factory = out_channels, head or prediction_head

    def build_head(self, representation_shape: tuple[int, ...]) -> nn.Module:
        """The head for a ``(C, H, W)`` representation.

        Raises:
            ValueError: the representation is not a ``(C, H, W)`` feature map.
        """
        if len(representation_shape) != 3:
            raise ValueError(
                f"{type(self).__name__} is a dense task: it needs a (C, H, W) representation, got "
                f"{tuple(representation_shape)}. Use a backbone or architecture whose output is a feature map (one "
                f"that does not pool and flatten, e.g. a SegNet or ResNet encoder without its classifier).")
        return self.head_factory(representation_shape[0], self.out_channels)

    def align(self, output: Tensor, target: Tensor) -> Tensor:
        """``output`` ``(B, K, h, w)`` resized to the target's ``(H, W)`` (its last two dimensions)."""
        return resize_to(output, tuple(target.shape[-2:]))
