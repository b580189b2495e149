"""MultiTaskModule: update rules against hand computations, DDP equivalence, mixed precision, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from lightning_mtl import MultiTaskBatch
from lightning_mtl.callbacks import NonFiniteGuard
from lightning_mtl.mtl import ClassificationTask, MultiTaskModule, SoftSharing
from lightning_mtl.mtl.balancing import GradientAggregator, create_balancer

sys.path.insert(0, str(Path(__file__).parent))
from toy import TASKS, backbone, global_batches, make_model  # noqa: E402

WORKER = Path(__file__).parent / "ddp_worker.py"


def fp16_plugin() -> MixedPrecision:
    """16-bit AMP with a GradScaler on CPU: Lightning swaps "16-mixed" for bf16 on CPU unless given explicitly."""
    return MixedPrecision(precision="16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))


def trainer_for(steps: int, precision: str = "32", **kw) -> L.Trainer:
    amp = {"plugins": [fp16_plugin()]} if precision == "16-mixed" else {"precision": precision}
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, **amp, **kw)


def fit(model: MultiTaskModule, batches: list[MultiTaskBatch], precision: str = "32") -> L.Trainer:
    trainer = trainer_for(len(batches), precision)
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    return trainer


def reseed(module, args) -> None:
    torch.manual_seed(5)


def manual_grads(model: MultiTaskModule, batch: MultiTaskBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-task gradient matrix on the shared parameters, and the head gradients of the summed loss."""
    shared = model.architecture.shared_parameters()
    heads = list(model.tasks.parameters())
    outputs = model.task_outputs(batch.x)
    losses = [model.tasks[t].loss(outputs[t], batch.targets[t]) for t in TASKS]
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses]
    head_grads = torch.autograd.grad(sum(losses), heads)
    return torch.stack(rows), list(head_grads)


def params_vector(model) -> torch.Tensor:
    """The architecture's parameters, then the tasks' (heads)."""
    params = [*model.architecture.parameters(), *model.tasks.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in params])


@pytest.mark.parametrize("balancer,level", [("mean", "parameter"), ("mean", "representation"), ("pcgrad", "parameter"),
                                            ("mgda", "parameter"), ("upgrad", "representation")])
def test_aggregated_update_matches_hand_computation(balancer, level):
    batch = global_batches(1)[0]
    reference = make_model(balancer, level=level)
    matrix, head_grads = manual_grads(reference, batch)
    aggregator = create_balancer(balancer, list(TASKS))
    aggregator.register_forward_pre_hook(reseed)  # PCGrad's projection order is random
    if level == "parameter":
        shared_update = aggregator(matrix)
    else:  # aggregate gradients w.r.t. the representation, then back-propagate once
        z = reference.architecture(batch.x)["a"]
        leaf = z.detach().requires_grad_()
        rows = [torch.autograd.grad(reference.tasks[t].loss(reference.tasks[t](leaf), batch.targets[t]), leaf)[0]
                .reshape(-1) for t in TASKS]
        direction = aggregator(torch.stack(rows)).view_as(z)
        shared_update = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            z, reference.architecture.shared_parameters(), grad_outputs=direction)])
    before = params_vector(reference)
    expected = before.clone()
    n_shared = shared_update.numel()
    expected[:n_shared] -= 0.1 * shared_update  # SGD lr 0.1; backbone parameters come first in model.parameters()
    expected[n_shared:] -= 0.1 * torch.cat([g.reshape(-1) for g in head_grads])

    model = make_model(balancer, level=level)
    model.balancer.register_forward_pre_hook(reseed)
    fit(model, [batch])
    torch.testing.assert_close(params_vector(model), expected, atol=1e-6, rtol=1e-5)


def test_mean_aggregation_equal_at_both_levels_and_to_mean_weighting():
    batches = global_batches(3)
    a = make_model("mean", level="parameter")
    b = make_model("mean", level="representation")
    fit(a, batches)
    fit(b, batches)
    torch.testing.assert_close(params_vector(a), params_vector(b), atol=1e-6, rtol=1e-5)


