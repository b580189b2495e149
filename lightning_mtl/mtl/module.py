"""MultiTaskModule: a shared model, named tasks and a balancing method, optimised manually so that per-task
gradients can be aggregated, correctly under DDP and mixed precision."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_mtl.batches import MultiTaskBatch
from lightning_mtl.mtl import gradients as G
from lightning_mtl.mtl.architectures import HardSharing, SoftSharing
from lightning_mtl.mtl.balancing import GradientAggregator, balancer_class, create_balancer, list_balancers
from lightning_mtl.mtl.diagnostics import gradient_diagnostics
from lightning_mtl.mtl.tasks import TaskSpec, classification_task

VMAP_MAX_TASKS = 8  # jacobian="auto" uses the vmapped task Jacobian on CUDA up to this many tasks


class MultiTaskModule(L.LightningModule):
    """Multi-task classifier with hard or soft parameter sharing and a balancing method chosen by name.

    Subclass and override :meth:`build_task` for other heads, losses or metrics.

    Each training step computes the task losses, then, by the kind of balancing method:

    * loss weighting: the method maps the losses to one loss; its weights are evaluated at the losses averaged over
      all ranks and applied to this rank's losses, so the DDP update equals the single-process one;
    * gradient aggregation, ``level="parameter"``: one gradient per task on the shared parameters
      (``torch.autograd.grad``), averaged over ranks *before* the aggregator turns the ``(tasks, dims)`` matrix into
      the update; ``level="representation"``: gradients w.r.t. the representations (gathered over ranks),
      aggregated, then one backward pass through the backbone (MGDA-UB, Sener & Koltun 2018). With per-task inputs
      each task's rows are zero outside its own inputs' representation block.

    With ``16-mixed`` the loss scale is removed before aggregation and steps with non-finite gradients are skipped
    and the scale backed off, as GradScaler does. Non-finite losses are skipped with a warning or raise, as set.

    Args:
        num_classes: task name → number of classes (one classification head each); ``None`` takes the datamodule's
            ``num_classes`` when the trainer configures the model (``configure_model``).
        backbone: shared feature extractor ``(B, ...) -> (B, D)`` (for soft sharing, the template copied per task).
        input_shape: one input's shape, used once to size the heads.
        architecture: ``"hard"`` (shared backbone) or ``"soft"`` (one backbone per task, L2-tied; Duong et al. 2015).
        soft_sharing_weight: lambda of the soft-sharing penalty.
        balancer: registered name of the balancing method (``lightning_mtl.mtl.balancing.list_balancers()``).
        balancer_args: hyper-parameters of the balancing method.
        level: where gradients are aggregated: ``"parameter"`` or ``"representation"``.
        jacobian: how parameter-level task gradients are computed when the tasks share one representation:
            ``"loop"`` (one ``autograd.grad`` per task), ``"vmap"`` (two vmapped backward passes, as torchjd does) or
            ``"auto"`` (vmap on CUDA with at most ``VMAP_MAX_TASKS`` = 8 tasks, else the loop: the loop was faster
            on CPU at 4 and 50 tasks and on an H200 at 50, vmap faster on the H200 at 4). Tasks with
            their own inputs always use the loop, which then back-propagates each task through its own pass only.
        nonfinite_loss: ``"skip"`` the step with a warning, or ``"raise"``.
        diagnostics_every: log task-gradient cosines and norm ratios every this many steps (0: never).
        optimizer: optimizer factory; default Adam, lr 1e-3.
        lr_scheduler: scheduler factory, stepped every training step.
    """

    def __init__(
        self,
        num_classes: dict[str, int] | None = None,
        backbone: nn.Module | None = None,
        input_shape: tuple[int, ...] = (1, 28, 28),
        architecture: Literal["hard", "soft"] = "hard",
        soft_sharing_weight: float = 1e-3,
        balancer: str = "equal",
        balancer_args: dict[str, Any] | None = None,
        level: Literal["parameter", "representation"] = "parameter",
        jacobian: Literal["auto", "loop", "vmap"] = "auto",
        nonfinite_loss: Literal["skip", "raise"] = "skip",
        diagnostics_every: int = 50,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if num_classes is not None and not num_classes:
            raise ValueError("num_classes must name at least one task (or be None to take the datamodule's)")
        balancer_class(balancer)  # an unknown name fails here, listing the valid ones
        choices = {"architecture": ("hard", "soft"), "level": ("parameter", "representation"),
                   "jacobian": ("auto", "loop", "vmap"), "nonfinite_loss": ("skip", "raise")}
        for name, value in (("architecture", architecture), ("level", level), ("jacobian", jacobian),
                            ("nonfinite_loss", nonfinite_loss)):
            valid = choices[name]
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        if architecture == "soft" and issubclass(balancer_class(balancer), GradientAggregator):
            raise ValueError(f"gradient aggregation ({balancer!r}) needs shared parameters; soft sharing has none. "
                             f"Use a loss weighting ({', '.join(list_balancers('weighting'))}) or hard sharing.")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self._loss_scale = G.LossScale(None)
        self._matrix = G.Buffer()  # the (K, D) task-gradient matrix, reused across steps
        # the last logged diagnostics and their epoch, kept in checkpoints (see on_load_checkpoint)
        self._diagnostics: dict[str, Tensor] = {}
        self._diagnostics_epoch = -1
        self._restored_diagnostics: dict[str, float] | None = None
        self.__dict__["_backbone_template"] = backbone  # not a submodule until _build places it in the model
        self.model: HardSharing | SoftSharing | None = None
        if num_classes is not None:
            self._build(dict(num_classes))

    def _build(self, num_classes: dict[str, int]) -> None:
        """Create heads, metrics and the balancer for ``num_classes`` (at init, or from the datamodule)."""
        hp = self.hparams
        self.task_names = list(num_classes)
        backbone = self.__dict__.pop("_backbone_template", None)
        if backbone is None:
            from lightning_mtl.nn import Conv4

            backbone = Conv4(in_channels=hp.input_shape[0])
        # the probe goes where the backbone is: configure_model runs under the trainer's default-device context
        # (CUDA), while a backbone built by the CLI is still on the CPU
        device = next((t.device for t in [*backbone.parameters(), *backbone.buffers()]), torch.device("cpu"))
        with torch.no_grad():
            was_training = backbone.training
            probe = torch.zeros(1, *hp.input_shape, device=device)
            try:
                feature_dim = backbone.eval()(probe).flatten(1).shape[1]
            except RuntimeError as e:  # a shape error, named here rather than as a bare one in training
                raise ValueError(f"the backbone cannot take an input of input_shape={tuple(hp.input_shape)} ({e}); set "
                                 f"model input_shape to the shape of one input, e.g. (C, H, W) for images.") from e
            finally:
                backbone.train(was_training)
        self.feature_dim = feature_dim
        self.specs: dict[str, TaskSpec] = {t: self.build_task(t, c, feature_dim) for t, c in num_classes.items()}
        heads = {t: s.head for t, s in self.specs.items()}
        self.model = (HardSharing(backbone, heads) if hp.architecture == "hard"
                      else SoftSharing(backbone, heads, hp.soft_sharing_weight))
        self.metrics = nn.ModuleDict({
            f"{stage}_{t}": s.metrics.clone(prefix=f"{stage}/{t}/") for stage in ("val", "test")
            for t, s in self.specs.items()
        })
        self.balancer = create_balancer(hp.balancer, self.task_names, **(hp.balancer_args or {}))
        self.hparams["num_classes"] = dict(num_classes)  # so that checkpoints rebuild the heads at load time

    def configure_model(self) -> None:
        """With ``num_classes=None``, take the tasks from the datamodule (after its ``setup``)."""
        if self.model is not None:
            return
        datamodule = self.trainer.datamodule
        num_classes = getattr(datamodule, "num_classes", None)
        if not num_classes:
            source = "no datamodule was given" if datamodule is None else f"{type(datamodule).__name__} has none"
            raise ValueError("MultiTaskModule(num_classes=None) takes its tasks from the datamodule's `num_classes`, "
                             f"but {source}; pass model num_classes explicitly.")
        self._build(dict(num_classes))

    def build_task(self, name: str, num_classes: int, feature_dim: int) -> TaskSpec:
        """The head, loss and metrics of task ``name``; override for non-classification tasks."""
        if num_classes < 2:
            raise ValueError(f"task {name!r} has num_classes={num_classes}; a classification task needs at least 2 "
                             f"classes: fix num_classes[{name!r}] (or override build_task for other kinds of task).")
        return classification_task(feature_dim, num_classes)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, task: str) -> Tensor:
        """Output of ``task`` for inputs ``x``."""
        return self.model.head(task, self._representation(x, task))

    @staticmethod
    def _images(x: Tensor) -> Tensor:
        # the default dtype is the model's under Lightning's "*-true" precisions (float32 otherwise)
        return x.to(torch.get_default_dtype()).div(255) if x.dtype == torch.uint8 else x

    def _representation(self, x: Tensor, task: str | None = None) -> Tensor:
        z = self.model.representation(self._images(x), task)  # (B, D)
        if z.shape[1] != self.feature_dim:  # else the heads fail with a bare matrix-shape error
            raise ValueError(f"the backbone gives {z.shape[1]} features for inputs of shape {tuple(x.shape[1:])} but "
                             f"the heads were sized for {self.feature_dim} from input_shape="
                             f"{tuple(self.hparams.input_shape)}; set model input_shape to the shape of one input.")
        return z

    def representations(self, batch: MultiTaskBatch) -> dict[str, Tensor]:
        """The representation each task's head reads: one shared ``(B, D)`` tensor (computed once) when the tasks
        share an input and a backbone, else one per task."""
        if isinstance(batch.x, dict) or isinstance(self.model, SoftSharing):
            inputs = batch.x if isinstance(batch.x, dict) else dict.fromkeys(self.task_names, batch.x)
            return {t: self._representation(inputs[t], t) for t in self.task_names}
        z = self._representation(batch.x)
        return dict.fromkeys(self.task_names, z)

    def task_outputs(self, batch: MultiTaskBatch) -> dict[str, Tensor]:
        reps = self.representations(batch)
        return {t: self.model.head(t, reps[t]) for t in self.task_names}

    # ------------------------------------------------------------------ input checks (on CPU, before transfer)
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, MultiTaskBatch):
            raise TypeError(f"expected a MultiTaskBatch, got {type(batch).__name__}; yield "
                            f"lightning_mtl.MultiTaskBatch(x, targets) from the datamodule.")
        inputs_match = not isinstance(batch.x, dict) or set(batch.x) == set(batch.targets)
        known = set(batch.targets) <= set(self.task_names)
        # training needs every task in every batch; evaluation may go task by task (sequential loaders)
        complete = set(batch.targets) == set(self.task_names) or not self.trainer.training
        if not (inputs_match and known and complete):
            raise ValueError(f"batch tasks {sorted(batch.targets)} do not match the model's heads "
                             f"{sorted(self.task_names)}; make the datamodule's task names match num_classes.")
        for t, y in batch.targets.items():
            c = self.specs[t].num_classes
            if c is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
                bad = int(y.max()) if int(y.max()) >= c else int(y.min())
                raise ValueError(f"task {t!r}: target {bad} is out of the head's range 0..{c - 1}; fix "
                                 f"num_classes[{t!r}] or the labels.")
        return batch

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        plugin = self.trainer.precision_plugin
        self._loss_scale = G.LossScale(getattr(plugin, "scaler", None))
        ddp = self.trainer.strategy.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            # gradients are computed with autograd.grad and reduced by this module (before aggregation); DDP's own
            # bucketed all-reduce would run on .grad after the fact and double-count
            ddp.require_backward_grad_sync = False

    def training_step(self, batch: MultiTaskBatch, batch_idx: int) -> None:
        opt = self.optimizers()
        scale, tasks = self._loss_scale, self.task_names
        scale.refresh()  # the scale of this step, read once
        aggregate = isinstance(self.balancer, GradientAggregator)
        representation = aggregate and self.hparams.level == "representation"
        reps = self.representations(batch)
        # distinct representation tensors: one if the input is shared, one per task for per-task inputs
        graphs = list({id(z): z for z in reps.values()}.values())
        if representation:  # task gradients stop at leaf copies of the representations
            leaf_of = {id(z): z.detach().requires_grad_() for z in graphs}
            leaves = [leaf_of[id(z)] for z in graphs]
            outputs = {t: self.model.head(t, leaf_of[id(reps[t])]) for t in tasks}
        else:
            outputs = {t: self.model.head(t, reps[t]) for t in tasks}
        losses = {t: self.specs[t].loss(outputs[t].float(), batch.targets[t]) for t in tasks}
        loss_vec = torch.stack([losses[t] for t in tasks])  # (K,)
        global_losses = G.all_reduce_(loss_vec.detach().clone())  # mean over ranks

        shared = self.model.shared_parameters()
        others = [p for p in self.model.parameters() if p.requires_grad and all(p is not q for q in shared)]
        own = [p for p in self.balancer.parameters() if p.requires_grad]  # e.g. log-variances, GradNorm weights
        own_grads: list[Tensor] = []
        every = self.hparams.diagnostics_every
        diagnose = bool(every) and self.global_step % every == 0 and bool(shared)
        matrix = diag_matrix = None  # (K, D) true per-task gradients: aggregated / only diagnosed
        if diagnose and not (aggregate and not representation):
            # the task gradients on the shared parameters, computed only on diagnostic steps
            rows = []
            for t in tasks:
                if representation:  # through the leaf copies, then through the backbone
                    g_z = G.grads(scale.scale(losses[t]), leaves, retain_graph=True)
                    rows.append(G.flatten(G.grads(graphs, shared, retain_graph=True, grad_outputs=g_z)))
                else:
                    rows.append(G.flatten(G.grads(scale.scale(losses[t]), shared, retain_graph=True)))
            diag_matrix = scale.unscale_(G.all_reduce_(torch.stack(rows)))

        if aggregate:
            if representation:  # per-task inputs give block-structured rows: zeros outside the task's own block
                rows = [G.flatten(G.grads(scale.scale(losses[t]), leaves, retain_graph=True)) for t in tasks]
                # gradient of the global-batch mean loss w.r.t. this rank's rows of the representation: local / W
                gathered, offset = G.all_gather_columns(torch.stack(rows) / self.trainer.world_size)
                matrix = scale.unscale_(gathered.float())  # (K, global B * D)
            else:
                buffer = self._matrix.get(len(tasks), sum(p.numel() for p in shared), loss_vec.device)
                mode = self.hparams.jacobian
                if mode == "auto":  # measured on an H200: vmap 20% faster at K = 4, 40% slower at K = 50
                    mode = "vmap" if loss_vec.device.type == "cuda" and len(tasks) <= VMAP_MAX_TASKS else "loop"
                if mode == "vmap" and len(graphs) == 1:  # one shared representation: two batched passes
                    buffer = G.task_matrix_vmap(scale.scale(loss_vec), graphs[0], shared, buffer)
                else:
                    buffer = G.task_matrix([scale.scale(losses[t]) for t in tasks], shared, buffer)
                matrix = G.all_reduce_(buffer)
                scale.unscale_(matrix)  # (K, D): true gradients, averaged over ranks
            other_grads = G.grads(scale.scale(loss_vec.sum()), others, retain_graph=representation)
            shared_flat = None
        else:
            total, own_grads = self._linearised_weighting(losses, global_losses, shared)
            penalty = self.model.penalty()
            total = total if penalty is None else total + penalty
            with_own = self.balancer.needs_shared_params  # its parameters' gradients come from this loss
            all_grads = G.grads(scale.scale(total), shared + others + (own if with_own else []))
            shared_flat = scale.unscale_(G.all_reduce_(G.flatten(all_grads[: len(shared)]))) if shared else None
            other_grads = all_grads[len(shared): len(shared) + len(others)]
            if with_own:
                own_grads = [g / scale.value() for g in
                             G.unflatten(G.all_reduce_(G.flatten(all_grads[len(shared) + len(others):])), own)]
        other_flat = scale.unscale_(G.all_reduce_(G.flatten(other_grads))) if others else None

        own_flat = G.flatten(own_grads) if own_grads else None
        if not G.all_finite(global_losses, matrix, other_flat, shared_flat, own_flat):  # deciding needs a host sync
            self._skip_step(opt, global_losses, shared + others + own)
            return

        if aggregate:
            with self._full_precision():  # aggregators solve small QPs / Gramians: keep autocast out of them
                direction = self.balancer(matrix)
            if representation:  # back-propagate this rank's part of the aggregated direction through the backbone
                mine = direction[offset: offset + sum(z.numel() for z in leaves)]
                d_z = [scale.scale(d.view_as(z).to(z.dtype)) for d, z in zip(G.unflatten(mine, leaves), leaves,
                                                                               strict=True)]
                back = G.grads(graphs, shared, grad_outputs=d_z)
                shared_flat = scale.unscale_(G.all_reduce_(G.flatten(back), op="sum"))
            else:
                shared_flat = direction
        grads = G.unflatten(shared_flat, shared) if shared else []
        grads += G.unflatten(other_flat, others) if others else []
        grads += list(own_grads)
        params = shared + others + (own if own_grads else [])
        for p, g in zip(params, grads, strict=True):
            if scale.enabled:
                g = g * scale.value()  # re-scaled: the precision plugin's GradScaler unscales it
            p.grad = g.to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not aggregate:
            self.balancer.after_step({t: global_losses[i] for i, t in enumerate(tasks)})
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self._log_training(global_losses, diag_matrix if diag_matrix is not None else
                           (matrix if diagnose and not representation else None))

    def _linearised_weighting(
        self, losses: dict[str, Tensor], global_losses: Tensor, shared: list[Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        """``sum_k w_k * L_k`` (this rank) with ``w_k = d balancer / d L_k`` at the rank-averaged losses, and the
        gradients of the balancer's own parameters (e.g. log-variances) at those losses.

        The gradient of the balanced loss of the global batch is then the rank average of this loss's gradients
        (exact under DDP for any weighting of loss values), and the balancer's own gradients are the same on every
        rank. Methods that need the shared parameters (GradNorm) get this rank's losses; their own gradients then
        come from the returned loss, and the returned list is empty.
        """
        if self.balancer.needs_shared_params:
            with self._full_precision():
                return self.balancer(losses, shared), []
        leaves = global_losses.detach().clone().requires_grad_()
        with self._full_precision():
            balanced = self.balancer({t: leaves[i] for i, t in enumerate(self.task_names)})
        own = [p for p in self.balancer.parameters() if p.requires_grad]
        outs = G.grads(balanced, [leaves, *own])
        weights = outs[0].detach()  # (K,)
        return sum(weights[i] * losses[t] for i, t in enumerate(self.task_names)), outs[1:]

    def _full_precision(self):
        return torch.autocast(self.device.type, enabled=False)

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
        if self.hparams.nonfinite_loss == "raise":
            raise FloatingPointError(message + "stopping (nonfinite_loss='raise'). Lower the learning rate or check "
                                     "the data of these tasks.")
        rank_zero_warn(message + "step skipped (nonfinite_loss='skip').")

    def _log_training(self, global_losses: Tensor, matrix: Tensor | None) -> None:
        every = self.trainer.log_every_n_steps
        if self.trainer.fast_dev_run or (every and self.global_step % every == 0):  # when step metrics flush
            for i, t in enumerate(self.task_names):
                self.log(f"train/{t}/loss", global_losses[i])
            self.log("train/loss", global_losses.sum(), prog_bar=True)
            if self._loss_scale.enabled:  # 16-mixed: GradScaler's scale (it backs off after skipped steps)
                self.log("train/loss_scale", self._loss_scale.value())
            if self.balancer.weights is not None:
                for i, t in enumerate(self.task_names):
                    self.log(f"weights/{t}", self.balancer.weights[i].float())
        if matrix is not None:
            with self._full_precision():
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
        if isinstance(batch.x, dict):  # per-task inputs: all tasks, or one per batch with sequential loaders
            outputs = {t: self(batch.x[t], t) for t in batch.targets}
        else:  # a shared input: one backbone pass
            outputs = self.task_outputs(batch)
        for t, y in batch.targets.items():
            out = outputs[t].float()
            self.log(f"{stage}/{t}/loss", self.specs[t].loss(out, y), batch_size=len(y), sync_dist=True,
                     add_dataloader_idx=False)
            self.metrics[f"{stage}_{t}"].update(out, y)

    def _eval_epoch_end(self, stage: str) -> None:
        mains = []
        for t in self.task_names:
            values = self.metrics[f"{stage}_{t}"].compute()  # synchronised over ranks by torchmetrics
            self.metrics[f"{stage}_{t}"].reset()
            self.log_dict({k: v.float() for k, v in values.items()}, sync_dist=True)
            mains.append(next(iter(values.values())).float())
        mean = torch.stack(mains).mean()
        self.log(f"{stage}/metric_mean", mean, prog_bar=True, sync_dist=True)
        if all(s.higher_is_better for s in self.specs.values()) and all(s.num_classes for s in self.specs.values()):
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
