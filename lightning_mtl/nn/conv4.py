"""Conv-4: the four-block convolutional backbone of Vinyals et al. (NeurIPS 2016), Snell et al. (NeurIPS 2017) and
Finn et al. (ICML 2017): 4 x [conv 3x3, BatchNorm, ReLU, max-pool 2x2].

Each block runs max-pool before ReLU: ReLU is monotone, so ``relu(max_pool(x)) == max_pool(relu(x))`` exactly, and
their gradients agree too (both send the gradient to the window's arg-max, and both give zero when the window's
maximum is <= 0), while ReLU and its backward touch a quarter of the elements. The parameter names are the usual
ones (``features.{0,4,8,12}`` convolutions, ``features.{1,5,9,13}`` BatchNorms).

The BatchNorms normalise a channels-last map as the ``(N*H*W, C)`` matrix it is in memory (:class:`BatchNorm2d`):
the same statistics and results, but PyTorch's kernels reduce that matrix much faster than the 4-D channels-last
tensor, most of all in the double backward that second-order MAML differentiates through (docs/history.md).
"""

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
        channels_last: keep weights and activations in channels-last layout: faster convolutions on CPUs
            with AVX-512 and on GPUs with tensor cores (docs/history.md), same results up to rounding.
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
                BatchNorm2d(c_out, track_running_stats=track_running_stats),
                nn.MaxPool2d(2),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*blocks)
        self.in_channels = in_channels
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and not torch._C._functorch.is_batchedtensor(x):  # (vmap has no memory formats)
            x = _channels_last(x)  # the convolutions then keep the layout, whatever the weights' strides
        return self.features(x).flatten(1)  # (N, out_channels * h * w)

    def stages(self) -> list[nn.Sequential]:
        """The four blocks, each ``[conv, BatchNorm, max-pool, ReLU]``, as the stages multi-task architectures
        interleave with (cross-stitch units, MTAN attention). They share this module's parameters; their outputs are
        feature maps (no flattening) and the input is not converted to channels-last."""
        return [self.features[i: i + 4] for i in range(0, len(self.features), 4)]


def _channels_last(x: Tensor) -> Tensor:
    """``x`` with channels-last strides, also when it has one channel.

    A one-channel NCHW tensor already counts as channels-last contiguous, so ``contiguous(memory_format=...)`` keeps
    its NCHW strides, and a convolution of it returns NCHW: the largest block (Omniglot's 28x28 maps) would run in the
    slow layout and the next convolution would convert. A copy with explicit channels-last strides (one channel: as
    cheap as the image itself) makes every block channels-last.
    """
    if x.dim() == 4 and x.shape[1] == 1 and x.stride(1) != 1:
        return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
    return x.contiguous(memory_format=torch.channels_last)


class BatchNorm2d(nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` that normalises a channels-last input as the ``(N*H*W, C)`` matrix it is in
    memory (a view, no copy), and returns a channels-last output.

    Per-channel statistics over ``(N, H, W)`` are the rows' statistics of that matrix, so the results, the running
    statistics and the gradients are those of ``nn.BatchNorm2d`` (up to the order of floating-point sums). PyTorch
    reduces the 4-D channels-last tensor one dimension at a time (``sum(0)``, then ``sum(3)``, ``sum(2)``) in
    BatchNorm's double backward, which second-order MAML runs every inner step; on the matrix each sum is one
    contiguous reduction, faster for the whole second-order BatchNorm on CPU, in fp32 and bf16 (docs/history.md).
    NCHW inputs take ``nn.BatchNorm2d``'s own path. Parameters, buffers and their names are ``nn.BatchNorm2d``'s.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        if torch._C._functorch.is_batchedtensor(x) or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)  # NCHW, or under vmap (where memory formats cannot be queried)
        n, c, h, w = x.shape
        return super().forward(x.permute(0, 2, 3, 1).reshape(n * h * w, c)).view(n, h, w, c).permute(0, 3, 1, 2)

    def _check_input_dim(self, x: Tensor) -> None:
        pass  # ``forward`` checks the 4-D input; the parent then sees it or its 2-D matrix view
