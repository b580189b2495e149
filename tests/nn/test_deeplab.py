"""DeepLab's dilated ResNet-50 and ASPP head: output stride, dilations, stages, weight files, and use in multi-task
architectures with dense tasks."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.segmentation.deeplabv3 import DeepLabHead as TorchvisionDeepLabHead

from lightning_mtl.mtl import MultiTaskModule
from lightning_mtl.mtl.architectures import MTAN, CrossStitch, HardSharing, split_stages
from lightning_mtl.mtl.tasks import DepthTask, SegmentationTask
from lightning_mtl.nn.deeplab import ASPP, DeepLabHead, DeepLabResNet50


@pytest.fixture(scope="module")
def encoder() -> DeepLabResNet50:
    torch.manual_seed(0)
    return DeepLabResNet50().eval()


def test_output_stride_8_and_2048_channels(encoder):
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 8, 8)
        assert encoder(torch.randn(1, 3, 65, 70)).shape == (1, 2048, 9, 9)  # ceil(H / 8): every stride rounds up
        assert DeepLabResNet50(output_stride=16).eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 4, 4)
        assert DeepLabResNet50(in_channels=1).eval()(torch.randn(1, 1, 32, 32)).shape == (1, 2048, 4, 4)
    assert DeepLabResNet50.num_features == 2048
    # a ResNet-50 without its classifier: torchvision's 25,557,032 parameters less fc's 2048 * 1000 + 1000
    assert sum(p.numel() for p in encoder.parameters()) == 25_557_032 - 2_049_000


def _reference_dilation(net: nn.Module) -> nn.Module:
    """The reference codes' ``_nostride_dilate`` at output stride 8, written out: in layer3 (dilate 2) and layer4
    (dilate 4) a strided convolution loses its stride and a 3x3 one gets half the dilation; other 3x3 convolutions
    get the full dilation."""
    for layer, dilate in ((net.layer3, 2), (net.layer4, 4)):
        for m in layer.modules():
            if isinstance(m, nn.Conv2d):
                d = dilate // 2 if m.stride == (2, 2) else dilate
                m.stride = (1, 1)
                if m.kernel_size == (3, 3):
                    m.dilation, m.padding = (d, d), (d, d)
    return net


def test_layer3_and_layer4_trade_stride_for_dilation_as_the_reference_codes(encoder):
    reference = _reference_dilation(resnet50(weights=None))
    ours = dict(encoder.named_modules())
    convs = [(n, m) for n, m in reference.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53
    for name, ref in convs:
        mine = ours[name]
        assert (mine.stride, mine.dilation, mine.padding) == (ref.stride, ref.dilation, ref.padding), name
    # spelled out: dilation in layer3 and layer4 only, none of their convolutions strided
    dilations = {name: [b.conv2.dilation[0] for b in getattr(encoder, name)] for name in ("layer3", "layer4")}
    assert dilations == {"layer3": [1, 2, 2, 2, 2, 2], "layer4": [2, 4, 4]}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        strides = {m.stride for m in getattr(encoder, name).modules() if isinstance(m, nn.Conv2d)}
        assert strides == ({(1, 1), (2, 2)} if name == "layer2" else {(1, 1)}), name
        if name in ("layer1", "layer2"):
            assert {m.dilation for m in getattr(encoder, name).modules() if isinstance(m, nn.Conv2d)} == {(1, 1)}


def test_stages_compose_to_forward_and_share_the_parameters(encoder):
    x = torch.randn(1, 3, 64, 64)
    stages = split_stages(encoder)
    assert [type(s).__name__ for s in stages] == ["Sequential"] * 5
    shapes, state = [], x
    with torch.no_grad():
        for stage in stages:
            state = stage(state)
            shapes.append(tuple(state.shape[1:]))
        assert torch.equal(state, encoder(x))
    assert shapes == [(64, 16, 16), (256, 16, 16), (512, 8, 8), (1024, 8, 8), (2048, 8, 8)]
    assert stages[0].conv1 is encoder.conv1 and stages[4] is encoder.layer4
    assert {id(p) for s in stages for p in s.parameters()} == {id(p) for p in encoder.parameters()}
    assert [k for k in encoder.state_dict() if k.startswith("stem")] == []  # torchvision's names only


def test_cross_stitch_splits_it_into_columns(encoder):
    model = CrossStitch(["a", "b"], encoder).eval()
    assert len(model.columns[0]) == 5 and len(model.units) == 4
    with torch.no_grad():
        reps = model(torch.randn(1, 3, 32, 32))
    assert {t: tuple(z.shape) for t, z in reps.items()} == {"a": (1, 2048, 4, 4), "b": (1, 2048, 4, 4)}


def test_weights_file_round_trip(tmp_path):
    torch.manual_seed(1)
    source = DeepLabResNet50().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that buffers are checked too
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "deeplab.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    loaded = DeepLabResNet50(weights=path).eval()
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))

    # a torchvision ResNet-50 file (classifier included, no dilation: the same keys and shapes) loads, fc ignored
    torch.manual_seed(3)
    plain = resnet50(weights=None)
    torch.save(plain.state_dict(), tmp_path / "resnet50.pth")
    loaded.load_weights(tmp_path / "resnet50.pth")
    assert torch.equal(loaded.layer4[2].conv3.weight, plain.layer4[2].conv3.weight)
    assert torch.equal(loaded.bn1.running_var, plain.bn1.running_var)


def test_mismatched_weights_files_fail_naming_the_keys(tmp_path, encoder):
    state = encoder.state_dict()
    files = {
        "prefixed": {f"module.{k}": v for k, v in state.items()},
        "partial": {k: v for k, v in state.items() if not k.startswith("layer4.")},
        "not_a_dict": [torch.zeros(1)],
        "full": state,
    }
    for name, content in files.items():
        torch.save(content, tmp_path / f"{name}.pth")
    n = len(state)
    with pytest.raises(ValueError, match=rf"{n} missing keys \(bn1.bias; .*{n} unexpected keys \(module.bn1.bias"):
        DeepLabResNet50(weights=tmp_path / "prefixed.pth")
    with pytest.raises(ValueError, match=r"\d+ missing keys \(layer4.0.bn1.bias;") as info:
        DeepLabResNet50(weights=tmp_path / "partial.pth")
    assert "unexpected" not in str(info.value)
    with pytest.raises(ValueError, match=r"1 shape mismatches \(conv1.weight: file \(64, 3, 7, 7\), model "
                                         r"\(64, 1, 7, 7\)\)"):
        DeepLabResNet50(weights=tmp_path / "full.pth", in_channels=1)
    with pytest.raises(ValueError, match="not a state dict"):
        DeepLabResNet50(weights=tmp_path / "not_a_dict.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DeepLabResNet50(weights=tmp_path / "absent.pth")


def test_mismatched_shape_alone_is_named(tmp_path, encoder):
    state = dict(encoder.state_dict())
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"1 shape mismatches \(conv1.weight: file \(64, 3, 3, 3\), model "
                                         r"\(64, 3, 7, 7\)\)") as info:
        DeepLabResNet50(weights=tmp_path / "bad.pth")
    assert "missing" not in str(info.value) and "unexpected" not in str(info.value)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="output_stride must be one of"):
        DeepLabResNet50(output_stride=4)
    with pytest.raises(ValueError, match="in_channels >= 1"):
        DeepLabResNet50(in_channels=0)
    with pytest.raises(ValueError, match="at least one ASPP dilation rate"):
        DeepLabHead(8, 2, rates=())
    with pytest.raises(ValueError, match="dropout must be in"):
        DeepLabHead(8, 2, dropout=1.0)
    with pytest.raises(ValueError, match=">= 1"):
        DeepLabHead(8, 0)


def test_head_is_torchvisions_deeplabv3_head():
    torch.manual_seed(0)
    reference = TorchvisionDeepLabHead(64, 5, [2, 3, 4]).eval()
    ours = DeepLabHead(64, 5, rates=(2, 3, 4)).eval()
    assert list(ours.state_dict()) == list(reference.state_dict())  # torchvision's names, in its order
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 64, 7, 9)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))  # same resolution out: no upsampling in the head
    assert ours(x).shape == (2, 5, 7, 9)
    aspp = ASPP(64, rates=(1, 2), channels=8)
    assert len(aspp.convs) == 4 and aspp(x).shape == (2, 8, 7, 9)  # 1x1, two 3x3, image pooling


def _targets(batch: int, size: int, classes: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, classes, (batch, size, size), generator=g)  # -1: unlabelled pixels
    depth = torch.rand(batch, 1, size, size, generator=g) * (torch.rand(batch, 1, size, size, generator=g) > 0.1)
    return {"seg": labels, "depth": depth}


@pytest.mark.parametrize("architecture", ["HardSharing", "MTAN"])
def test_forward_backward_with_dense_tasks(architecture):
    torch.manual_seed(0)
    backbone = DeepLabResNet50()
    if architecture == "HardSharing":
        factory = partial(HardSharing, backbone=backbone)
        seg = SegmentationTask(4, head=partial(DeepLabHead, channels=16))  # an ASPP decoder per task
    else:  # the authors' ResNet MTAN uses a reduction of 4
        factory, seg = partial(MTAN, backbone=backbone, reduction=4, probe_size=32), SegmentationTask(4)
    model = MultiTaskModule(tasks={"seg": seg, "depth": DepthTask()}, architecture=factory,
                            input_shape=(3, 32, 32)).train()
    assert model._shapes == {"seg": (2048, 4, 4), "depth": (2048, 4, 4)}
    x, targets = torch.randn(2, 3, 32, 32), _targets(2, 32, 4)
    outputs = model(x)
    losses = {t: model.tasks[t].loss(model.tasks[t].align(out, targets[t]), targets[t]) for t, out in outputs.items()}
    assert outputs["seg"].shape == (2, 4, 4, 4) and outputs["depth"].shape == (2, 1, 4, 4)  # stride 8, then align
    sum(losses.values()).backward()
    arch = model.architecture
    for name, p in [("conv1", backbone.conv1.weight), ("layer4", backbone.layer4[-1].conv3.weight)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert {id(p) for p in backbone.parameters()} <= {id(p) for p in arch.shared_parameters()}
    for t in ("seg", "depth"):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.tasks[t].parameters())
        for p in arch.task_parameters().get(t, []):  # MTAN's attention: each task's own, reached by its loss
            assert p.grad is not None and torch.isfinite(p.grad).all()
    if architecture == "HardSharing":
        assert isinstance(model.tasks["seg"].head, DeepLabHead)
    else:
        assert len(arch.attention[0]) == 5 and sum(p.grad.abs().sum() for p in arch.task_parameters()["seg"]) > 0


def test_a_dense_tasks_head_is_chosen_by_class_path_in_yaml():
    """``head`` of a dense task takes DeepLab's ASPP decoder from a config, its ``init_args`` bound."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--task", type=SegmentationTask)
    cfg = parser.parse_object({"task": {"class_path": "lightning_mtl.mtl.tasks.SegmentationTask", "init_args": {
        "num_classes": 13, "head": {"class_path": "lightning_mtl.nn.DeepLabHead", "init_args": {"channels": 8}}}}})
    task = parser.instantiate_classes(cfg).task
    task.build((64, 5, 5))
    assert isinstance(task.head, DeepLabHead) and task(torch.randn(2, 64, 5, 5)).shape == (2, 13, 5, 5)