def test_equal_weighting_is_sum_of_task_gradients():
    batch = global_batches(1)[0]
    reference = make_model("equal")
    matrix, head_grads = manual_grads(reference, batch)
    expected = params_vector(reference).clone()
    n = matrix.shape[1]
    expected[:n] -= 0.1 * matrix.sum(0)
    expected[n:] -= 0.1 * torch.cat([g.reshape(-1) for g in head_grads])
    model = make_model("equal")
    fit(model, [batch])
    torch.testing.assert_close(params_vector(model), expected, atol=1e-6, rtol=1e-5)


DDP_CASES = [("pcgrad", "parameter"), ("mgda", "parameter"), ("upgrad", "parameter"), ("uncertainty", "parameter"),
             ("mgda", "representation")]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[int, dict]:
    """Every case, trained in one single-process run and one 2-process run (launching is most of the cost)."""
    tmp = tmp_path_factory.mktemp("ddp")
    # PL_GLOBAL_SEED (left by any earlier seed_everything) would make Lightning reseed the ranks differently from the
    # single process
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PL_")}, "PYTHONUNBUFFERED": "1"}
    outs = {}
    for devices in (1, 2):
        out = tmp / f"{devices}.pt"
        proc = subprocess.run([sys.executable, str(WORKER), ",".join(f"{b}:{lv}" for b, lv in DDP_CASES),
                               str(devices), str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs[devices] = torch.load(out, weights_only=True)
    return outs


@pytest.mark.parametrize("balancer,level", DDP_CASES)
def test_ddp_two_processes_equal_single_process(balancer, level, ddp_runs):
    one, two = ddp_runs[1][f"{balancer}:{level}"], ddp_runs[2][f"{balancer}:{level}"]
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0, msg=f"{balancer}: {key} differs")
    initial = make_model(balancer).state_dict()
    moved = any(not torch.allclose(initial[k], one[k]) for k in initial if k in one)
    assert moved, "training did not change the parameters"


class Recorder(GradientAggregator):
    """Mean aggregator that keeps the matrices it was given."""

    def __init__(self, tasks):
        super().__init__(tasks)
        self.seen = []

    def forward(self, matrix, losses=None):
        self.seen.append(matrix.detach().clone())
        return matrix.mean(0)


def test_16_mixed_removes_loss_scale_before_aggregation():
    batch = global_batches(1, batch_size=16)[0]
    reference = make_model("mean")
    matrix, _ = manual_grads(reference, batch)
    model = make_model("mean")
    model.balancer = Recorder(list(TASKS))
    trainer = fit(model, [batch], precision="16-mixed")
    assert trainer.precision_plugin.scaler is not None and trainer.precision_plugin.scaler.get_scale() > 1
    seen = model.balancer.seen[0]
    ratio = (seen.norm() / matrix.norm()).item()
    assert abs(ratio - 1) < 0.05, f"aggregator saw gradients scaled by {ratio}"
    torch.testing.assert_close(seen, matrix, atol=5e-3, rtol=5e-2)


def test_16_mixed_overflow_skips_step_and_backs_off():
    batch = global_batches(1)[0]
    model = make_model("pcgrad")
    before = params_vector(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1e30)  # far beyond float16: every scaled gradient overflows
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        plugins=[MixedPrecision(precision="16-mixed", device="cpu", scaler=scaler)])
    trainer.fit(model, train_dataloaders=DataLoader([batch], batch_size=None))
    torch.testing.assert_close(params_vector(model), before)
    assert scaler.get_scale() == pytest.approx(1e30 * scaler.get_backoff_factor(), rel=1e-6)


def test_bf16_mixed_trains():
    model = make_model("upgrad", level="representation")
    before = params_vector(model)
    fit(model, global_batches(3), precision="bf16-mixed")
    after = params_vector(model)
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_nonfinite_policy_skip_warns_raise_stops_off_applies():
    bad = global_batches(1)[0]
    bad = MultiTaskBatch(bad.x.clone(), bad.targets)
    bad.x[0, 0] = float("nan")
    model = make_model("equal")
    before = params_vector(model)
    with pytest.warns(UserWarning, match=r"non-finite loss for task\(s\) \['a', 'b', 'c'\].*step skipped"):
        fit(model, [bad])
    torch.testing.assert_close(params_vector(model), before)
    with pytest.raises(FloatingPointError, match="stopping \\(nonfinite.mode='raise'\\)"):
        trainer_for(1, callbacks=[NonFiniteGuard("raise")]).fit(make_model("equal"), DataLoader([bad], batch_size=None))
    model = make_model("equal")  # off: the update is applied as it is (no protection, no check)
    trainer_for(1, callbacks=[NonFiniteGuard("off")]).fit(model, DataLoader([bad], batch_size=None))
    assert not torch.isfinite(params_vector(model)).all()


