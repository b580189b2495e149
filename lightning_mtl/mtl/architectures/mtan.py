"""Multi-Task Attention Network (MTAN).

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, arXiv:1803.10704. One shared
network runs once per input; each task reads it through a soft attention module per stage j:

    mask_i^j = sigmoid(BN(conv1x1(ReLU(BN(conv1x1([u^j ; f^(j-1)(a_i^(j-1))]))))))   in [0, 1]^(C_j x H_j x W_j)
    a_i^j = mask_i^j * u^j

where u^j is stage j's shared feature map, f^(j-1) a [conv 3x3, BatchNorm, ReLU] taking the previous attended map to
stage j's width and resized to its height and width (max-pooled when the stage downsamples, bilinearly upsampled,
corners aligned, when it upsamples: SegNet's decoder), and the first stage's mask reads u^1 alone. Task i's
representation is its last attended map a_i^S. The attention modules (the two 1x1 layers) are task i's parameters;
the backbone and the f blocks are shared, f being shared by every task as in the paper and its code.

Deviations from the authors' code (``lorenmt/mtan``: ``im2im_pred/model_segnet_mtan.py``, ``resnet_mtan.py``):

- A generic backbone split into stages (:func:`~lightning_mtl.mtl.architectures.base.split_stages`) replaces the
  hand-written SegNet and ResNet layers. The authors compute the mask from a stage's first layer (or all but its
  last residual block) and apply it to the stage's last layer; a stage is opaque here, so the mask reads the stage's
  output and is applied to it (for :class:`~lightning_mtl.nn.SegNet`, whose stages end before the pooling, that is
  the map the authors attend).
- The authors' f is a [conv, BN, ReLU] (SegNet) or a bottleneck residual block (ResNet); here it is the former.
  It downsamples with an adaptive max-pool to the next stage's size (their 2x2 max-pool when the size halves) and
  upsamples before its convolution, as their decoder does. The move from SegNet's encoder to its decoder has no
  pool-then-upsample round trip: the deepest encoder map and the first decoder map have the same size here.
- The attention's hidden width is ``C_j // reduction``: 1 in the SegNet code, 4 in the ResNet code.
- Attention and f convolutions are Xavier-normal initialised with zero biases, as in the authors' code; the backbone
  keeps its own initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtl.mtl.architectures.base import Architecture, split_stages


def _features(state: Tensor | tuple) -> Tensor:
    """A stage's feature map: its output, or the first item of the state it returns (SegNet: ``(x, skips)``)."""
    return state if isinstance(state, Tensor) else state[0]


