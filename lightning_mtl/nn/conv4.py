"""Conv-4: the four-block convolutional backbone of Vinyals et al. (NeurIPS 2016), Snell et al. (NeurIPS 2017) and
Finn et al. (ICML 2017): 4 x [conv 3x3, BatchNorm, ReLU, max-pool 2x2]."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Conv4(nn.Module):
    """Four conv blocks followed by flattening.

    A 28x28 input gives ``out_channels`` features (1x1 maps); an 84x84 input gives ``out_channels * 25`` (5x5).

    Args:
        in_channels: image channels (1 for Omniglot, 3 for colour images).
        hidden_channels: width of the first three blocks.
        out_channels: width of the last block.
        track_running_stats: keep BatchNorm running statistics for evaluation. ``False`` makes BatchNorm always use
            the statistics of the current batch (transductive, as in MAML's published code).
        channels_last: keep weights and activations in channels-last layout: 2-4x faster convolutions on CPUs
            with AVX-512 and on GPUs with tensor cores, same results up to rounding.
    """

    def __init__(
        self, in_channels: int = 1, hidden_channels: int = 64, out_channels: int = 64, track_running_stats: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        widths = [in_channels, hidden_channels, hidden_channels, hidden_channels, out_channels]
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            blocks += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
                nn.BatchNorm2d(c_out, track_running_stats=track_running_stats),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*blocks)
        self.in_channels = in_channels
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.features(x).flatten(1)  # (N, out_channels * h * w)
