"""Contract of every architecture inside MultiTaskModule: each balancing path trains it, the updates equal hand
computations, the shared part runs once per step, 16-mixed hands the aggregator unscaled gradients, a run resumes
exactly, and shared, task and head parameters partition the model.

Every architecture file gets an entry in ``FACTORIES`` (a tiny network on the toy problem of ``toy.py``); a new
architecture without one fails :func:`test_every_architecture_has_a_contract_entry`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_mtl import MultiTaskBatch
from lightning_mtl.checkpointing import AtomicCheckpointIO, RNGStates
from lightning_mtl.mtl import MultiTaskModule
from lightning_mtl.mtl.architectures import (
    CGC,
    LTB,
    MTAN,
    PLE,
    Architecture,
    CrossStitch,
    DSelectK,
    HardSharing,
    MMoE,
    SoftSharing,
    list_architectures,
)
from lightning_mtl.mtl.balancing import GradientAggregator

sys.path.insert(0, str(Path(__file__).parent))
from toy import IN_DIM, TASKS, backbone, global_batches  # noqa: E402

LR = 0.1


def mlp(d_in: int = IN_DIM, d_out: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh())


def two_stages() -> nn.Sequential:
    """A backbone of two stages, for the architectures that interleave with stages."""
    return nn.Sequential(mlp(IN_DIM, 8), mlp(8, 8))


def conv_stages() -> nn.Sequential:
    """Two conv stages on (1, 6, 6) images: MTAN attends to (B, C, H, W) feature maps; the second downsamples."""
    return nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh()),
                         nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.Tanh()))


def soft_sharing(tasks: list[str]) -> SoftSharing:
    arch = SoftSharing(tasks, mlp(), weight=0.1)
    with torch.no_grad():  # copies start equal, where the penalty's gradient is zero: move them apart
        for p in arch.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return arch


#: class name -> tasks -> a tiny instance on the toy problem (inputs (B, 6), or (B, 1, 6, 6) for IMAGE_INPUTS)
FACTORIES: dict[str, Callable[[list[str]], Architecture]] = {
    "HardSharing": lambda tasks: HardSharing(tasks, backbone()),
    "SoftSharing": soft_sharing,
    "MTAN": lambda tasks: MTAN(tasks, conv_stages(), in_channels=1, probe_size=6),
    "MMoE": lambda tasks: MMoE(tasks, mlp(), num_experts=3, input_shape=(IN_DIM,)),
    "CGC": lambda tasks: CGC(tasks, mlp(), num_shared_experts=2, num_task_experts=1, input_shape=(IN_DIM,)),
    "PLE": lambda tasks: PLE(tasks, two_stages(), num_shared_experts=1, num_task_experts=1, input_shape=(IN_DIM,)),
    # 3 experts (not a power of 2) and an entropy weight: the penalty is on (static gates: see
    # test_penalty_of_the_forward_pass_on_aggregation_paths for per-example ones)
    "DSelectK": lambda tasks: DSelectK(tasks, mlp(), num_experts=3, k=2, entropy_weight=0.01),
    "CrossStitch": lambda tasks: CrossStitch(tasks, two_stages(), init_self=0.8),
    "LTB": lambda tasks: LTB(tasks, two_stages(), widths=[2], anneal_rate=0.1),
}
IMAGE_INPUTS = {"MTAN"}
#: shared modules that run once per task by design (MTAN's f blocks carry each task's attended map)
PER_TASK_SHARED = {"MTAN": ("blocks.",)}
NAMES = sorted(FACTORIES)


def build(name: str, balancer: str = "equal", architecture: Callable | None = None, **kw) -> MultiTaskModule:
    """The toy model on architecture ``name`` (built by ``FACTORIES[name]``, or by ``architecture``), SGD lr 0.1."""
    torch.manual_seed(0)
    kw.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=LR))
    kw.setdefault("diagnostics_every", 0)
    shape = (1, IN_DIM, IN_DIM) if name in IMAGE_INPUTS else (IN_DIM,)
    return MultiTaskModule(num_classes=dict(TASKS), architecture=architecture or FACTORIES[name], input_shape=shape,
                           balancer=balancer, **kw)


def adapt(name: str, batch: MultiTaskBatch) -> MultiTaskBatch:
    """The toy batch, with each (6,) input turned into a (1, 6, 6) image (its outer product) for conv backbones."""
    if name not in IMAGE_INPUTS:
        return batch
    return MultiTaskBatch(torch.einsum("bi,bj->bij", batch.x, batch.x).unsqueeze(1), batch.targets)


def batches(name: str, steps: int, batch_size: int = 8) -> list[MultiTaskBatch]:
    return [adapt(name, b) for b in global_batches(steps, batch_size)]


def has_shared(name: str) -> bool:
    return bool(build(name).architecture.shared_parameters())


def fit(model: MultiTaskModule, data: list[MultiTaskBatch], plugins: list | None = None) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(data), max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, plugins=plugins)
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=None))
    return trainer


def reseed(module, args) -> None:
    torch.manual_seed(5)  # LTB draws a tree per forward: the same one in the run and in the hand computation


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def task_losses(model: MultiTaskModule, batch: MultiTaskBatch, reps: dict[str, Tensor]) -> list[Tensor]:
    out = []
    for t in model.task_names:
        task = model.tasks[t]
        out.append(task.loss(task.align(task(reps[t]), batch.targets[t]).float(), batch.targets[t]))
    return out


def grads(output: Tensor, params: list[Tensor]) -> list[Tensor]:
    gs = torch.autograd.grad(output, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs, strict=True)]


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def test_every_architecture_has_a_contract_entry():
    missing = sorted(set(list_architectures()) - set(FACTORIES))
    assert not missing, f"add a FACTORIES entry for {missing} in {Path(__file__).name}"
    stale = sorted(set(FACTORIES) - set(list_architectures()))
    assert not stale, f"FACTORIES names {stale}, which are no architectures of lightning_mtl.mtl.architectures"
    for name in NAMES:
        assert type(FACTORIES[name](list(TASKS))) is list_architectures()[name]


@pytest.mark.parametrize("name", NAMES)
def test_parameters_partition_and_task_parameters_belong_to_their_task(name):
    model = build(name)
    arch = model.architecture
    shared = [id(p) for p in arch.shared_parameters()]
    own = arch.task_parameters()
    assert set(own) <= set(TASKS), f"task_parameters() names unknown tasks {sorted(set(own) - set(TASKS))}"
    task = [id(p) for ps in own.values() for p in ps]
    heads = [id(p) for p in model.tasks.parameters()]
    listed = shared + task + heads
    assert len(listed) == len(set(listed)), "a parameter is listed twice (shared, a task's, a head's)"
    assert set(listed) == {id(p) for p in model.parameters() if p.requires_grad}
    # a task's own parameter must not move another task's loss: aggregation would never see that conflict
    batch = batches(name, 1)[0]
    losses = task_losses(model, batch, model.representations(batch.x))
    for t, params in own.items():
        for s, loss in zip(model.task_names, losses, strict=True):
            if s != t and params:
                assert all(g.abs().max() == 0 for g in grads(loss, params)), f"{t}'s parameters move {s}'s loss"


def _counters(model: MultiTaskModule) -> dict[str, list[int]]:
    """Forward-call counters on every leaf module that holds shared parameters."""
    shared = {id(p) for p in model.architecture.shared_parameters()}
    counts = {}
    for qual, module in model.architecture.named_modules():
        own = list(module.parameters(recurse=False))
        if next(module.children(), None) is None and any(id(p) in shared for p in own):
            counts[qual] = [0]
            module.register_forward_hook(lambda *_, c=counts[qual]: c.__setitem__(0, c[0] + 1))
    return counts


@pytest.mark.parametrize("name", NAMES)
def test_every_path_trains_and_runs_the_shared_part_once_per_step(name):
    steps = 2
    for balancer, level in [("equal", "parameter"), ("pcgrad", "parameter"), ("mgda", "representation")]:
        if balancer != "equal" and not has_shared(name):
            with pytest.raises(ValueError, match="has none; use a loss weighting"):
                build(name, balancer, level=level)
            continue
        model = build(name, balancer, level=level, diagnostics_every=1)  # diagnostics must not re-run the forward
        counts = _counters(model)
        assert bool(counts) == bool(model.architecture.shared_parameters())
        arch = model.architecture
        groups = {"shared": arch.shared_parameters(), **{f"task {t}": ps for t, ps in arch.task_parameters().items()},
                  **{f"head {t}": list(model.tasks[t].parameters()) for t in TASKS}}
        before = {k: flat(ps).detach().clone() for k, ps in groups.items() if ps}
        fit(model, batches(name, steps))
        for k, old in before.items():
            new = flat(groups[k]).detach()
            assert torch.isfinite(new).all(), f"{balancer}: non-finite {k} parameters"
            assert not torch.equal(new, old), f"{balancer}/{level}: {k} parameters did not move"
        for qual, (n,) in counts.items():
            per_step = len(TASKS) if qual.startswith(PER_TASK_SHARED.get(name, ())) else 1
            assert n == steps * per_step, f"{balancer}/{level}: {qual} ran {n} times in {steps} steps"


def check_hand_update(name: str, balancer: str, level: str = "parameter", architecture: Callable | None = None):
    """One SGD step equals the hand computation: shared parameters move by -lr * mean_k g_k (``"mean"``, each g_k
    from its own autograd.grad; the mean is linear, so at either level) or -lr * sum_k g_k (``"equal"``), the others
    by -lr * grad(sum_k L_k), all plus the gradient of the architecture's penalty."""
    batch = batches(name, 1)[0]
    reference = build(name, balancer, architecture, level=level)
    reference.architecture.register_forward_pre_hook(reseed)
    shared = {id(p) for p in reference.architecture.shared_parameters()}
    names, params = zip(*[(n, p) for n, p in reference.named_parameters() if p.requires_grad], strict=True)
    losses = task_losses(reference, batch, reference.representations(batch.x))
    penalty = reference.architecture.penalty()
    per_task = [grads(loss, list(params)) for loss in losses]  # K independent backward passes
    extra = grads(penalty, list(params)) if penalty is not None else [torch.zeros_like(p) for p in params]
    assert penalty is None or any(e.abs().max() > 0 for e in extra), "a penalty without gradient tests nothing"
    expected = {}
    for i, (n, p) in enumerate(zip(names, params, strict=True)):
        g = torch.stack([row[i] for row in per_task])
        g = g.mean(0) if id(p) in shared and balancer == "mean" else g.sum(0)
        expected[n] = p.detach() - LR * (g + extra[i])

    model = build(name, balancer, architecture, level=level)
    model.architecture.register_forward_pre_hook(reseed)
    fit(model, [batch])
    got = dict(model.named_parameters())
    for n in names:
        torch.testing.assert_close(got[n], expected[n], atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_update_equals_hand_computation(name):
    """Mean aggregation at parameter level; equal weighting where nothing is shared (SoftSharing)."""
    check_hand_update(name, "mean" if has_shared(name) else "equal")


@pytest.mark.parametrize("balancer,level", [("equal", "parameter"), ("mean", "parameter"), ("mean", "representation")])
def test_penalty_of_the_forward_pass_on_aggregation_paths(balancer, level):
    """DSelect-k with per-example gates: its penalty reads the selectors of the training forward pass, so the
    penalty's graph is part of the losses' graph; every path must still add the penalty's gradient, which needs
    that graph kept until the penalty has been back-propagated."""
    check_hand_update("DSelectK", balancer, level, lambda tasks: DSelectK(
        tasks, mlp(), num_experts=3, k=2, per_example=True, entropy_weight=0.01, input_shape=(IN_DIM,)))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "SoftSharing"])
