"""Any timm model as a few-shot or multi-task backbone (optional extra: ``pip install 'lightning-mtl[timm]'``)."""

from __future__ import annotations

import difflib

from torch import Tensor, nn


class TimmBackbone(nn.Module):
    """A timm model without its classifier: ``(N, C, H, W) -> (N, D)`` pooled features.

    Usable wherever a backbone is expected, e.g. in YAML::

        backbone:
          class_path: lightning_mtl.nn.TimmBackbone
          init_args: {name: resnet18, in_channels: 1}

    Args:
        name: a timm model name (``timm.list_models()``).
        pretrained: load timm's pretrained weights (downloaded by timm, or from its cache when offline).
        in_channels: image channels.
        drop_rate: dropout before the (removed) classifier, passed to timm.
    """

    def __init__(self, name: str, pretrained: bool = False, in_channels: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as e:
            raise ImportError("TimmBackbone needs timm: pip install 'lightning-mtl[timm]'") from e
        if name not in timm.list_models(pretrained=False):
            close = difflib.get_close_matches(name, timm.list_models(), n=5)
            raise ValueError(f"unknown timm model {name!r}; close names: {', '.join(close) or 'none'} "
                             f"(timm.list_models() lists all)")
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_channels,
                                       drop_rate=drop_rate)
        self.num_features = self.model.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)  # (N, num_features)
