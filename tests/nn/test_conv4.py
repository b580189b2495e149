"""Conv-4: the fast layout computes exactly the textbook block (conv, BatchNorm, ReLU, max-pool), keeps every block
channels-last (also for one-channel images), and keeps the parameter names of saved checkpoints; its BatchNorm (a
channels-last map normalised as its ``(N*H*W, C)`` matrix) is ``nn.BatchNorm2d`` to second order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mtl.nn import Conv4
from lightning_mtl.nn.conv4 import BatchNorm2d


def textbook(model: Conv4) -> nn.Sequential:
    """The same network as ``model`` in the published order, NCHW, sharing nothing with it."""
    blocks = []
    for i in range(0, len(model.features), 4):
        conv, bn = model.features[i], model.features[i + 1]
        blocks += [nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1),
                   nn.BatchNorm2d(bn.num_features, track_running_stats=bn.track_running_stats),
                   nn.ReLU(), nn.MaxPool2d(2)]
    reference = nn.Sequential(*blocks, nn.Flatten())
    reference.load_state_dict({k.removeprefix("features."): v.contiguous() for k, v in model.state_dict().items()})
    return reference


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_equals_the_textbook_block_order_forward_and_backward(channels_last, in_channels):
    torch.manual_seed(0)
    model = Conv4(in_channels=in_channels, hidden_channels=16, out_channels=8, channels_last=channels_last)
    with torch.no_grad():  # non-trivial affine BatchNorm parameters, so that pool/ReLU order would matter if wrong
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1, 1)
                m.bias.uniform_(-0.5, 0.5)
    reference = textbook(model)
    x = torch.randn(6, in_channels, 28, 28)
    out, expected = model(x), reference(x)
    assert out.shape == expected.shape == (6, 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    ours = dict(model.named_parameters())
    convs = {f"{i}.bias" for i, m in enumerate(reference) if isinstance(m, nn.Conv2d)}
    for name, p in reference.named_parameters():
        if name in convs:  # a conv bias before training-mode BatchNorm has gradient 0: both are rounding noise, whose
            # size depends on the summation order (thread count)
            assert ours[f"features.{name}"].grad.abs().max() < 1e-4 and p.grad.abs().max() < 1e-4, name
            continue
        torch.testing.assert_close(ours[f"features.{name}"].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # BatchNorm running statistics are updated identically
    torch.testing.assert_close(model.features[1].running_mean, reference[1].running_mean)


def test_gradient_matches_finite_differences():
    torch.manual_seed(0)
    model = Conv4(in_channels=1, hidden_channels=4, out_channels=4, channels_last=True).double()
    x = torch.randn(4, 1, 16, 16, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: model(inp), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_block_runs_channels_last(in_channels, functional):
    model = Conv4(in_channels=in_channels, hidden_channels=16, out_channels=16)
    layouts = []
    for layer in model.features:
        if not isinstance(layer, nn.Conv2d):
            layer.register_forward_hook(lambda m, inputs, out: layouts.append((type(m).__name__, inputs[0].stride(1))))
    x = torch.randn(5, in_channels, 28, 28)
    if functional:  # MAML's adapted weights (theta - lr * grad) come back in NCHW strides
        params = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in model.named_parameters()}
        torch.func.functional_call(model, params, (x,))
    else:
        model(x)
    # channels-last: the channel stride is 1 (a 1x1 map is both layouts, so the last block is not checked)
    assert all(stride == 1 for _, stride in layouts[:-3]), layouts


def test_parameter_names_are_those_of_saved_checkpoints():
    names = set(Conv4().state_dict())
    for conv, bn in ((0, 1), (4, 5), (8, 9), (12, 13)):
        assert {f"features.{conv}.weight", f"features.{conv}.bias", f"features.{bn}.weight",
                f"features.{bn}.running_mean"} <= names
    assert len(names) == 4 * 2 + 4 * 5  # conv weight/bias; BN weight, bias, running mean/var, num_batches_tracked


def _second_order(bn: nn.Module, x: torch.Tensor, seed: int = 1) -> list[torch.Tensor]:
    """Output, first-order gradients (input, weight, bias) and the gradients of a function of those, as MAML's
    second-order meta-gradient differentiates through BatchNorm's backward."""
    g = torch.Generator().manual_seed(seed)
    x = x.detach().requires_grad_()
    out = bn(x)
    r = torch.randn(out.shape, generator=g, dtype=out.dtype)
    inner = (out * r).sum() + (out ** 3).sum() * 0.1
    grads = torch.autograd.grad(inner, [x, bn.weight, bn.bias], create_graph=True)
    outer = sum((gr * torch.randn(gr.shape, generator=g, dtype=gr.dtype)).sum() for gr in grads)
    return [out, *grads, *torch.autograd.grad(outer, [x, bn.weight, bn.bias])]


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_equals_torch_batchnorm_to_second_order(channels_last, momentum):
    torch.manual_seed(0)
    ours, reference = BatchNorm2d(5, momentum=momentum).double(), nn.BatchNorm2d(5, momentum=momentum).double()
    with torch.no_grad():
        ours.weight.uniform_(-1, 1)
        ours.bias.uniform_(-0.5, 0.5)
    reference.load_state_dict(ours.state_dict())
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):  # training: batch statistics, running statistics updated each step
        x = (torch.randn(4, 5, 6, 7, dtype=torch.double) * 3 + 1).contiguous(memory_format=layout)
        got = _second_order(ours, x, step)
        for a, b in zip(got, _second_order(reference, x, step), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        assert got[0].is_contiguous(memory_format=layout)  # the output keeps the input's layout
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buffer, rtol=1e-12, atol=0, msg=name)
    ours.eval()
    reference.eval()  # evaluation: running statistics
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-12, atol=1e-12)


def test_batchnorm_without_running_statistics_and_second_derivatives_match_finite_differences():
    torch.manual_seed(0)
    bn = BatchNorm2d(3, track_running_stats=False).double()
    x = torch.randn(3, 3, 4, 5, dtype=torch.double).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.testing.assert_close(bn(x), nn.BatchNorm2d(3, track_running_stats=False).double()(x))
    assert torch.autograd.gradgradcheck(lambda inp: bn(inp), (x,), eps=1e-6, atol=1e-5)


def test_batchnorm_rejects_a_non_4d_input_like_torch():
    with pytest.raises(ValueError, match="expected 4D input"):
        BatchNorm2d(3)(torch.randn(8, 3))


def test_batchnorm_normalises_a_channels_last_map_as_a_matrix_view(monkeypatch):
    """The fast path runs (one 2-D batch_norm on a view of the input's memory); NCHW keeps torch's 4-D path."""
    seen = []
    batch_norm = torch.nn.functional.batch_norm
    monkeypatch.setattr(torch.nn.functional, "batch_norm",
                        lambda inp, *args, **kwargs: seen.append((inp.dim(), inp.data_ptr())) or batch_norm(
                            inp, *args, **kwargs))
    x = torch.randn(4, 5, 6, 7)
    BatchNorm2d(5)(x)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    BatchNorm2d(5)(x_cl)
    assert seen == [(4, x.data_ptr()), (2, x_cl.data_ptr())]
