"""Running a module once to learn its output's shape, without training side effects."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def probe(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` in eval mode and without gradients, the module's mode restored afterwards.

    Used to size heads from a backbone's output: in train mode the probe (a batch of zeros) would move BatchNorm
    running statistics and draw dropout masks from the global random stream.
    """
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return module(x)
    finally:
        module.train(training)


def feature_dim(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Size of ``module``'s flattened output for one input of ``input_shape`` (probed on two zero inputs)."""
    return probe(module, torch.zeros(2, *input_shape)).flatten(1).shape[1]
