"""ResNet-12 and DropBlock."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl.nn import DropBlock, ResNet12


def test_metaoptnet_sizes():
    model = ResNet12()
    assert sum(p.numel() for p in model.parameters()) == 12_424_320  # MetaOptNet reports 12.4M
    x = torch.randn(2, 3, 84, 84)
    model.eval()
    assert model(x).shape == (2, 640 * 5 * 5)
    assert ResNet12(avg_pool=True).eval()(x).shape == (2, 640)
    assert ResNet12(in_channels=1, channels=(8, 8, 16, 16)).eval()(torch.randn(3, 1, 28, 28)).shape == (3, 16)


def test_eval_is_deterministic_and_training_drops():
    torch.manual_seed(0)
    model = ResNet12(channels=(8, 8, 16, 16), drop_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_dropblock_drops_square_blocks_at_the_target_rate():
    torch.manual_seed(0)
    drop = DropBlock(drop_rate=0.1, block_size=3).train()
    y = drop(torch.ones(256, 4, 12, 12))
    dropped = (y == 0).float().mean().item()
    assert 0.08 < dropped < 0.12
    assert y.mean().item() == pytest.approx(1.0, abs=1e-5)  # kept units are rescaled: expectation unchanged
    # one centre drops exactly one block_size x block_size square
    drop = DropBlock(drop_rate=1 / 100, block_size=3).train()
    torch.manual_seed(3)
    zeros = [(drop(torch.ones(1, 1, 12, 12)) == 0) for _ in range(200)]
    single = next(z for z in zeros if 0 < z.sum() <= 9)
    rows, cols = single[0, 0].nonzero(as_tuple=True)
    assert single.sum() == 9 and rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2
    assert torch.equal(DropBlock(0.1, 3).eval()(torch.ones(2, 2, 5, 5)), torch.ones(2, 2, 5, 5))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="drop_rate must be in"):
        DropBlock(1.0)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        ResNet12(block_size=0)
    with pytest.raises(ValueError, match="4 block widths"):
        ResNet12(channels=(64, 128))
