"""SegNet, the encoder-decoder of MTAN's dense-prediction experiments.

Badrinarayanan, Kendall & Cipolla, "SegNet: A Deep Convolutional Encoder-Decoder Architecture for Image
Segmentation", TPAMI 2017, arXiv:1511.00561, as written in the code of Liu, Johns & Davison, "End-to-End Multi-Task
Learning with Attention", CVPR 2019, arXiv:1803.10704 (``im2im_pred/model_segnet_*.py``): five VGG-16 levels of
[conv 3x3, BatchNorm, ReLU] (2, 2, 3, 3, 3 layers of widths 64, 128, 256, 512, 512), each followed by a 2x2 max-pool
that keeps its arg-max indices; the decoder mirrors it, each level a 2x2 max-unpool with the matching indices (values
go back to the positions the maxima came from, zeros elsewhere) and convolutions narrowing to the previous level's
width. Xavier-normal convolution weights, zero biases. The output is the last decoder level's ``(B, widths[0], H, W)``
map, the input's size; task heads live in the tasks.

Stages (:meth:`SegNet.stages`, what MTAN interleaves attention with) carry a state ``(x, skips)``: the feature map and
a tuple of ``(indices, pre-pool size)`` pairs, a stack the encoder pushes and the decoder pops. A stage takes the
previous stage's state (the first also a plain image batch) and returns its own. Each level's max-pool opens the next
stage, so every stage ends on a level's convolutions, where MTAN's code attends (before pooling); the deepest pool
and its unpool open the first decoder stage. Storing the pre-pool size lets odd sizes unpool back exactly, so any
input of at least ``2 ** len(widths)`` pixels a side comes back at its own size.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

#: A stage's state: the feature map and the stack of (pooling indices, pre-pool spatial size) of the open levels.
SegNetState = tuple[Tensor, tuple[tuple[Tensor, tuple[int, ...]], ...]]


def _conv_layers(c_in: int, c_out: int, n: int) -> nn.Sequential:
    """``n`` x [conv 3x3, BatchNorm, ReLU], the first ``c_in -> c_out``, the rest ``c_out -> c_out``."""
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(True)]
    return nn.Sequential(*layers)


def _as_state(state: Tensor | SegNetState) -> SegNetState:
    return (state, ()) if isinstance(state, Tensor) else state


class SegNetEncoderStage(nn.Module):
    """[2x2 max-pool pushing its indices, if ``pool``] then one level's convolutions."""

    def __init__(self, convs: nn.Sequential, pool: bool) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2, 2, return_indices=True) if pool else None
        self.convs = convs

    def forward(self, state: Tensor | SegNetState) -> SegNetState:
        x, skips = _as_state(state)
        if self.pool is not None:
            pooled, indices = self.pool(x)  # (B, C, H/2, W/2) twice
            skips, x = (*skips, (indices, tuple(x.shape[-2:]))), pooled
        return self.convs(x), skips


class SegNetDecoderStage(nn.Module):
    """[2x2 max-pool pushing its indices, if ``pool``: the deepest level], a 2x2 max-unpool popping the last
    indices, then one level's convolutions."""

    def __init__(self, convs: nn.Sequential, pool: bool) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2, 2, return_indices=True) if pool else None
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.convs = convs

    def forward(self, state: SegNetState) -> SegNetState:
        x, skips = _as_state(state)
        if self.pool is not None:
            pooled, indices = self.pool(x)
            skips, x = (*skips, (indices, tuple(x.shape[-2:]))), pooled
        if not skips:
            raise ValueError("a SegNet decoder stage needs the pooling indices of its encoder level: run the stages "
                             "in order, from the first encoder stage")
        (indices, size), skips = skips[-1], skips[:-1]
        return self.convs(self.unpool(x, indices, output_size=size)), skips


class SegNet(nn.Module):
    """SegNet ``(B, in_channels, H, W) -> (B, widths[0], H, W)``.

    Args:
        in_channels: image channels.
        widths: the encoder levels' widths (MTAN's code: VGG-16's 64, 128, 256, 512, 512). Levels 0 and 1 have two
            convolutions, deeper levels three; the decoder mirrors them. Inputs need at least ``2 ** len(widths)``
            pixels a side.

    Raises:
        ValueError: no levels, or a width or ``in_channels`` below 1.
    """

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (64, 128, 256, 512, 512)) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1 or in_channels < 1:
            raise ValueError(f"SegNet needs in_channels >= 1 and at least one width, all >= 1; got in_channels="
                             f"{in_channels}, widths={widths}")
        self.in_channels, self.widths = in_channels, widths
        depth = [2 if k < 2 else 3 for k in range(len(widths))]
        self.encoder = nn.ModuleList([
            SegNetEncoderStage(_conv_layers(in_channels if k == 0 else widths[k - 1], w, depth[k]), pool=k > 0)
            for k, w in enumerate(widths)
        ])
        # decoder level k: as many layers as encoder level k, widths[k] -> widths[k - 1] (level 0 keeps widths[0])
        self.decoder = nn.ModuleList([
            SegNetDecoderStage(_conv_layers(widths[k], widths[max(k - 1, 0)], depth[k]),
                               pool=k == len(widths) - 1)
            for k in reversed(range(len(widths)))
        ])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self) -> list[nn.Module]:
        """The encoder then the decoder stages, each ``state -> state`` (:data:`SegNetState`; the first also takes
        the image batch). Their states' first items are the levels' feature maps; they share this module's
        parameters."""
        return [*self.encoder, *self.decoder]

    def forward(self, x: Tensor) -> Tensor:
        state: Tensor | SegNetState = x
        for stage in self.stages():
            state = stage(state)
        return state[0]  # (B, widths[0], H, W)
