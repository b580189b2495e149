"""MultiTaskModule: an architecture, named tasks and a balancing method, optimised manually so that per-task
gradients can be aggregated, correctly under DDP and mixed precision.

Who owns what (``shared/design/multitask.md``): the architecture (:mod:`lightning_mtl.mtl.architectures`) maps the
inputs to every task's representation in one pass; each task (:mod:`lightning_mtl.mtl.tasks`) owns its head, loss
and metrics; the balancer (:mod:`lightning_mtl.mtl.balancing`) maps losses or a task-gradient matrix to an update;
a balancing path (:mod:`lightning_mtl.mtl.paths`) builds what the balancer consumes and returns the gradients. This
module wires them, checks finiteness, handles the loss scale, steps the optimizer and logs.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MetricCollection

from lightning_mtl.batches import MultiTaskBatch
from lightning_mtl.callbacks import NonFiniteGuard
from lightning_mtl.checkpointing import WeightsOnlyLoading, save_hyperparameters
from lightning_mtl.loggers import logs_at
from lightning_mtl.mtl import gradients as G
from lightning_mtl.mtl import paths
from lightning_mtl.mtl.architectures import Architecture, ArchitectureCallable, HardSharing
from lightning_mtl.mtl.balancing import BalancerCallable, GradientAggregator, balancer_class, resolve_balancer
from lightning_mtl.mtl.diagnostics import gradient_diagnostics
from lightning_mtl.mtl.tasks import ClassificationTask, Task

VMAP_MAX_TASKS = 8  # jacobian="auto" uses the vmapped task Jacobian on CUDA up to this many tasks


class MultiTaskModule(WeightsOnlyLoading, L.LightningModule):
    """Multi-task model: an architecture, one :class:`~lightning_mtl.mtl.tasks.Task` per name and a balancing method.

    Each training step computes the task losses, then hands them to the balancing path of the balancer's kind
    (:mod:`lightning_mtl.mtl.paths`): loss weighting; gradient aggregation on the shared parameters
    (``level="parameter"``); or on the representations, followed by one backward pass (``level="representation"``).
    With ``16-mixed`` the loss scale is removed before aggregation and steps with non-finite gradients are skipped
    and the scale backed off, as GradScaler does. Non-finite losses are skipped with a warning or raise, as set.

    The monitored ``val/metric_mean`` is the mean over tasks of each task's main metric (its first), negated for a
    metric where lower is better, so that larger is always better.

    Args:
        tasks: task name → task (head, loss, metrics), e.g. ``SegmentationTask(13)``.
        num_classes: shortcut for classification tasks: task name → number of classes. With neither ``tasks`` nor
            ``num_classes`` the tasks come from the datamodule when the trainer configures the model: its
            ``build_tasks()`` if it has one, else a classification task per entry of its ``num_classes``.
        architecture: called with the task names, returns the :class:`~lightning_mtl.mtl.architectures.Architecture`
            (in YAML a ``class_path`` with ``init_args``, like the optimizer). ``None``: hard sharing of ``backbone``.
        backbone: shortcut for hard sharing: the shared network (default: Conv-4 on ``input_shape[0]`` channels).
            Give either ``architecture`` or ``backbone``.
        input_shape: one input's shape, used once to size the heads from the representations.
        balancer: a registered name (``lightning_mtl.mtl.balancing.list_balancers()``), a class path, or (in YAML) a
            ``class_path`` with ``init_args`` validated against the method's constructor.
        level: where gradients are aggregated: ``"parameter"`` or ``"representation"``.
        jacobian: how parameter-level task gradients are computed when every task reads one representation tensor:
            ``"loop"`` (one ``autograd.grad`` per task), ``"vmap"`` (two vmapped backward passes, as torchjd does) or
            ``"auto"`` (vmap on CUDA with at most ``VMAP_MAX_TASKS`` = 8 tasks, else the loop: the loop was faster
            on CPU at 4 and 50 tasks and on an H200 at 50, vmap faster on the H200 at 4). Architectures that give
            each task its own representation always use the loop.
        diagnostics_every: log task-gradient cosines and norm ratios every this many steps (0: never), on the steps
            that complete a multiple of it: written at once when ``log_every_n_steps`` divides it.
        optimizer: optimizer factory; default Adam, lr 1e-3.
        lr_scheduler: scheduler factory.
        lr_scheduler_interval: step the scheduler after every optimizer step (``"step"``) or at the end of every
            training epoch (``"epoch"``: the papers' epoch schedules, e.g. NYUv2's ``StepLR(100, 0.5)``, as written).

    Raises:
        ValueError: before training, for contradicting or invalid settings (both ``tasks`` and ``num_classes``, both
            ``architecture`` and ``backbone``, a gradient aggregator on an architecture without shared parameters,
            a task that cannot read its representation, an unknown balancer name, ...).

    A non-finite update (a NaN/Inf loss, an overflow) follows the trainer's
    :class:`~lightning_mtl.callbacks.NonFiniteGuard` (``--nonfinite.mode skip|raise|off`` in the recipes; ``skip``
    without one): the module knows from the update itself whether it is finite, so it applies the policy before
    assigning gradients and the guard stands aside.
    """

    #: the module applies the non-finite policy itself (see :class:`~lightning_mtl.callbacks.NonFiniteGuard`).
    handles_nonfinite = True

    def __init__(
        self,
        tasks: dict[str, Task] | None = None,
        num_classes: dict[str, int] | None = None,
        architecture: ArchitectureCallable | None = None,
        backbone: nn.Module | None = None,
        input_shape: tuple[int, ...] = (1, 28, 28),
        balancer: str | BalancerCallable = "equal",
        level: Literal["parameter", "representation"] = "parameter",
        jacobian: Literal["auto", "loop", "vmap"] = "auto",
        diagnostics_every: int = 50,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__()
        if tasks is not None and num_classes is not None:
            raise ValueError("give model tasks or num_classes (a shortcut for classification tasks), not both")
        if (tasks is not None and not tasks) or (num_classes is not None and not num_classes):
            raise ValueError("tasks / num_classes must name at least one task (or be null to take the datamodule's)")
        if architecture is not None and backbone is not None:
            raise ValueError("give model architecture or backbone (a shortcut for HardSharing(backbone)), not both: "
                             "pass the backbone inside the architecture's init_args.")
        if isinstance(balancer, str):
            balancer_class(balancer)  # an unknown name fails here, listing the valid ones
        choices = {"level": ("parameter", "representation"), "jacobian": ("auto", "loop", "vmap"),
                   "lr_scheduler_interval": ("step", "epoch")}
        for name, value in (("level", level), ("jacobian", jacobian), ("lr_scheduler_interval", lr_scheduler_interval)):
            if value not in choices[name]:
                raise ValueError(f"{name} must be one of {choices[name]}, got {value!r}")
        objects = ["tasks", "architecture", "backbone", "optimizer", "lr_scheduler"]
        save_hyperparameters(self, objects if isinstance(balancer, str) else [*objects, "balancer"])
        self.automatic_optimization = False
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self._balancer_spec = balancer
        self._loss_scale = G.LossScale(None)
        self._matrix = G.Buffer()  # the (K, D) task-gradient matrix, reused across steps
        # the last logged diagnostics and their epoch, kept in checkpoints (see on_load_checkpoint)
        self._diagnostics: dict[str, Tensor] = {}
        self._diagnostics_epoch = -1
        self._restored_diagnostics: dict[str, float] | None = None
        # factories, not submodules, until _build places what they make in the model
        self.__dict__["_architecture_factory"] = architecture
        self.__dict__["_backbone_template"] = backbone
        self.architecture: Architecture | None = None
        if num_classes is not None:
            tasks = {t: ClassificationTask(c) for t, c in num_classes.items()}
        if tasks is not None:
            self._build(dict(tasks))

    def _build(self, tasks: dict[str, Task]) -> None:
        """Create the architecture, the heads, the metrics and the balancer for ``tasks``."""
        hp = self.hparams
        for name, task in tasks.items():
            if not isinstance(task, Task):
                raise TypeError(f"task {name!r} is a {type(task).__name__}; give a lightning_mtl.mtl.tasks.Task "
                                f"(e.g. ClassificationTask(num_classes)).")
        self.task_names = list(tasks)
        factory = self.__dict__.pop("_architecture_factory", None)
        backbone = self.__dict__.pop("_backbone_template", None)
        if factory is None:
            if backbone is None:
                from lightning_mtl.nn import Conv4

                backbone = Conv4(in_channels=hp.input_shape[0])
            architecture = HardSharing(self.task_names, backbone)
        else:
            architecture = factory(list(self.task_names))
        if not isinstance(architecture, Architecture):
            raise TypeError(f"architecture must build a lightning_mtl.mtl.architectures.Architecture, got "
                            f"{type(architecture).__name__}")
        shapes = self._probe(architecture)
        for name, task in tasks.items():
            try:
                task.build(shapes[name])
            except ValueError as e:
                raise ValueError(f"task {name!r} ({type(task).__name__}) cannot read the representation of shape "
                                 f"{shapes[name]} that {type(architecture).__name__} gives it: {e}") from e
        self.architecture = architecture
        self._shapes = shapes
        self.tasks = nn.ModuleDict(tasks)
        self.directions = {t: task.directions() for t, task in tasks.items()}
        self.metrics = nn.ModuleDict({
            f"{stage}_{t}": MetricCollection(task.metrics(), prefix=f"{stage}/{t}/") for stage in ("val", "test")
            for t, task in tasks.items()
        })
        self.balancer = resolve_balancer(self._balancer_spec, self.task_names)
        if isinstance(self.balancer, GradientAggregator) and not architecture.shared_parameters():
            raise ValueError(f"gradient aggregation ({type(self.balancer).__name__}) acts on shared parameters, and "
                             f"{type(architecture).__name__} has none; use a loss weighting (e.g. balancer: equal, "
                             f"uncertainty, dwa, famo) or an architecture with shared parameters.")
        if all(isinstance(t, ClassificationTask) for t in tasks.values()):  # checkpoints rebuild the heads at load
            self.hparams["num_classes"] = {t: task.num_classes for t, task in tasks.items()}

    def _probe(self, architecture: Architecture) -> dict[str, tuple[int, ...]]:
        """Each task's representation shape (one sample's), from one input of ``input_shape`` in evaluation mode."""
        shape = tuple(self.hparams.input_shape)
        # the probe goes where the architecture is: configure_model runs under the trainer's default-device context
        # (CUDA), while one built by the CLI is still on the CPU
        device = next((t.device for t in [*architecture.parameters(), *architecture.buffers()]), torch.device("cpu"))
        was_training = architecture.training
        try:
            with torch.no_grad():
                reps = architecture.eval()(torch.zeros(2, *shape, device=device))
        except RuntimeError as e:  # a shape error, named here rather than as a bare one in training
            raise ValueError(f"{type(architecture).__name__} cannot take an input of input_shape={shape} ({e}); set "
                             f"model input_shape to the shape of one input, e.g. (C, H, W) for images.") from e
        finally:
            architecture.train(was_training)
        if set(reps) != set(self.task_names):
            raise ValueError(f"{type(architecture).__name__} returned representations for {sorted(reps)}, not for the "
                             f"tasks {sorted(self.task_names)}")
        return {t: tuple(z.shape[1:]) for t, z in reps.items()}

    def configure_model(self) -> None:
        """With neither ``tasks`` nor ``num_classes``, take the tasks from the datamodule (after its ``setup``)."""
        if self.architecture is not None:
            return
        datamodule = self.trainer.datamodule
        if callable(getattr(datamodule, "build_tasks", None)):
            self._build(dict(datamodule.build_tasks()))
            return
        num_classes = getattr(datamodule, "num_classes", None)
        if not num_classes:
            source = "no datamodule was given" if datamodule is None else f"{type(datamodule).__name__} has none"
            raise ValueError("MultiTaskModule(tasks=None, num_classes=None) takes its tasks from the datamodule's "
                             f"`build_tasks()` or `num_classes`, but {source}; pass model tasks or num_classes.")
        self._build({t: ClassificationTask(c) for t, c in num_classes.items()})

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor | dict[str, Tensor], task: str | None = None) -> dict[str, Tensor] | Tensor:
        """Every task's output for inputs ``x`` (one batch, or a dict of per-task batches), or only ``task``'s."""
        outputs = self.task_outputs(x)
        return outputs if task is None else outputs[task]

    @staticmethod
    def _images(x: Tensor | dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
        if isinstance(x, dict):
            return {t: MultiTaskModule._images(v) for t, v in x.items()}
        # the default dtype is the model's under Lightning's "*-true" precisions (float32 otherwise)
        return x.to(torch.get_default_dtype()).div(255) if x.dtype == torch.uint8 else x

    def representations(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        """The representation each task's head reads: what the tasks share is computed once per input batch."""
        return self.architecture(self._images(x))

    def task_outputs(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        reps = self.representations(x)
        return {t: self.tasks[t](self._checked(t, z, x)) for t, z in reps.items()}

    def _checked(self, task: str, z: Tensor, x: Tensor | dict[str, Tensor]) -> Tensor:
        """``z``, after checking it has the shape ``task``'s head was sized for (else the head fails with a bare
        shape error); shapes are Python ints, so this never synchronises the device."""
        expected = self._shapes[task]
        got = tuple(z.shape[1:])
        if got != expected and not (self.tasks[task].any_spatial_size and got[:1] == expected[:1]):
            inputs = x[task] if isinstance(x, dict) else x
            raise ValueError(f"{type(self.architecture).__name__} gives task {task!r} a representation of shape {got} "
                             f"for inputs of shape {tuple(inputs.shape[1:])}, but its head was sized for {expected} "
                             f"from input_shape={tuple(self.hparams.input_shape)}; set model input_shape to the shape "
                             f"of one input.")
        return z

    # ------------------------------------------------------------------ input checks (on CPU, before transfer)
    def on_fit_start(self) -> None:
        self._check_data_tasks()
        plugin = self.trainer.precision_plugin
        self._loss_scale = G.LossScale(getattr(plugin, "scaler", None))
        ddp = self.trainer.strategy.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            # gradients are computed with autograd.grad and reduced by the balancing paths (before aggregation);
            # DDP's own bucketed all-reduce would run on .grad after the fact and double-count
            ddp.require_backward_grad_sync = False

    def _check_data_tasks(self) -> None:
        """The datamodule's task names, where it states them, must be the model's: checked before the first step."""
        names = getattr(self.trainer.datamodule, "num_classes", None) if self.trainer.datamodule else None
        try:
            names = list(names) if names else None
        except TypeError:
            names = None
        if names is not None and set(names) != set(self.task_names):
            raise ValueError(f"the datamodule's tasks {sorted(names)} are not the model's {sorted(self.task_names)}; "
                             f"make model tasks / num_classes name the datamodule's tasks (or set them to null to "
                             f"take the datamodule's).")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, MultiTaskBatch):
            raise TypeError(f"expected a MultiTaskBatch, got {type(batch).__name__}; yield "
                            f"lightning_mtl.MultiTaskBatch(x, targets) from the datamodule.")
        inputs_match = not isinstance(batch.x, dict) or set(batch.x) == set(batch.targets)
        known = set(batch.targets) <= set(self.task_names)
        # training needs every task in every batch; evaluation may go task by task (sequential loaders)
        complete = set(batch.targets) == set(self.task_names) or not self.trainer.training
        if not (inputs_match and known and complete):
            raise ValueError(f"batch tasks {sorted(batch.targets)} do not match the model's tasks "
                             f"{sorted(self.task_names)}; make the datamodule's task names match the model's.")
        for t, y in batch.targets.items():
            try:
                self.tasks[t].check_target(y)
            except ValueError as e:
                raise ValueError(f"task {t!r}: {e}") from e
        return batch

    # ------------------------------------------------------------------ training
    def training_step(self, batch: MultiTaskBatch, batch_idx: int) -> None:
        opt = self.optimizers()
        self._loss_scale.refresh()  # the scale of this step, read once
        aggregate = isinstance(self.balancer, GradientAggregator)
        representation = aggregate and self.hparams.level == "representation"
        reps = self.representations(batch.x)
        graphs = list({id(z): z for z in reps.values()}.values())  # the distinct representation tensors
        if representation:  # task gradients stop at leaf copies of the representations
            leaf_of = {id(z): z.detach().requires_grad_() for z in graphs}
            reps = {t: leaf_of[id(z)] for t, z in reps.items()}
        reps = {t: self._checked(t, z, batch.x) for t, z in reps.items()}
        task_losses = [self._loss(t, self.tasks[t](reps[t]), batch.targets[t]) for t in self.task_names]
        losses = torch.stack(task_losses)  # (K,)
        shared = self.architecture.shared_parameters()
        shared_ids = {id(p) for p in shared}
        others = [p for m in (self.architecture, self.tasks) for p in m.parameters()
                  if p.requires_grad and id(p) not in shared_ids]
        every = self.hparams.diagnostics_every
        inputs = paths.StepInputs(
            tasks=self.task_names, task_losses=task_losses, losses=losses,
            global_losses=G.all_reduce_(losses.detach().clone()),
            shared=shared, others=others, penalty=self.architecture.penalty(), scale=self._loss_scale,
            # on the steps that complete a multiple of `every` (as logs_at counts): with log_every_n_steps dividing
            # `every`, their values are written at once, not lost when the epoch ends before the next logging step
            diagnose=bool(every) and (self.global_step + 1) % every == 0 and bool(shared),
        )
        if not aggregate:
            update = paths.loss_weighting(self.balancer, inputs)
        elif representation:
            update = paths.representation_aggregation(self.balancer, inputs, [leaf_of[id(z)] for z in graphs],
                                                      graphs, self.trainer.world_size)
        else:
            buffer = self._matrix.get(len(self.task_names), sum(p.numel() for p in shared), losses.device)
            update = paths.parameter_aggregation(self.balancer, inputs, buffer, self._vmap_through(graphs))
        if not update.finite and NonFiniteGuard.policy(self._trainer) != "off":
            self._skip_step(opt, inputs.global_losses, update.params)
            return
        scale = self._loss_scale
        for p, g in zip(update.params, update.grads, strict=True):
            if scale.enabled:
                g = g * scale.value()  # re-scaled: the precision plugin's GradScaler unscales it
            p.grad = g.to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.balancer.after_step({t: inputs.global_losses[i] for i, t in enumerate(self.task_names)})
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.hparams.lr_scheduler_interval == "step":
            scheduler.step()
        self._log_training(inputs.global_losses, update.matrix)

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.hparams.lr_scheduler_interval == "epoch":
            scheduler.step()

    def _loss(self, task: str, output: Tensor, target: Tensor) -> Tensor:
        output = self.tasks[task].align(output, target)
        return self.tasks[task].loss(output.float(), target)

    def _vmap_through(self, graphs: list[Tensor]) -> Tensor | None:
        """The one representation tensor to vmap the task Jacobian through, when ``jacobian`` asks for it."""
        mode = self.hparams.jacobian
        if mode == "auto":  # on an H200 vmap was faster at K = 4, slower at K = 50 (docs/history.md)
            mode = "vmap" if self.device.type == "cuda" and len(self.task_names) <= VMAP_MAX_TASKS else "loop"
        return graphs[0] if mode == "vmap" and len(graphs) == 1 else None

    def _skip_step(self, opt, global_losses: Tensor, params: list[Tensor]) -> None:
        bad = [t for i, t in enumerate(self.task_names) if not math.isfinite(float(global_losses[i]))]
        if self._loss_scale.enabled and not bad:
            # overflow of 16-bit gradients: hand GradScaler a non-finite gradient so that it skips the step and
            # backs off the scale exactly as it does for its own overflows
            for p in params:
                p.grad = torch.full_like(p, float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            return
        opt.zero_grad(set_to_none=True)
        message = (f"step {self.global_step}: non-finite loss for task(s) {bad or self.task_names} "
                   f"({[float(v) for v in global_losses]}); ")
        if NonFiniteGuard.policy(self._trainer) == "raise":
            raise FloatingPointError(message + "stopping (nonfinite.mode='raise'). Lower the learning rate or check "
                                     "the data of these tasks.")
        rank_zero_warn(message + "step skipped (nonfinite.mode='skip').")

    def _log_training(self, global_losses: Tensor, matrix: Tensor | None) -> None:
        if logs_at(self.trainer, self.global_step):  # after the optimizer step: when step metrics flush
            for i, t in enumerate(self.task_names):
                self.log(f"train/{t}/loss", global_losses[i])
            self.log("train/loss", global_losses.sum(), prog_bar=True)
            if self._loss_scale.enabled:  # 16-mixed: GradScaler's scale (it backs off after skipped steps)
                self.log("train/loss_scale", self._loss_scale.value())
            if self.balancer.weights is not None:
                for i, t in enumerate(self.task_names):
                    self.log(f"weights/{t}", self.balancer.weights[i].float())
        if matrix is not None:
            with torch.autocast(self.device.type, enabled=False):
                self._diagnostics = gradient_diagnostics(matrix, self.task_names)
            self._diagnostics_epoch = self.current_epoch
            for key, value in self._diagnostics.items():
                self.log(f"diag/{key}", value)
        elif self._restored_diagnostics is not None:
            for key, value in self._restored_diagnostics.items():
                self.log(f"diag/{key}", value)
        self._restored_diagnostics = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mtl_diagnostics"] = {"epoch": self._diagnostics_epoch,
                                         "values": {k: float(v) for k, v in self._diagnostics.items()}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning re-reports a step metric at every later logging step of its epoch; diagnostics are logged only
        every ``diagnostics_every`` steps, so a run resumed mid-epoch re-logs the checkpoint's last ones once, and its
        logs equal an uninterrupted run's."""
        saved = checkpoint.get("mtl_diagnostics") or {}
        if saved.get("values") and saved.get("epoch") == checkpoint.get("epoch"):
            self._restored_diagnostics = dict(saved["values"])
            self._diagnostics = {k: torch.tensor(v) for k, v in saved["values"].items()}
            self._diagnostics_epoch = saved["epoch"]

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: MultiTaskBatch, stage: str) -> None:
        # per-task inputs: all tasks, or one per batch with sequential loaders; a shared input: one pass for all
        x = {t: batch.x[t] for t in batch.targets} if isinstance(batch.x, dict) else batch.x
        outputs = self.task_outputs(x)
        for t, y in batch.targets.items():
            out = self.tasks[t].align(outputs[t].float(), y)
            self.log(f"{stage}/{t}/loss", self.tasks[t].loss(out, y), batch_size=len(y), sync_dist=True,
                     add_dataloader_idx=False)
            self.metrics[f"{stage}_{t}"].update(out, y)

    def _eval_epoch_end(self, stage: str) -> None:
        mains, classification = [], all(isinstance(t, ClassificationTask) for t in self.tasks.values())
        for t in self.task_names:
            values = self.metrics[f"{stage}_{t}"].compute()  # synchronised over ranks by torchmetrics
            self.metrics[f"{stage}_{t}"].reset()
            self.log_dict({k: v.float() for k, v in values.items()}, sync_dist=True)
            main, higher = next(iter(self.directions[t].items()))
            value = values[f"{stage}/{t}/{main}"].float()
            mains.append(value if higher else -value)
        mean = torch.stack(mains).mean()  # signed by direction: larger is better
        self.log(f"{stage}/metric_mean", mean, prog_bar=True, sync_dist=True)
        if classification:
            self.log(f"{stage}/error_mean", 1 - mean, sync_dist=True)  # mean classification error over tasks

    def validation_step(self, batch: MultiTaskBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: MultiTaskBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ------------------------------------------------------------------ optimisation and state
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = (self.optimizer_factory(params) if self.optimizer_factory is not None
                     else torch.optim.Adam(params, lr=1e-3))
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer)}}
