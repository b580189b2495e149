"""ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, arXiv:1512.03385) as a shared
encoder: torchvision's network without its classifier, ``(N, C, H, W) -> (N, D)`` features.

Two multi-task protocols use it:

* Sener & Koltun (NeurIPS 2018) on CelebA (``multi_task/models/multi_faces_resnet.py``): the CIFAR-style ResNet-18,
  a 3x3 stride-1 first convolution and no max-pool (``small_input=True``), its 8x8 last map on 64x64 inputs average
  pooled by 4 to 2x2, flattened to 2048 features (``pool_size=2``), random initialisation.
* LibMTL on Office-31 / Office-Home (``examples/office/main.py``): the ImageNet ResNet-18, global average pooling, then
  ``Linear(512, 512)``, BatchNorm, ReLU and dropout 0.5 (``hidden_dim=512, dropout=0.5``), with ImageNet weights
  and ImageNet normalisation of the inputs (``imagenet_normalize=True``).

Weights are never downloaded: ``weights`` names a local file holding a torchvision ResNet-18 ``state_dict`` (e.g.
``resnet18-f37072fd.pth`` from torchvision's cache); the classifier ``fc.*`` entries are ignored, every other entry
must match. Without it the initialisation is torchvision's random one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet18

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 without its classifier.

    Features: ``512 * pool_size**2`` (the pooled last map, flattened), or ``hidden_dim`` when it is positive.

    Args:
        in_channels: image channels.
        small_input: CIFAR-style stem (3x3 stride-1 convolution, no max-pool) for inputs of 32 to 64 pixels.
        pool_size: side of the adaptive average pooling of the last map (1: global pooling).
        hidden_dim: width of a ``Linear, BatchNorm1d, ReLU, Dropout`` layer after pooling (LibMTL's encoder); 0: none.
        dropout: dropout probability of that layer.
        imagenet_normalize: normalise [0, 1] inputs with the ImageNet mean and standard deviation first (for
            ImageNet weights).
        weights: path of a torchvision ResNet-18 ``state_dict`` to load; ``None``: random initialisation.

    Raises:
        ValueError: invalid sizes, or a weights file that does not fit this network.
        FileNotFoundError: ``weights`` does not exist.
    """

    def __init__(
        self,
        in_channels: int = 3,
        small_input: bool = False,
        pool_size: int = 1,
        hidden_dim: int = 0,
        dropout: float = 0.0,
        imagenet_normalize: bool = False,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or pool_size < 1 or hidden_dim < 0 or not 0 <= dropout < 1:
            raise ValueError(f"need in_channels >= 1, pool_size >= 1, hidden_dim >= 0 and 0 <= dropout < 1; got "
                             f"{in_channels}, {pool_size}, {hidden_dim}, {dropout}")
        if imagenet_normalize and in_channels != 3:
            raise ValueError("imagenet_normalize needs in_channels=3 (the ImageNet statistics are per RGB channel)")
        net = resnet18(weights=None)
        if small_input:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.avgpool = nn.AdaptiveAvgPool2d(pool_size)
        net.fc = nn.Identity()
        if weights is not None:
            _load(net, Path(weights))
        self.net = net
        self.num_features = hidden_dim or 512 * pool_size**2
        self.hidden = nn.Identity()
        if hidden_dim:
            linear = nn.Linear(512 * pool_size**2, hidden_dim)
            nn.init.normal_(linear.weight, 0.0, 0.005)  # LibMTL's initialisation of its encoder's hidden layer
            nn.init.constant_(linear.bias, 0.1)
            self.hidden = nn.Sequential(linear, nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.imagenet_normalize = imagenet_normalize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.imagenet_normalize:
            x = (x - self.mean) / self.std
        return self.hidden(self.net(x))  # (N, num_features): torchvision flattens the pooled map


def _load(net: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"ResNet18 weights file {path} does not exist; give the path of a torchvision "
                                f"ResNet-18 state_dict (no download is attempted), or weights: null for random "
                                f"initialisation.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not fit this ResNet18 (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"other shapes {sorted(shapes)[:3]}); give a torchvision resnet18 state_dict, with "
                         f"small_input=false and in_channels=3 for ImageNet weights.")
    net.load_state_dict(state, strict=False)  # strict on everything but the removed classifier, checked above