def test_bad_batches_are_named():
    good = global_batches(1)[0]
    wrong_tasks = MultiTaskBatch(good.x, {"a": good.targets["a"], "zz": good.targets["b"], "c": good.targets["c"]})
    with pytest.raises(ValueError, match=r"batch tasks \['a', 'c', 'zz'\] do not match the model's tasks"):
        fit(make_model(), [wrong_tasks])
    out_of_range = MultiTaskBatch(good.x, {**good.targets, "b": torch.full((8,), 4)})
    with pytest.raises(ValueError, match=r"task 'b': target 4 is out of the head's range 0..3"):
        fit(make_model(), [out_of_range])


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="unknown balancing method 'pcgard'; valid names: .*pcgrad"):
        make_model("pcgard")
    with pytest.raises(ValueError, match="SoftSharing has none; use a loss weighting"):
        make_model("pcgrad", architecture=lambda tasks: SoftSharing(tasks, backbone()))
    with pytest.raises(ValueError, match="level must be one of"):
        make_model("mgda", level="features")
    with pytest.raises(ValueError, match=r"jacobian must be one of \('auto', 'loop', 'vmap'\), got 'jvp'"):
        make_model("mgda", jacobian="jvp")


@pytest.mark.parametrize("method", ["pcgrad", "upgrad"])
def test_vmapped_jacobian_trains_like_the_loop(method):
    batches = global_batches(4)
    loop, vmap = make_model(method, jacobian="loop"), make_model(method, jacobian="vmap")
    torch.manual_seed(1)  # PCGrad projects in a random task order
    fit(loop, batches)
    torch.manual_seed(1)
    fit(vmap, batches)
    torch.testing.assert_close(params_vector(vmap), params_vector(loop), rtol=1e-6, atol=1e-6)


def test_soft_sharing_penalty_is_pairwise_l2():
    model = make_model("equal", architecture=lambda tasks: SoftSharing(tasks, backbone(), weight=0.5))
    assert isinstance(model.architecture, SoftSharing)
    copies = list(model.architecture.backbones.values())
    with torch.no_grad():
        for c in copies:
            for p in c.parameters():
                p.add_(torch.randn_like(p))
    expected = sum(
        (pi - pj).pow(2).sum()
        for i in range(len(copies)) for j in range(i + 1, len(copies))
        for pi, pj in zip(copies[i].parameters(), copies[j].parameters(), strict=True)
    )
    torch.testing.assert_close(model.architecture.penalty(), 0.5 * expected)
    fit(model, global_batches(2))


def test_diagnostics_logged():
    model = make_model("pcgrad", diagnostics_every=1)
    trainer = trainer_for(2, log_every_n_steps=1)
    trainer.fit(model, train_dataloaders=DataLoader(global_batches(2), batch_size=None))
    metrics = trainer.callback_metrics
    assert {"diag/cos_mean", "diag/conflict_frac", "diag/cos/a|b", "diag/grad_norm_ratio/c", "train/a/loss"} <= set(
        metrics)
    assert -1 <= metrics["diag/cos_min"] <= metrics["diag/cos_mean"] <= 1


def test_sparse_diagnostics_are_written_at_every_diagnostic_step(tmp_path):
    """Diagnostics every 5 steps, step metrics written every 5 steps, epochs of 7 steps: every diagnostic reaches the
    logger (computed on the steps that complete a multiple of 5, the logging steps; computed after them, a value
    waited for the next logging step and was lost when the epoch ended first)."""
    from lightning_mtl.history import MetricsHistory, read_history

    model = make_model("pcgrad", diagnostics_every=5)
    trainer = L.Trainer(accelerator="cpu", max_steps=30, logger=MetricsHistory(tmp_path), log_every_n_steps=5,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=DataLoader(global_batches(7), batch_size=None))
    rows = [r for r in read_history(tmp_path / "metrics.jsonl") if "diag/cos_mean" in r]
    assert [r["step"] for r in rows] == [4, 9, 14, 19, 24, 29]  # Lightning's step: 0-based index of the last step
    assert len({r["diag/cos_mean"] for r in rows}) == 6  # six computations, not one value written again


