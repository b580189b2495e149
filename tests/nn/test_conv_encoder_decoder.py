"""ConvEncoderDecoder: output size, stages compose to forward and return plain tensors (what cross-stitch needs),
bad sizes and settings named."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl.mtl.architectures import CrossStitch
from lightning_mtl.nn.conv_encoder_decoder import ConvEncoderDecoder


def test_output_keeps_the_input_size():
    net = ConvEncoderDecoder(in_channels=1, widths=(4, 8, 16)).eval()
    assert net(torch.randn(2, 1, 12, 16)).shape == (2, 4, 12, 16)


def test_stages_compose_to_forward_and_return_tensors():
    net = ConvEncoderDecoder(in_channels=3, widths=(4, 8)).eval()
    x = torch.randn(2, 3, 8, 8)
    state, shapes = x, []
    for stage in net.stages():
        state = stage(state)
        assert isinstance(state, torch.Tensor)
        shapes.append(tuple(state.shape[1:]))
    assert shapes == [(4, 8, 8), (8, 4, 4), (4, 8, 8)]
    torch.testing.assert_close(state, net(x))


def test_cross_stitch_takes_it():
    arch = CrossStitch(["a", "b"], ConvEncoderDecoder(in_channels=1, widths=(4, 8)))
    reps = arch(torch.randn(2, 1, 8, 8))
    assert {t: tuple(z.shape) for t, z in reps.items()} == {"a": (2, 4, 8, 8), "b": (2, 4, 8, 8)}


def test_bad_sizes_and_settings():
    with pytest.raises(ValueError, match="multiples of 4"):
        ConvEncoderDecoder(widths=(4, 8, 16))(torch.randn(1, 1, 10, 12))
    with pytest.raises(ValueError, match="at least one width"):
        ConvEncoderDecoder(widths=())
    with pytest.raises(ValueError, match="in_channels >= 1"):
        ConvEncoderDecoder(in_channels=0)
