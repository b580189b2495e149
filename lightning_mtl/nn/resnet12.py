"""ResNet-12, the few-shot backbone of Lee et al. (MetaOptNet, CVPR 2019, arXiv:1904.03758) and Oreshkin et al.
(TADAM, NeurIPS 2018, arXiv:1805.10123), with DropBlock (Ghiasi, Lin & Le, NeurIPS 2018, arXiv:1810.12890).

Four residual blocks of widths (64, 160, 320, 640). Each block: three [conv 3x3, BatchNorm, LeakyReLU(0.1)] (the last
activation after the residual sum), a [conv 1x1, BatchNorm] shortcut, then max-pool 2x2, and, as in MetaOptNet's
code, dropout in the first two blocks and DropBlock in the last two. MetaOptNet ramps the DropBlock rate up linearly
over training; here it is constant. An 84x84 image gives 640 x 5 x 5 = 16,000 features (MetaOptNet flattens them);
``avg_pool=True`` averages them to 640.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DropBlock(nn.Module):
    """Drop contiguous ``block_size`` x ``block_size`` squares of a feature map (Ghiasi et al. 2018).

    Block centres are sampled with rate ``gamma = drop_rate / block_size^2 * area / valid_area`` so that about
    ``drop_rate`` of the units are dropped; kept units are rescaled by ``numel / kept`` so the expectation is
    unchanged. Inactive in evaluation mode and when ``drop_rate`` is 0.

    Args:
        drop_rate: target fraction of dropped units.
        block_size: side of the dropped squares (clipped to the feature map).
    """

    def __init__(self, drop_rate: float = 0.1, block_size: int = 5) -> None:
        super().__init__()
        if not 0 <= drop_rate < 1:
            raise ValueError(f"DropBlock drop_rate must be in [0, 1), got {drop_rate}")
        if block_size < 1:
            raise ValueError(f"DropBlock block_size must be >= 1, got {block_size}")
        self.drop_rate, self.block_size = drop_rate, block_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_rate == 0:
            return x
        n, c, h, w = x.shape
        size = min(self.block_size, h, w)
        valid = (h - size + 1) * (w - size + 1)  # centres whose whole block lies inside the map
        gamma = min(1.0, self.drop_rate / size**2 * (h * w) / valid)
        centres = torch.bernoulli(torch.full((n, c, h - size + 1, w - size + 1), gamma, device=x.device))
        pad = size - 1
        # every unit within a block of a sampled centre is dropped: a max-pool spreads each centre over its block
        mask = 1 - F.max_pool2d(F.pad(centres, (pad, pad, pad, pad)), size, stride=1)[..., :h, :w]
        kept = mask.sum().clamp_min(1)
        return x * mask.to(x.dtype) * (mask.numel() / kept).to(x.dtype)


class ResidualBlock(nn.Module):
    """Three 3x3 conv-BN layers with LeakyReLU(0.1), a 1x1 conv-BN shortcut, max-pool 2x2, then dropout or DropBlock
    (``block_size`` 0)."""

    def __init__(self, c_in: int, c_out: int, drop_rate: float, block_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.pool = nn.MaxPool2d(2)
        self.drop = DropBlock(drop_rate, block_size) if block_size else nn.Dropout(drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.pool(F.leaky_relu(self.body(x) + self.shortcut(x), 0.1)))


class ResNet12(nn.Module):
    """ResNet-12 feature extractor ``(N, C, H, W) -> (N, D)``.

    Args:
        in_channels: image channels.
        channels: widths of the four residual blocks.
        drop_rate: dropout rate of the first two blocks and DropBlock rate of the last two (MetaOptNet: 0.1; 0 turns
            both off).
        block_size: DropBlock block size (MetaOptNet: 5).
        avg_pool: average the final feature map to ``channels[-1]`` features instead of flattening it.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: tuple[int, int, int, int] = (64, 160, 320, 640),
        drop_rate: float = 0.1,
        block_size: int = 5,
        avg_pool: bool = False,
    ) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError(f"ResNet12 block_size must be >= 1, got {block_size}")
        if len(channels) != 4:
            raise ValueError(f"ResNet12 takes 4 block widths, got {len(channels)}: {channels}")
        widths = [in_channels, *channels]
        self.blocks = nn.Sequential(*[
            ResidualBlock(widths[i], widths[i + 1], drop_rate, block_size if i >= 2 else 0) for i in range(4)
        ])
        self.avg_pool = avg_pool
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=0.1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(x)  # (N, channels[-1], H / 16, W / 16)
        return x.mean((2, 3)) if self.avg_pool else x.flatten(1)

    def stages(self) -> list[nn.Module]:
        """The four residual blocks, as the stages multi-task architectures interleave with (cross-stitch units, MTAN
        attention). They share this module's parameters; the last one's output is the feature map, neither pooled
        nor flattened."""
        return list(self.blocks)
