"""MTAN: attention masks in [0, 1], one shared pass, masks of one give the shared network, parameter ownership."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mtl.mtl.architectures.mtan import MTAN
from lightning_mtl.nn.conv4 import Conv4
from lightning_mtl.nn.resnet12 import ResNet12
from lightning_mtl.nn.segnet import SegNet

TASKS = ["seg", "depth", "normal"]


def segnet() -> tuple[nn.Module, torch.Tensor]:
    return SegNet(widths=(8, 8, 16, 16, 16)), torch.randn(2, 3, 32, 32)


def resnet12() -> tuple[nn.Module, torch.Tensor]:
    return ResNet12(drop_rate=0.0), torch.randn(2, 3, 32, 32)


def conv4() -> tuple[nn.Module, torch.Tensor]:
    return Conv4(in_channels=1), torch.randn(2, 1, 28, 28)


def shared_path(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's own forward, unflattened."""
    if isinstance(backbone, SegNet):
        return backbone(x)
    return (backbone.blocks if isinstance(backbone, ResNet12) else backbone.features)(x)


@pytest.mark.parametrize(("make", "shape"), [(segnet, (8, 32, 32)), (resnet12, (640, 2, 2)), (conv4, (64, 1, 1))])
def test_masks_of_one_give_the_shared_networks_output(make, shape):
    torch.manual_seed(0)
    backbone, x = make()
    model = MTAN(TASKS[:2], backbone)
    with torch.no_grad():
        for module in model.attention[0]:
            module[-2].weight.zero_()  # the last BatchNorm outputs its bias, whatever its input: sigmoid(100) == 1
            module[-2].bias.fill_(100.0)
        reps, masks = model.attend(x, TASKS[:2])
        expected = shared_path(backbone, x)
    assert all(torch.equal(m, torch.ones_like(m)) for m in masks["seg"])
    assert reps["seg"].shape == reps["depth"].shape == (2, *shape)
    torch.testing.assert_close(reps["seg"], expected, rtol=0, atol=0)
    assert not torch.allclose(reps["depth"], expected)  # the other task's masks do attend


def test_masks_lie_in_unit_interval_and_follow_every_stages_size_down_and_up():
    torch.manual_seed(0)
    backbone, x = segnet()
    model = MTAN(TASKS, backbone)
    sizes = []
    for stage in backbone.stages():  # the masks must match each stage's map, also the decoder's upsampling ones
        stage.register_forward_hook(lambda m, args, out: sizes.append(tuple(out[0].shape)))
    reps, masks = model.attend(x, TASKS)
    assert [s[-1] for s in sizes] == [32, 16, 8, 4, 2, 2, 4, 8, 16, 32]
    for t in TASKS:
        assert [tuple(m.shape) for m in masks[t]] == sizes
        for m in masks[t]:
            assert m.min() >= 0 and m.max() <= 1 and m.std() > 0
    # represent() is attend()'s first item and the representation is the last mask times the last shared map
    model.eval()
    with torch.no_grad():
        reps, masks = model.attend(x, TASKS)
        assert torch.equal(model.represent(x, ["depth"])["depth"], reps["depth"])
        assert torch.equal(reps["normal"], masks["normal"][-1] * backbone(x))


@pytest.mark.parametrize("make", [segnet, conv4])
def test_shared_network_runs_once_for_all_tasks(make):
    torch.manual_seed(0)
    backbone, x = make()
    model = MTAN(TASKS, backbone)
    calls: dict[str, int] = {}

    def count(name: str) -> None:
        calls[name] = calls.get(name, 0) + 1

    # every layer of the shared network (Conv4.stages() slices anew on each call: hook the layers themselves)
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    for k, conv in enumerate(convs):
        conv.register_forward_hook(lambda *_, k=k: count(f"conv{k}"))
    for i, modules in enumerate(model.attention):
        for j, module in enumerate(modules):
            module.register_forward_hook(lambda *_, i=i, j=j: count(f"att{i}.{j}"))
    reps = model(x)
    n = len(backbone.stages())
    assert set(reps) == set(TASKS)
    assert calls == {**{f"conv{k}": 1 for k in range(len(convs))},
                     **{f"att{i}.{j}": 1 for i in range(3) for j in range(n)}}
    calls.clear()
    model.represent(x, ["depth"])  # a subset: the other tasks' attention is not computed
    assert calls == {**{f"conv{k}": 1 for k in range(len(convs))}, **{f"att1.{j}": 1 for j in range(n)}}


@pytest.mark.parametrize("make", [segnet, conv4])
def test_parameters_partition_and_each_task_owns_its_attention(make):
    torch.manual_seed(0)
    backbone, x = make()
    model = MTAN(TASKS, backbone)
    own = model.task_parameters()
    shared = model.shared_parameters()
    ids = [id(p) for ps in own.values() for p in ps] + [id(p) for p in shared]
    assert len(ids) == len(set(ids))  # disjoint
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in backbone.parameters()} <= {id(p) for p in shared}
    for i, t in enumerate(TASKS):
        assert {id(p) for p in own[t]} == {id(p) for p in model.attention[i].parameters()}

    reps = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    for t in TASKS:
        loss = (reps[t] * torch.randn_like(reps[t])).sum()
        got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads = dict(zip(map(id, params), got, strict=True))
        for s in TASKS:
            got = [grads[id(p)] for p in own[s]]
            if s == t:
                assert all(g is not None for g in got) and sum(g.abs().sum() for g in got) > 0
            else:
                assert all(g is None or not g.any() for g in got)
        assert all(grads[id(p)] is not None for p in shared)  # every shared parameter gets gradient from every task
        conv_weights = [m.weight for m in backbone.modules() if isinstance(m, nn.Conv2d)]
        assert all(grads[id(w)].abs().sum() > 0 for w in conv_weights)


def test_probe_leaves_the_backbone_as_it_was_and_reduction_sizes_the_attention():
    torch.manual_seed(0)
    backbone = ResNet12(channels=(8, 8, 16, 16))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = MTAN(["a", "b"], backbone, reduction=4)
    assert backbone.training
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())  # no BN statistics moved
    assert [m[0].in_channels for m in model.attention[1]] == [8, 16, 32, 32]  # first stage: its map alone
    assert [m[0].out_channels for m in model.attention[1]] == [2, 2, 4, 4]  # hidden C // 4
    assert [b[0].out_channels for b in model.blocks] == [8, 16, 16]  # f: to the next stage's width


def test_per_task_inputs_match_single_task_calls():
    torch.manual_seed(0)
    backbone, _ = conv4()
    model = MTAN(["a", "b"], backbone).eval()
    xs = {"a": torch.randn(2, 1, 28, 28), "b": torch.randn(3, 1, 28, 28)}
    with torch.no_grad():
        reps = model(xs)
        assert torch.equal(reps["b"], model.represent(xs["b"], ["a", "b"])["b"])
        assert reps["a"].shape == (2, 64, 1, 1) and reps["b"].shape == (3, 64, 1, 1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="reduction >= 1"):
        MTAN(["a"], Conv4(), reduction=0)
    with pytest.raises(ValueError, match="give in_channels"):
        MTAN(["a"], nn.Sequential(nn.Flatten(), nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) feature maps"):
        MTAN(["a"], nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), probe_size=8)
    with pytest.raises(TypeError, match="cannot be split into stages"):
        MTAN(["a"], nn.Conv2d(1, 2, 3))
