"""SegNet: MTAN's encoder-decoder, its stages and its max-unpooling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_mtl.nn.segnet import SegNet

SMALL = (8, 8, 16, 16, 16)


def test_parameter_count_is_mtan_codes_segnet():
    # MTAN's code reports its single-task SegNet (with a 13-class head: conv 3x3 64->64 and conv 1x1 64->13, with
    # biases) as 24,981,069 parameters
    head = (64 * 64 * 9 + 64) + (64 * 13 + 13)
    assert sum(p.numel() for p in SegNet().parameters()) + head == 24_981_069


@pytest.mark.parametrize("size", [(32, 32), (37, 45)])
def test_output_has_the_inputs_size_and_the_first_width(size):
    torch.manual_seed(0)
    model = SegNet(widths=SMALL)
    assert model(torch.randn(2, 3, *size)).shape == (2, SMALL[0], *size)
    assert SegNet(in_channels=1, widths=(4,))(torch.randn(2, 1, 6, 6)).shape == (2, 4, 6, 6)


def test_stages_compose_to_forward_and_are_the_models_modules():
    torch.manual_seed(0)
    model = SegNet(widths=SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    state, sizes = x, []
    for stage in model.stages():
        state = stage(state)
        sizes.append(state[0].shape[-1])
    assert sizes == [32, 16, 8, 4, 2, 2, 4, 8, 16, 32]  # each level's map, encoder then decoder
    assert state[1] == ()  # every pushed index was popped
    assert torch.equal(state[0], model(x))
    stage_params = {id(p) for s in model.stages() for p in s.parameters()}
    assert stage_params == {id(p) for p in model.parameters()}


def test_max_unpool_puts_values_at_the_pooled_argmax_positions():
    torch.manual_seed(0)
    model = SegNet(in_channels=1, widths=(2, 2, 3, 3, 3)).eval()
    pools = [s.pool for s in model.encoder[1:]] + [model.decoder[0].pool]  # in the order they push indices
    seen: dict[torch.nn.Module, tuple] = {}
    for m in [*pools, *(s.unpool for s in model.decoder)]:
        m.register_forward_hook(lambda mod, args, out: seen.__setitem__(mod, (args, out)))
    model(torch.randn(2, 1, 32, 32))
    for j, stage in enumerate(model.decoder):
        (pre_pool,), (pooled, pool_idx) = seen[pools[len(pools) - 1 - j]]
        (x, idx), out = seen[stage.unpool]
        assert torch.equal(idx, pool_idx)  # the matching encoder level's indices
        # the indices are the arg-max of each 2x2 window of the pre-pool map
        assert torch.equal(pre_pool.flatten(2).gather(2, pool_idx.flatten(2)), pooled.flatten(2))
        assert torch.equal(pooled, F.max_pool2d(pre_pool, 2))
        # unpooling writes x there and zeros elsewhere, at the pre-pool size
        expected = torch.zeros_like(pre_pool).flatten(2).scatter_(2, idx.flatten(2), x.flatten(2))
        assert out.shape == pre_pool.shape and torch.equal(out, expected.view_as(out))
        if j == 0:  # the deepest level pools and unpools the same map: its window maxima survive, the rest is 0
            kept = pre_pool == F.interpolate(pooled, scale_factor=2, mode="nearest")
            assert torch.equal(out, torch.where(kept, pre_pool, 0.0))


def test_decoder_stage_without_indices_and_bad_arguments_fail_clearly():
    model = SegNet(widths=SMALL)
    with pytest.raises(ValueError, match="needs the pooling indices"):
        model.decoder[1](torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match="at least one width"):
        SegNet(widths=())
    with pytest.raises(ValueError, match="all >= 1"):
        SegNet(widths=(8, 0))