def _conv_bn_relu(c_in: int, c_out: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class MTAN(Architecture):
    """A shared ``backbone`` run once per input; per task, a soft attention mask on the output of every stage.

    A stage returns a ``(B, C, H, W)`` feature map, or a tuple whose first item is one and whose other items pass
    to the next stage untouched (:class:`~lightning_mtl.nn.SegNet`'s pooling indices). The attention modules are
    sized from a probe: one ``probe_size`` x ``probe_size`` input through the stages, in evaluation mode, no gradient.

    Args:
        tasks: task names.
        backbone: the shared network, split by :func:`~lightning_mtl.mtl.architectures.base.split_stages` (its
            ``stages()`` or the children of an ``nn.Sequential``); e.g. ``lightning_mtl.nn.SegNet``, ``ResNet12``,
            ``Conv4``. Task representations are the last stage's attended maps.
        reduction: the attention's hidden width is ``C // reduction`` (at least 1): 1 as in the authors' SegNet code,
            4 as in their ResNet code.
        in_channels: input channels for the probe; ``None``: those of the backbone's first ``nn.Conv2d``.
        probe_size: height and width of the probe input; large enough for every stage's downsampling (SegNet with 5
            levels needs 32).

    Raises:
        ValueError: ``reduction`` or ``probe_size`` below 1, no ``in_channels`` to find, or a stage that does not
            output a 4-D feature map.
    """

    def __init__(self, tasks: list[str], backbone: nn.Module, reduction: int = 1, in_channels: int | None = None,
                 probe_size: int = 64) -> None:
        super().__init__(tasks)
        if reduction < 1 or probe_size < 1:
            raise ValueError(f"MTAN needs reduction >= 1 and probe_size >= 1, got {reduction} and {probe_size}")
        self.backbone = backbone
        self._stages = split_stages(backbone)  # a plain list: the backbone alone registers their parameters
        widths = self._probe_widths(in_channels, probe_size)

        def attention(c_in: int, c: int) -> nn.Sequential:  # g then h: the mask of a C-wide stage
            hidden = max(1, c // reduction)
            return nn.Sequential(*_conv_bn_relu(c_in, hidden, 1), nn.Conv2d(hidden, c, 1), nn.BatchNorm2d(c),
                                 nn.Sigmoid())

        # attention[i][j]: task i's module at stage j; indexed by position, so any task name works
        self.attention = nn.ModuleList([
            nn.ModuleList([attention(c if j == 0 else 2 * c, c) for j, c in enumerate(widths)]) for _ in self.tasks
        ])
        self.blocks = nn.ModuleList([_conv_bn_relu(c, widths[j + 1], 3) for j, c in enumerate(widths[:-1])])  # f
        for m in (*self.attention.modules(), *self.blocks.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def _probe_widths(self, in_channels: int | None, probe_size: int) -> list[int]:
        if in_channels is None:
            conv = next((m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)), None)
            if conv is None:
                raise ValueError(f"MTAN cannot find the input channels of {type(self.backbone).__name__} (no "
                                 f"nn.Conv2d): give in_channels")
            in_channels = conv.in_channels
        param = next(self.backbone.parameters(), None)
        kwargs = {} if param is None else {"device": param.device, "dtype": param.dtype}
        state: Tensor | tuple = torch.zeros(1, in_channels, probe_size, probe_size, **kwargs)
        widths, was_training = [], self.backbone.training
        self.backbone.eval()  # no BatchNorm statistics move, no dropout
        try:
            with torch.no_grad():
                for j, stage in enumerate(self._stages):
                    state = stage(state)
                    if _features(state).dim() != 4:
                        raise ValueError(f"MTAN attends to (B, C, H, W) feature maps; stage {j} of "
                                         f"{type(self.backbone).__name__} gives {tuple(_features(state).shape)}")
                    widths.append(_features(state).shape[1])
        finally:
            self.backbone.train(was_training)
        return widths

    def _carry(self, j: int, a: Tensor, size: torch.Size) -> Tensor:
        """f^j: task's attended map of stage j -> stage j + 1's width, height and width."""
        if a.shape[-2:] == size:
            return self.blocks[j](a)
        if a.shape[-2] <= size[0] and a.shape[-1] <= size[1]:  # an upsampling stage: resize, then convolve
            return self.blocks[j](F.interpolate(a, size=size, mode="bilinear", align_corners=True))
        return F.adaptive_max_pool2d(self.blocks[j](a), size)

    def attend(self, x: Tensor, tasks: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
        """The representations of ``tasks`` and, per task, its attention masks, one ``(B, C_j, H_j, W_j)`` per stage
        (for diagnostics; :meth:`represent` returns the first item)."""
        shared, state = [], x
        for stage in self._stages:  # the shared network: once, whatever the number of tasks
            state = stage(state)
            shared.append(_features(state))  # (B, C_j, H_j, W_j)
        reps, masks = {}, {}
        for t in tasks:
            modules, a, masks[t] = self.attention[self.tasks.index(t)], None, []
            for j, u in enumerate(shared):
                merged = u if a is None else torch.cat([u, self._carry(j - 1, a, u.shape[-2:])], dim=1)
                masks[t].append(modules[j](merged))  # (B, C_j, H_j, W_j) in [0, 1]
                a = masks[t][-1] * u
            reps[t] = a
        return reps, masks

    def represent(self, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        return self.attend(x, tasks)[0]

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {t: [p for p in self.attention[i].parameters() if p.requires_grad] for i, t in enumerate(self.tasks)}