def per_task_batches(steps: int) -> list[MultiTaskBatch]:
    """Several datasets combined: each task has its own inputs."""
    g = torch.Generator().manual_seed(3)
    return [MultiTaskBatch({t: torch.randn(5, 6, generator=g) for t in TASKS},
                           {t: torch.randint(0, c, (5,), generator=g) for t, c in TASKS.items()}) for _ in range(steps)]


def test_per_task_inputs_at_both_levels():
    """Mean aggregation is linear: both levels give the same update, also when each task has its own inputs."""
    batches = per_task_batches(3)
    a, b = make_model("mean", level="parameter"), make_model("mean", level="representation")
    fit(a, batches)
    fit(b, batches)
    torch.testing.assert_close(params_vector(a), params_vector(b), atol=1e-6, rtol=1e-5)
    mgda = make_model("mgda", level="representation")
    fit(mgda, batches)
    assert torch.isfinite(params_vector(mgda)).all()


def test_num_classes_from_datamodule_and_checkpoint_roundtrip(tmp_path):
    class Data(L.LightningDataModule):
        num_classes = dict(TASKS)

        def train_dataloader(self):
            return DataLoader(global_batches(2), batch_size=None)

    torch.manual_seed(0)
    model = MultiTaskModule(None, backbone=torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh()),
                            input_shape=(6,), balancer="pcgrad")
    trainer = trainer_for(2, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=Data())
    assert model.task_names == list(TASKS) and model.hparams.num_classes == TASKS
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    restored = MultiTaskModule.load_from_checkpoint(path, backbone=torch.nn.Sequential(torch.nn.Linear(6, 8),
                                                                                        torch.nn.Tanh()))
    torch.testing.assert_close(params_vector(restored), params_vector(model))


def test_heads_sized_under_another_default_device():
    """configure_model runs under the trainer's default-device context (CUDA on a GPU run) while the CLI-built
    backbone is still on the CPU: the sizing probe must follow the backbone (found on an H200)."""
    model = MultiTaskModule(None, backbone=torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh()),
                            input_shape=(6,))
    with torch.device("meta"):  # a stand-in for cuda on this CPU-only machine: any other device fails the same way
        model._build({t: ClassificationTask(c) for t, c in TASKS.items()})
    assert model.task_names == list(TASKS)


def test_uncertainty_log_variances_are_trained():
    model = make_model("uncertainty")
    before = [p.detach().clone() for p in model.balancer.parameters()]
    assert before, "uncertainty weighting must own learnable log-variances"
    fit(model, global_batches(3))
    after = list(model.balancer.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True)), "log-variances did not move"


def test_gradnorm_weights_are_trained():
    model = make_model("gradnorm")
    before = [p.detach().clone() for p in model.balancer.parameters()]
    fit(model, global_batches(3))
    assert any(not torch.equal(b, a) for b, a in zip(before, model.balancer.parameters(), strict=True))


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_lr_scheduler_steps_per_step_or_per_epoch(interval):
    """StepLR(step_size=2, gamma=0.5) over 3 epochs of 2 batches: stepped per optimizer step the rate halves every 2
    steps (3 times in 6 steps); per epoch it halves every 2 epochs (once), as the papers' epoch schedules read."""
    from functools import partial

    model = make_model(lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5),
                       lr_scheduler_interval=interval)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=DataLoader(global_batches(2), batch_size=None))
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert trainer.global_step == 6
    assert lr == pytest.approx(0.1 * (0.5 ** 3 if interval == "step" else 0.5))  # toy models use SGD(lr=0.1)
    with pytest.raises(ValueError, match="lr_scheduler_interval must be one of"):
        make_model(lr_scheduler_interval="batch")
