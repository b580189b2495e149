"""Reptile: first-order meta-learning by moving towards the task-adapted weights.

Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", arXiv:1803.02999, 2018.

For each task i of the meta-batch, phi_i = U^k(theta): ``inner_steps`` (k) steps of SGD or Adam on the task's data
starting from theta; then

    theta <- theta + epsilon_t * (mean_i phi_i - theta),    epsilon_t = epsilon + (epsilon_final - epsilon) * t / T

with the outer step size epsilon linearly annealed over the T = ``trainer.max_steps`` meta-iterations (to 0 in the
paper). No gradient flows through the inner loop. The update is applied as one step of plain SGD with learning rate
epsilon_t on the "gradient" theta - mean_i phi_i (manual optimization), averaged over processes under DDP.

A task's training data is its support AND query set together: Reptile has no support/query split in training, so
the whole episode is the task's data (the paper samples ``train_shots`` examples per class). The inner loop takes
mini-batches of ``inner_batch_size`` examples without replacement, reshuffling after each pass. Evaluation is as in
MAML: adapt on the support set for ``eval_inner_steps`` steps, classify the query set (BatchNorm transductive with
the default :class:`~lightning_mtl.nn.Conv4`, as the paper's transductive results).

Inner Adam (the paper's Omniglot setup, with beta1 = 0) has two modes, ``inner_state``:

- ``"carried"`` (the paper's code): one Adam state (moments and step count) lives across all tasks and meta-iterations.
  Each training task starts from the state the previous task left, and evaluation adapts from a copy of it without
  changing it. Adam's step is then ``lr * g / sqrt(v)`` with ``v`` the long-run mean of squared task gradients: a
  per-coordinate preconditioner learned over training. The state is a set of buffers (saved in checkpoints). Under
  DDP the ranks average it after every meta-iteration, so that all ranks hold the same state; one process on the
  same global meta-batch carries it through all the tasks in turn instead, so the two differ slightly (with SGD or
  ``"fresh"`` they are equal).
- ``"fresh"``: every task starts from a new Adam state, so a task's adaptation depends on that task alone. With
  beta1 = 0 the first steps are then about ``lr * sign(g)`` whatever the gradient's size.

``train/loss`` and ``train/acc`` are those of the last inner mini-batch before its update, averaged over the
meta-batch: how well a task is fit after k - 1 steps.

The network (``backbone`` → ``head``), the inner loop, the episode checks and evaluation are the core's
(:class:`~lightning_mtl.meta.gradient_based.GradientLearner`); Reptile supplies its update rule (a step of the inner
``torch.optim`` optimizer, whose state is the rule's state), the mini-batch schedule, and its outer update.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_mtl.batches import Episode
from lightning_mtl.checkpointing import save_hyperparameters
from lightning_mtl.meta.gradient_based import GradientLearner
from lightning_mtl.mtl.balancing import BalancerCallable


def _autocast_without_cache(device_type: str) -> contextlib.AbstractContextManager:
    """The current autocast state (if any) with its weight-cast cache off.

    Autocast caches the low-precision copy of every leaf tensor that requires grad until the outermost autocast
    region exits, and does not notice in-place updates. Lightning's mixed precision wraps the whole training step in
    one region, so without this every inner step after the first would run on the bf16/fp16 copy of the initial
    weights (found by tests/distributed/test_matrix.py: 23% off the fp32 update).
    """
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


class Reptile(GradientLearner):
    """Reptile classifier: ``backbone`` followed by a linear head of ``ways`` outputs, trained with Reptile updates.

    Args:
        ways: classes per episode (size of the head); must match the datamodule's ways.
        backbone: feature extractor ``(N, C, H, W) → (N, D)``; default :class:`Conv4` without running BatchNorm
            statistics (transductive).
        image_shape: ``(C, H, W)`` of the inputs, used once to size the head.
        inner_optimizer: ``"sgd"`` (plain gradient steps) or ``"adam"`` (the paper's choice, with ``inner_betas``).
        inner_lr: step size of the inner optimizer during training.
        inner_steps: inner updates k per task during training.
        inner_batch_size: examples per inner update; ``None`` uses all the task's data in every update.
        inner_betas: Adam's (beta1, beta2) in the inner loop; the paper's code uses beta1 = 0.
        inner_state: ``"carried"`` (one inner Adam state across tasks, as the paper's code) or ``"fresh"`` (a new
            state per task); see the module docstring. Plain SGD has no state, so this only matters for Adam.
        outer_lr: outer step size epsilon at the first meta-iteration.
        outer_lr_final: outer step size reached at ``trainer.max_steps`` (linear annealing; the paper anneals to 0).
        eval_inner_lr: inner step size at validation / test; ``None`` uses ``inner_lr``.
        eval_inner_steps: inner updates at validation / test, on the whole support set (the paper uses 50).
        meta_balancer: gradient aggregator of the per-task outer directions ``theta - phi_i`` of a meta-batch
            (``pcgrad``, ``mgda``, ``upgrad``, ...); ``None``: their mean, Reptile's update.
        diagnostics_every: with a ``meta_balancer``, log the conflict of the task directions (``diag/*``) every this
            many steps.

    Raises:
        ValueError: ``ways < 2``, an unknown ``inner_optimizer`` or ``inner_state``, non-positive step counts, sizes
            or step sizes.
    """

    def __init__(
        self,
        ways: int = 5,
        backbone: nn.Module | None = None,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        inner_optimizer: Literal["sgd", "adam"] = "adam",
        inner_lr: float = 1e-3,
        inner_steps: int = 5,
        inner_batch_size: int | None = 10,
        inner_betas: tuple[float, float] = (0.0, 0.999),
        inner_state: Literal["carried", "fresh"] = "carried",
        outer_lr: float = 1.0,
        outer_lr_final: float = 0.0,
        eval_inner_lr: float | None = None,
        eval_inner_steps: int = 50,
        meta_balancer: str | BalancerCallable | None = None,
        diagnostics_every: int = 100,
    ) -> None:
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"inner_optimizer must be 'sgd' or 'adam', got {inner_optimizer!r}")
        if inner_state not in ("carried", "fresh"):
            raise ValueError(f"inner_state must be 'carried' or 'fresh', got {inner_state!r}")
        if inner_steps < 1 or eval_inner_steps < 0:
            raise ValueError(f"need inner_steps >= 1 and eval_inner_steps >= 0, got {inner_steps}, {eval_inner_steps}")
        if inner_batch_size is not None and inner_batch_size < 1:
            raise ValueError(f"inner_batch_size must be >= 1 or None (whole task), got {inner_batch_size}")
        if inner_lr <= 0 or outer_lr <= 0 or outer_lr_final < 0:
            raise ValueError(f"need inner_lr > 0, outer_lr > 0, outer_lr_final >= 0; got {inner_lr}, {outer_lr}, "
                             f"{outer_lr_final}")
        super().__init__(ways=ways, backbone=backbone, image_shape=image_shape, inner_steps=inner_steps,
                         eval_inner_steps=eval_inner_steps, first_order=True, meta_balancer=meta_balancer,
                         diagnostics_every=diagnostics_every)
        save_hyperparameters(self, ["backbone"])
        self.automatic_optimization = False
        # the carried inner Adam state: buffers, so that it follows the module's device and is checkpointed
        self.inner_adam = nn.Module()
        if inner_state == "carried" and inner_optimizer == "adam":
            self.inner_adam.register_buffer("step", torch.zeros(()))
            for name, p in self.fast_parameters().items():
                key = name.replace(".", "__")
                self.inner_adam.register_buffer(f"{key}__exp_avg", torch.zeros_like(p))
                self.inner_adam.register_buffer(f"{key}__exp_avg_sq", torch.zeros_like(p))

    def inner_adam_state(self) -> dict[str, dict[str, Tensor]] | None:
        """The carried inner Adam state keyed like :meth:`fast_parameters` (views of the buffers), or ``None`` with
        ``inner_state="fresh"``."""
        buffers = dict(self.inner_adam.named_buffers())
        if not buffers:  # registered only for a carried Adam state
            return None
        return {
            name: {"step": buffers["step"], "exp_avg": buffers[f"{name.replace('.', '__')}__exp_avg"],
                   "exp_avg_sq": buffers[f"{name.replace('.', '__')}__exp_avg_sq"]}
            for name in self.fast_parameters()
        }

    def inner_lr(self, stage: str) -> float:
        """The inner optimizer's step size at ``stage`` ("train", "val" or "test")."""
        hp = self.hparams
        return hp.eval_inner_lr if stage != "train" and hp.eval_inner_lr is not None else hp.inner_lr

    def init_state(self, params: dict[str, Tensor], stage: str) -> torch.optim.Optimizer:
        """The rule's state is the inner optimizer over ``params``; inner Adam with a carried state starts from a copy
        of it."""
        leaves = list(params.values())
        if self.hparams.inner_optimizer == "sgd":
            return torch.optim.SGD(leaves, lr=self.inner_lr(stage))
        inner = torch.optim.Adam(leaves, lr=self.inner_lr(stage), betas=self.hparams.inner_betas)
        carried = self.inner_adam_state()
        if carried is not None:
            for name, p in params.items():
                # a CPU float32 step, as Adam keeps it when not capturable
                inner.state[p] = {k: v.to("cpu", torch.float32, copy=True) if k == "step" else v.clone()
                                  for k, v in carried[name].items()}
        return inner

    def update(self, params: dict[str, Tensor], grads: dict[str, Tensor], loss: Tensor, state: Any, stage: str,
               create_graph: bool) -> tuple[dict[str, Tensor], Any]:
        """One step of the inner optimizer (in place: the parameters are detached leaves of this task)."""
        for name, p in params.items():
            p.grad = grads[name]
        state.step()
        return params, state

    def adapt_task(self, x: Tensor, y: Tensor, steps: int, stage: str, batch_size: int | None,
                   carry: bool = False) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Run ``steps`` inner-optimizer updates from the module's parameters on the task data ``(x, y)``, in
        mini-batches of ``batch_size`` (``None``: all of it) drawn without replacement, reshuffled after each pass.

        With ``inner_state="carried"`` inner Adam starts from a copy of the carried state, which is then replaced by
        the state the task ends with if ``carry`` (training) and left unchanged otherwise (evaluation).

        Returns:
            The adapted parameters phi (detached, keyed like :meth:`fast_parameters`), and the loss and accuracy of
            the last mini-batch before its update (``nan`` when ``steps == 0``).
        """
        params = {name: p.detach().clone().requires_grad_() for name, p in self.fast_parameters().items()}
        n = x.shape[0]
        size = n if batch_size is None else min(batch_size, n)
        # consecutive slices of back-to-back random permutations: passes without replacement over the task's data
        passes = -(-steps * size // n)
        order = torch.cat([torch.randperm(n, device=x.device) for _ in range(passes)]) if passes else \
            torch.zeros(0, dtype=torch.long, device=x.device)
        batches = order[: steps * size].view(steps, size)
        with _autocast_without_cache(x.device.type):  # the inner optimizer updates the leaves in place
            adapted = self.adapt(x, y, steps, stage, create_graph=False, batches=batches, params=params)
        loss = acc = torch.tensor(float("nan"), device=x.device)
        if steps:
            loss, acc = adapted.loss, (adapted.logits.argmax(-1) == y[batches[-1]]).float().mean()
            carried = self.inner_adam_state()
            if carry and carried is not None:
                with torch.no_grad():
                    for name, p in adapted.params.items():
                        for k, v in carried[name].items():
                            v.copy_(adapted.state.state[p][k])
        return {name: p.detach() for name, p in adapted.params.items()}, loss.detach(), acc

    def outer_step_size(self, step: int, total_steps: int) -> float:
        """epsilon_t = epsilon + (epsilon_final - epsilon) * step / total_steps (the paper's linear annealing)."""
        frac = min(step / total_steps, 1.0)
        return self.hparams.outer_lr + (self.hparams.outer_lr_final - self.hparams.outer_lr) * frac

    def configure_optimizers(self):
        total = self.trainer.max_steps
        if total is None or total <= 0:
            raise ValueError("Reptile anneals its outer step size over trainer.max_steps; set trainer.max_steps > 0.")
        # SGD with lr epsilon_t on the gradient theta - mean phi is exactly theta + epsilon_t (mean phi - theta)
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.outer_lr)
        scale = lambda step: self.outer_step_size(step, total) / self.hparams.outer_lr  # noqa: E731
        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, scale)]

    def training_step(self, episode: Episode, batch_idx: int) -> None:
        self.validate_episode(episode)
        self.check_shapes(episode)
        log = self.logs_this_step()  # decided before optimizer.step() advances global_step
        hp = self.hparams
        x = torch.cat([episode.support_x, episode.query_x], 1)  # (B, ways * (shots + queries), C, H, W)
        y = torch.cat([episode.support_y, episode.query_y], 1)
        b = episode.meta_batch_size
        # tasks run one after the other; with a carried inner state each starts from the state the previous left
        phis, losses, accs = zip(*(self.adapt_task(x[i], y[i], hp.inner_steps, "train", hp.inner_batch_size, True)
                                   for i in range(b)), strict=True)
        buffers = list(self.inner_adam.buffers())
        if buffers and self._trainer is not None and self.trainer.world_size > 1:
            # every rank continues from the same, rank-averaged state: one all-reduce for all the buffers
            flat = self.trainer.strategy.reduce(torch.cat([b.flatten() for b in buffers]), reduce_op="mean")
            for buffer, mean in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
                buffer.copy_(mean.view_as(buffer))
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        params = self.fast_parameters()
        if self.meta_balancer_spec is not None:  # aggregate the task directions theta - phi_i (all processes)
            self.build_meta_balancer(b * (self.trainer.world_size if self._trainer is not None else 1))
            rows = torch.stack([torch.cat([(p.detach() - phi[name]).flatten() for name, p in params.items()])
                                for phi in phis])
            direction = self.aggregate_outer(rows).split([p.numel() for p in params.values()])
            for p, d in zip(params.values(), direction, strict=True):
                p.grad = d.view_as(p).to(p.dtype)
        else:
            for name, p in params.items():
                mean_phi = sum(phi[name] for phi in phis) / b
                if self._trainer is not None:  # average over processes, so that every rank applies the same update
                    mean_phi = self.trainer.strategy.reduce(mean_phi, reduce_op="mean")
                p.grad = p.detach() - mean_phi
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if log:
            self.log("train/loss", torch.stack(losses).mean(), prog_bar=True, batch_size=b)
            self.log("train/acc", torch.stack(accs).mean(), prog_bar=True, batch_size=b)

    def task_logits(self, episode: Episode, i: int, stage: str) -> Tensor:
        """Query logits of task ``i`` after adapting on its whole support set (validation / test), leaving the carried
        inner state alone."""
        steps = self.hparams.inner_steps if stage == "train" else self.hparams.eval_inner_steps
        phi, _, _ = self.adapt_task(episode.support_x[i], episode.support_y[i], steps, stage, None)
        return self(episode.query_x[i], phi)
