"""A small convolutional encoder-decoder whose stages map tensors to tensors, for dense multi-task benchmarks on CPUs.

Encoder level ``k`` is [2x2 max-pool, for ``k > 0``] then 2 x [conv 3x3, BatchNorm, ReLU] of width ``widths[k]``; the
decoder mirrors it, each level a bilinear 2x upsampling then 2 x [conv 3x3, BatchNorm, ReLU] narrowing to the previous
level's width. The output is ``(B, widths[0], H, W)``, the input's size. Xavier-normal convolution weights, zero
biases (as :class:`~lightning_mtl.nn.SegNet`).

Why not :class:`~lightning_mtl.nn.SegNet`: its stages pass ``(features, pooling indices)`` tuples, which cross-stitch
units cannot mix (they form linear combinations of the columns' stage outputs). Every stage here returns a plain
feature map, so hard sharing, soft sharing, cross-stitch, MTAN and MMoE all take the same backbone, and a benchmark
compares methods rather than networks. There are no skip connections: fine detail must cross the bottleneck (an
``H / 2^(L-1)`` map of ``widths[-1]`` channels), which is what a dense task then has to learn.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    """2 x [conv 3x3, BatchNorm, ReLU], ``c_in -> c_out -> c_out``."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class Upsample2x(nn.Module):
    """Bilinear 2x upsampling (``align_corners=False``)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class ConvEncoderDecoder(nn.Module):
    """``(B, in_channels, H, W) -> (B, widths[0], H, W)``; ``H`` and ``W`` must be multiples of
    ``2 ** (len(widths) - 1)``.

    Args:
        in_channels: image channels.
        widths: the encoder levels' widths; each level after the first halves the resolution.

    Raises:
        ValueError: no levels, or a width or ``in_channels`` below 1.
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1 or in_channels < 1:
            raise ValueError(f"ConvEncoderDecoder needs in_channels >= 1 and at least one width, all >= 1; got "
                             f"in_channels={in_channels}, widths={widths}")
        self.in_channels, self.widths = in_channels, widths
        self.encoder = nn.ModuleList(
            nn.Sequential(*([nn.MaxPool2d(2)] if k else []), *_conv_block(in_channels if k == 0 else widths[k - 1], w))
            for k, w in enumerate(widths))
        self.decoder = nn.ModuleList(  # level k: widths[k] -> widths[k - 1], deepest first
            nn.Sequential(Upsample2x(), *_conv_block(widths[k], widths[k - 1]))
            for k in reversed(range(1, len(widths))))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self) -> list[nn.Module]:
        """The encoder then the decoder levels, each ``(B, C, H, W) -> (B, C', H', W')``, as the stages that
        cross-stitch units and MTAN attention interleave with. They share this module's parameters."""
        return [*self.encoder, *self.decoder]

    def forward(self, x: Tensor) -> Tensor:
        factor = 2 ** (len(self.widths) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"ConvEncoderDecoder with {len(self.widths)} levels needs a height and width that are "
                             f"multiples of {factor}, got {tuple(x.shape[-2:])}; resize the images or drop a level.")
        for stage in self.stages():
            x = stage(x)
        return x  # (B, widths[0], H, W)
