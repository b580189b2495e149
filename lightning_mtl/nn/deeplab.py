"""DeepLab's dilated ResNet-50 encoder and its ASPP decoder, the NYUv2 / Cityscapes ResNet models of multi-task
learning.

Chen, Papandreou, Schroff & Adam, "Rethinking Atrous Convolution for Semantic Image Segmentation" (DeepLabv3),
arXiv:1706.05587, 2017; Yu, Koltun & Funkhouser, "Dilated Residual Networks", CVPR 2017, arXiv:1705.09914. As used by
Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, arXiv:1803.10704
(``lorenmt/mtan`` ``im2im_pred/model_resnet_mtan/``: ``ResnetDilated``, ``MTANDeepLabv3``) and LibMTL (Lin & Zhang,
JMLR 2023, arXiv:2203.14338; ``LibMTL/model/resnet_dilated.py``, ``examples/nyu/main.py``): a ResNet-50 whose last two
stages trade their stride for dilation, then one ASPP head per task.

Encoder (:class:`DeepLabResNet50`). torchvision's ``resnet50`` with ``replace_stride_with_dilation=[False, True,
True]`` (output stride 8): layer3 and layer4 keep stride 1 (their downsampling 1x1 shortcut too); layer3's 3x3
convolutions have dilation 2 but its first block's, layer4's have dilation 4 but its first block's, which has 2. That
is what the reference codes' ``_nostride_dilate(dilate_scale=8)`` does to torchvision's model (the strided convolution
gets half the dilation). An ``(B, 3, H, W)`` image gives ``(B, 2048, ceil(H / 8), ceil(W / 8))``; ``output_stride=16``
dilates layer4 only, 32 is the plain ResNet-50. Without the average pool and the classifier; parameter and buffer
names are torchvision's (``conv1.weight``, ``layer3.0.conv2.weight``, ...), so a torchvision ResNet-50 state dict
loads as it is (its ``fc.*`` entries are dropped).

Stages (:meth:`DeepLabResNet50.stages`, what MTAN, cross-stitch and LTB interleave with): the stem ``[conv1, bn1,
relu, maxpool]``, then layer1 to layer4, with 64, 256, 512, 1024 and 2048 channels at strides 4, 4, 8, 8 and 8.

Decoder (:class:`DeepLabHead`). DeepLabv3's head, which LibMTL's NYUv2 example and MTAN's ResNet code put on every
task (LibMTL's is a copy of torchvision's): :class:`ASPP` (a 1x1 branch, three 3x3 branches of dilations 12, 24, 36,
and an image-pooling branch, each ``channels`` wide with BatchNorm and ReLU, concatenated, projected back to
``channels`` by a 1x1 conv-BN-ReLU, then dropout 0.5), a 3x3 conv-BN-ReLU, and a 1x1 convolution to the task's
outputs. Module names and indices are those of torchvision's ``DeepLabHead``, so a ``deeplabv3_resnet50``
``classifier.*`` state dict fits one. It returns the map at the encoder's resolution: the dense tasks' ``align``
resizes it to the target (bilinear, ``align_corners=False``; the reference codes interpolate with
``align_corners=True``). Its image-pooling branch normalises a 1x1 map, so training needs batches of at least 2.

Initialisation: torchvision's for the encoder, PyTorch's defaults for the head (as torchvision and LibMTL), unless
``weights`` names a state-dict file for the encoder; nothing is downloaded here.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet50

#: output stride -> torchvision's ``replace_stride_with_dilation`` for layer2, layer3, layer4
_DILATE = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}
_SHOWN = 5  # keys listed in a load error


class DeepLabResNet50(nn.Module):
    """Dilated ResNet-50 ``(B, in_channels, H, W) -> (B, 2048, ceil(H / s), ceil(W / s))``, ``s`` the output stride.

    Usable wherever a backbone is expected, e.g. in YAML::

        architecture:
          class_path: lightning_mtl.mtl.architectures.MTAN
          init_args:
            backbone:
              class_path: lightning_mtl.nn.DeepLabResNet50
              init_args: {weights: /data/resnet50-11ad3fa6.pth}
            reduction: 4

    Args:
        weights: path of a ``.pth`` state dict to load (e.g. torchvision's ImageNet ResNet-50 file, or one saved from
            this module); ``None``: torchvision's random initialisation. Loaded with ``torch.load(weights_only=True)``
            on the CPU; ``fc.*`` entries (the ImageNet classifier) are ignored, every other key must match.
        output_stride: 8 (DeepLab's multi-task setting: layer3 and layer4 dilated), 16 (layer4 dilated) or 32 (no
            dilation).
        in_channels: image channels; other than 3, ``conv1`` is a new (random) 7x7 convolution, which an ImageNet
            state dict does not fit.

    Raises:
        ValueError: an ``output_stride`` other than 8, 16, 32, ``in_channels`` below 1, or a weights file whose keys
            or shapes do not match this model's (the error lists them).
        FileNotFoundError: ``weights`` does not exist.
    """

    num_features = 2048

    def __init__(self, weights: str | os.PathLike | None = None, output_stride: int = 8, in_channels: int = 3) -> None:
        super().__init__()
        if output_stride not in _DILATE:
            raise ValueError(f"DeepLabResNet50 output_stride must be one of {sorted(_DILATE)}, got {output_stride}")
        if in_channels < 1:
            raise ValueError(f"DeepLabResNet50 needs in_channels >= 1, got {in_channels}")
        net = resnet50(weights=None, replace_stride_with_dilation=_DILATE[output_stride])
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's
        # torchvision's attribute names, so that its state dicts load unchanged; avgpool and fc are left behind
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.output_stride, self.in_channels = output_stride, in_channels
        if weights is not None:
            self.load_weights(weights)

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load the state dict saved at ``path`` (``fc.*`` entries ignored; every other key and shape must match).

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not a state dict, or its keys or shapes differ from this model's.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DeepLabResNet50 weights file {os.fspath(path)!r} does not exist (nothing is "
                                    f"downloaded: save a torchvision resnet50 state dict there first)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{os.fspath(path)!r} holds a {type(state).__name__}, not a state dict (a mapping of "
                             f"names to tensors, as torch.save(model.state_dict(), path) writes)")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}" for k, v in own.items()
                  if k in state and state[k].shape != v.shape]
        if missing or unexpected or shapes:
            problems = [f"{len(v)} {what} ({'; '.join(v[:_SHOWN])}{', ...' if len(v) > _SHOWN else ''})"
                        for what, v in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("shape mismatches", shapes)) if v]
            raise ValueError(f"{os.fspath(path)!r} is not a state dict of this DeepLabResNet50 (in_channels="
                             f"{self.in_channels}): {', '.join(problems)}. It takes a torchvision resnet50 state dict "
                             f"or one saved from DeepLabResNet50 (a checkpoint's prefixes such as 'module.' or "
                             f"'backbone.' must be stripped first).")
        self.load_state_dict(state)

    def stages(self) -> list[nn.Module]:
        """The stem ``[conv1, bn1, relu, maxpool]`` then layer1 to layer4, each ``(B, C, H, W) -> (B, C', H', W')``,
        as the stages multi-task architectures interleave with. They are this module's modules (the stem a new
        ``nn.Sequential`` holding them), so they share its parameters."""
        stem = nn.Sequential(OrderedDict(conv1=self.conv1, bn1=self.bn1, relu=self.relu, maxpool=self.maxpool))
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer2(self.layer1(x))  # (B, 512, H/8, W/8)
        return self.layer4(self.layer3(x))  # (B, 2048, H/8, W/8) at output stride 8


def _conv_bn_relu(c_in: int, c_out: int, kernel_size: int = 1, dilation: int = 1) -> list[nn.Module]:
    pad = dilation * (kernel_size // 2)
    return [nn.Conv2d(c_in, c_out, kernel_size, padding=pad, dilation=dilation, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU()]


class ImagePooling(nn.Sequential):
    """ASPP's image-level branch: global average pool, 1x1 conv-BN-ReLU, broadcast back to the input's size."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        # bilinear from 1x1 is a broadcast; torchvision's branch interpolates too, kept for its numerics
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling ``(B, in_channels, h, w) -> (B, channels, h, w)``: a 1x1 branch, one 3x3
    branch per dilation ``rates``, the :class:`ImagePooling` branch (each conv-BN-ReLU, ``channels`` wide),
    concatenated, then a 1x1 conv-BN-ReLU projection and dropout. Module names are torchvision's ``ASPP``'s.

    Args:
        in_channels: input channels.
        rates: dilations of the 3x3 branches.
        channels: width of every branch and of the output.
        dropout: dropout rate after the projection (DeepLabv3: 0.5).
    """

    def __init__(self, in_channels: int, rates: Sequence[int] = (12, 24, 36), channels: int = 256,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Sequential(*_conv_bn_relu(in_channels, channels)),
            *(nn.Sequential(*_conv_bn_relu(in_channels, channels, 3, r)) for r in rates),
            ImagePooling(in_channels, channels),
        ])
        self.project = nn.Sequential(*_conv_bn_relu(len(self.convs) * channels, channels), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))  # (B, channels, h, w)


class DeepLabHead(nn.Sequential):
    """DeepLabv3's decoder ``(B, in_channels, h, w) -> (B, out_channels, h, w)``: :class:`ASPP`, a 3x3
    conv-BN-ReLU, a 1x1 convolution (see the module docstring). The output is not upsampled: a dense task's ``align``
    resizes it.

    Args:
        in_channels: channels of the encoder's map (2048 for :class:`DeepLabResNet50`).
        out_channels: values predicted per pixel (classes, 1 for depth, 3 for normals).
        rates: the dilations of ASPP's 3x3 branches (DeepLabv3 at output stride 8 and the reference codes: 12, 24,
            36; at output stride 16: 6, 12, 18).
        channels: width of every ASPP branch, of its projection and of the 3x3 layer (256).
        dropout: ASPP's dropout rate after its projection (0.5).

    Raises:
        ValueError: a width below 1, no rate or a rate below 1, or ``dropout`` outside ``[0, 1)``.
    """

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = (12, 24, 36),
                 channels: int = 256, dropout: float = 0.5) -> None:
        rates = tuple(int(r) for r in rates)
        if min(in_channels, out_channels, channels) < 1:
            raise ValueError(f"DeepLabHead needs in_channels, out_channels and channels >= 1, got {in_channels}, "
                             f"{out_channels}, {channels}")
        if not rates or min(rates) < 1:
            raise ValueError(f"DeepLabHead needs at least one ASPP dilation rate, all >= 1, got {rates}")
        if not 0 <= dropout < 1:
            raise ValueError(f"DeepLabHead dropout must be in [0, 1), got {dropout}")
        super().__init__(ASPP(in_channels, rates, channels, dropout), *_conv_bn_relu(channels, channels, 3),
                         nn.Conv2d(channels, out_channels, 1))
        self.in_channels, self.out_channels, self.rates = in_channels, out_channels, rates