def test_mean_aggregation_equal_at_both_levels(name):
    """The mean is linear, so aggregating task gradients on the representations then back-propagating once equals
    aggregating them on the parameters: also with block rows (per-task representations) and task parameters."""
    data = batches(name, 3)
    models = {}
    for level in ("parameter", "representation"):
        models[level] = build(name, "mean", level=level)
        models[level].architecture.register_forward_pre_hook(reseed)
        fit(models[level], data)
    a, b = snapshot(models["parameter"]), snapshot(models["representation"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


class Recorder(GradientAggregator):
    """Mean aggregator that keeps the matrices it was given."""

    def __init__(self, tasks: list[str]) -> None:
        super().__init__(tasks)
        self.seen: list[Tensor] = []

    def forward(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        self.seen.append(matrix.detach().clone())
        return matrix.mean(0)


def hand_matrix(model: MultiTaskModule, batch: MultiTaskBatch, level: str) -> Tensor:
    """The (K, D) task gradients, float32: on the shared parameters, or on the distinct representation tensors (in
    the order the model gathers them)."""
    reps = model.representations(batch.x)
    if level == "parameter":
        wrt = model.architecture.shared_parameters()
    else:
        leaf_of = {id(z): z.detach().requires_grad_() for z in reps.values()}
        wrt, reps = list(leaf_of.values()), {t: leaf_of[id(z)] for t, z in reps.items()}
    return torch.stack([flat(grads(loss, wrt)) for loss in task_losses(model, batch, reps)])


@pytest.mark.parametrize("level", ["parameter", "representation"])
@pytest.mark.parametrize("name", [n for n in NAMES if n != "SoftSharing"])
def test_16_mixed_aggregator_sees_unscaled_gradients(name, level):
    batch = batches(name, 1, batch_size=16)[0]
    reference = build(name, "mean", level=level)
    reference.architecture.register_forward_pre_hook(reseed)
    expected = hand_matrix(reference, batch, level)
    model = build(name, "mean", level=level)
    model.architecture.register_forward_pre_hook(reseed)
    model.balancer = Recorder(list(TASKS))
    scaler = torch.amp.GradScaler("cpu")
    trainer = fit(model, [batch], plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert trainer.precision_plugin.scaler.get_scale() > 1
    (seen,) = model.balancer.seen
    ratio = (seen.norm() / expected.norm()).item()
    assert abs(ratio - 1) < 0.05, f"the aggregator saw gradients scaled by {ratio}"
    torch.testing.assert_close(seen, expected, atol=5e-3, rtol=5e-2)


class SkippingLoader(DataLoader):
    """The batches of one epoch, whose first iteration skips the first ``skip`` (as ``datamodules/multitask.py``
    does): Lightning counts a resumed epoch's batches from the checkpoint's position within the full epoch."""

    def __init__(self, data: list[MultiTaskBatch], skip: int) -> None:
        super().__init__(data, batch_size=None)
        self.skip = skip

    def __iter__(self):
        it, skip, self.skip = super().__iter__(), self.skip, 0
        for _ in range(skip):
            next(it)
        return it


class StepData(L.LightningDataModule):
    """One epoch of ``data``; a fit resumed from a checkpoint continues at the checkpoint's step."""

    def __init__(self, data: list[MultiTaskBatch]) -> None:
        super().__init__()
        self.data = data

    def train_dataloader(self) -> DataLoader:
        return SkippingLoader(self.data, skip=self.trainer.global_step)  # the restored step, in a resumed fit


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_exact(name, tmp_path, monkeypatch):
    """Fit N + M steps, or N steps, a checkpoint, and M more from it in a new model and trainer, seeded and with
    RNGStates as the recipes do: identical states (also for LTB's Gumbel draws and PCGrad's random order)."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # seed_everything sets it: restored after the test
    balancer = "pcgrad" if has_shared(name) else "uncertainty"
    data = batches(name, 4)

    def run(steps: int, ckpt: Path | None = None) -> tuple[MultiTaskModule, L.Trainer]:
        L.seed_everything(0)
        model = build(name, balancer, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=[RNGStates()], plugins=[AtomicCheckpointIO()],
                            default_root_dir=tmp_path)
        with warnings.catch_warnings():
            # SkippingLoader resumes the epoch where the checkpoint left it, which Lightning cannot tell
            warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")
            trainer.fit(model, datamodule=StepData(data), ckpt_path=ckpt)
        return model, trainer

    full, _ = run(4)
    _, first = run(2)
    first.save_checkpoint(tmp_path / "step2.ckpt")
    resumed, trainer = run(4, tmp_path / "step2.ckpt")
    assert trainer.global_step == 4
    a, b = snapshot(full), snapshot(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming (max {(a[k] - b[k]).abs().max()})"
