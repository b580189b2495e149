"""The core of the gradient-based meta-learners: a classifier adapted per task by an inner loop of updates.

A learner is a ``backbone`` followed by a linear ``head`` of ``ways`` outputs. For each task of a meta-batch the
inner loop starts from the learner's parameters theta and runs, on the task's support set,

    loss_t = L(f(x; theta_t), y),   g_t = d loss_t / d theta_t,   (theta_{t+1}, s_{t+1}) = U(theta_t, g_t, loss_t, s_t)

and the query set is classified with the adapted parameters. The update rule ``U`` (with its per-task state ``s``)
is the one thing a method supplies (:meth:`GradientLearner.update`):

=====================  ==========================================================  ======================
method                 update rule ``U``                                           file
=====================  ==========================================================  ======================
MAML, FOMAML           ``theta - alpha * g``                                       :mod:`.maml`
ANIL                   MAML's, on the head only (features computed once per task)  :mod:`.anil`
Meta-SGD               ``theta - alpha ⊙ g``, ``alpha`` meta-learned per coordinate :mod:`.meta_sgd`
learned optimizer      the meta-learner LSTM's ``f_t * theta - i_t * g``           :mod:`.learned_optimizer`
Reptile                inner SGD or Adam on mini-batches; Reptile's outer update   :mod:`.reptile`
=====================  ==========================================================  ======================

Second order (``create_graph=True``) keeps the inner gradients in the graph, so the meta-gradient differentiates
through the updates; first order treats them as constants. Parameters are never rewritten in place: the loop works
on a dictionary of tensors through ``torch.func.functional_call``. Evaluation adapts in the same loop with gradients
re-enabled under Lightning's ``inference_mode``. BatchNorm is transductive with the default
:class:`~lightning_mtl.nn.Conv4` (batch statistics of the current support or query set, as in the papers' codes).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call

from lightning_mtl.batches import Episode
from lightning_mtl.meta.base import EpisodicModule
from lightning_mtl.mtl.balancing import BalancerCallable
from lightning_mtl.nn import Conv4
from lightning_mtl.nn.probe import feature_dim

#: state-dict key prefixes of checkpoints written before the learner's parts were named (``net`` was a Sequential).
_OLD_PREFIXES = {"net.0.": "backbone.", "net.2.": "head.", "inner_adam.0__": "inner_adam.backbone__",
                 "inner_adam.2__": "inner_adam.head__"}


def _rename_old_keys(state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: checkpoints of the ``net.0`` / ``net.2`` layout load into ``backbone`` / ``head``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        for old, new in _OLD_PREFIXES.items():
            if local.startswith(old):
                state_dict[prefix + new + local[len(old):]] = state_dict.pop(key)
                break


def _part(params: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``params`` under ``prefix`` (``"backbone."``), with the prefix removed."""
    n = len(prefix)
    return {name[n:]: p for name, p in params.items() if name.startswith(prefix)}


class Adaptation(NamedTuple):
    """What the inner loop of one task ends with."""

    params: dict[str, Tensor]  #: the adapted parameters (names as in :meth:`GradientLearner.fast_parameters`)
    state: Any  #: the update rule's state after the last step
    loss: Tensor | None  #: the inner loss of the last step, before its update (``None`` after 0 steps)
    logits: Tensor | None  #: the logits of the last step's inputs, before its update


class GradientLearner(EpisodicModule):
    """Base of the gradient-based meta-learners: ``backbone`` → linear ``head``, one inner loop, a method's update rule.

    A subclass implements :meth:`update` (and :meth:`init_state` if its rule keeps a state per task); it may change
    what the loop adapts (:meth:`fast_parameters`), how the loop computes logits (:meth:`inner_logits`), its loss
    (:meth:`inner_loss`) and the step sizes (:meth:`inner_lr`).

    Args:
        ways: classes per episode (size of the head); every stage of the datamodule must have these ways.
        backbone: feature extractor ``(N, C, H, W) → (N, D)``; default :class:`~lightning_mtl.nn.Conv4` without
            running BatchNorm statistics (transductive).
        image_shape: ``(C, H, W)`` of the inputs, used once (eval mode, no gradients) to size the head.
        inner_steps: inner updates per task during training.
        eval_inner_steps: inner updates per task at validation / test.
        first_order: treat the inner gradients as constants (no differentiation through the updates).
        optimizer: outer optimizer factory; default Adam, lr 1e-3.
        lr_scheduler: outer scheduler factory, stepped every meta-batch.
        meta_balancer: gradient aggregator of the per-episode outer gradients of a meta-batch (``pcgrad``, ``mgda``,
            ``upgrad``, ...; see :class:`~lightning_mtl.meta.EpisodicModule`); ``None``: their mean.
        diagnostics_every: with a ``meta_balancer``, log the episode-gradient conflict (``diag/*``) every this many
            steps.

    Raises:
        ValueError: ``ways < 2`` or a negative number of steps.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "task_loss" in cls.__dict__:  # Reptile's name for it before the core: an override would be ignored
            raise TypeError(f"{cls.__name__}.task_loss: the inner-loop objective is now `inner_loss(logits, y)`; "
                            f"rename the method.")

    def __init__(
        self,
        ways: int = 5,
        backbone: nn.Module | None = None,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        inner_steps: int = 1,
        eval_inner_steps: int = 10,
        first_order: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        meta_balancer: str | BalancerCallable | None = None,
        diagnostics_every: int = 100,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, meta_balancer=meta_balancer,
                         diagnostics_every=diagnostics_every)
        if ways < 2:
            raise ValueError(f"{type(self).__name__} needs ways >= 2, got {ways}")
        if inner_steps < 0 or eval_inner_steps < 0:
            raise ValueError(f"inner steps must be >= 0, got {inner_steps} (train) and {eval_inner_steps} (eval)")
        self.ways, self.image_shape = ways, tuple(image_shape)
        self.inner_steps, self.eval_inner_steps, self.first_order = inner_steps, eval_inner_steps, first_order
        self.backbone = backbone if backbone is not None else Conv4(in_channels=image_shape[0],
                                                                    track_running_stats=False)
        self.head = nn.Linear(feature_dim(self.backbone, image_shape), ways)
        self._register_load_state_dict_pre_hook(_rename_old_keys)

    @property
    def fixed_ways(self) -> int:
        return self.ways

    # ---------------------------------------------------------------- the network
    def features(self, x: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        """Backbone features ``(N, D)`` of images ``x`` under ``params`` (the module's own where not given)."""
        x = self.images(x)
        if params is None:
            return self.backbone(x).flatten(1)
        return functional_call(self.backbone, _part(params, "backbone."), (x,), strict=False).flatten(1)

    def forward(self, x: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        """Logits of images ``x`` under ``params`` (keys ``backbone.*`` / ``head.*``; the module's own where not
        given)."""
        z = self.features(x, params)
        return self.head(z) if params is None else functional_call(self.head, _part(params, "head."), (z,),
                                                                   strict=False)

    # ---------------------------------------------------------------- what a method may change
    def fast_parameters(self) -> dict[str, Tensor]:
        """The tensors the inner loop starts from and adapts: every parameter of backbone and head (the module's own
        tensors, so that the meta-gradient reaches them)."""
        return {**dict(self.backbone.named_parameters(prefix="backbone")),
                **dict(self.head.named_parameters(prefix="head"))}

    def inner_logits(self, x: Tensor, create_graph: bool):
        """A function ``params → logits of x`` for the inner loop (ANIL computes the features once here)."""
        return lambda params: self(x, params)

    def inner_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """The inner-loop objective: mean cross-entropy."""
        return F.cross_entropy(logits, y)

    def inner_lr(self, stage: str) -> float:
        """The inner step size at ``stage`` ("train", "val" or "test"), for rules with a scalar step size."""
        raise TypeError(f"{type(self).__name__}'s update rule has no scalar inner step size")

    def init_state(self, params: dict[str, Tensor], stage: str) -> Any:
        """The update rule's state at the start of a task's inner loop (``None``: a stateless rule)."""
        return None

    def update(self, params: dict[str, Tensor], grads: dict[str, Tensor], loss: Tensor, state: Any, stage: str,
               create_graph: bool) -> tuple[dict[str, Tensor], Any]:
        """The method's update rule: ``(theta_{t+1}, s_{t+1})`` from ``theta_t``, its gradients (keyed like
        ``params``) and loss, and the state; ``create_graph``: second order, keep the result differentiable through
        the gradients."""
        raise NotImplementedError(f"{type(self).__name__} must implement update(params, grads, loss, state, stage, "
                                  f"create_graph), its update rule")

    # ---------------------------------------------------------------- the one inner loop
    def adapt(self, x: Tensor, y: Tensor, steps: int, stage: str, create_graph: bool,
              batches: Tensor | None = None, params: dict[str, Tensor] | None = None) -> Adaptation:
        """Run ``steps`` updates on the task data ``(x, y)``.

        Args:
            x, y: the task's inputs and labels.
            steps: number of updates.
            stage: "train", "val" or "test" (the rule may use other step sizes at evaluation).
            create_graph: second order: keep the inner gradients in the graph.
            batches: ``(steps, size)`` indices of ``x`` for each update (mini-batches); ``None``: all of ``x``.
            params: where to start; default :meth:`fast_parameters`.
        """
        params = self.fast_parameters() if params is None else params
        state = self.init_state(params, stage)
        loss = logits = None
        logits_of = self.inner_logits(x, create_graph) if batches is None else None
        for step in range(steps):
            if batches is None:
                logits, target = logits_of(params), y
            else:
                idx = batches[step]
                logits, target = self(x[idx], params), y[idx]
            loss = self.inner_loss(logits, target)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
            params, state = self.update(params, dict(zip(params, grads, strict=True)), loss, state, stage,
                                        create_graph)
        return Adaptation(params, state, loss, logits)

    # ---------------------------------------------------------------- episodes
    def check_shapes(self, episode: Episode) -> None:
        """Refuse episodes whose ways or image shape differ from the ones the head was built for."""
        if episode.ways != self.ways:
            raise ValueError(
                f"episodes are {episode.ways}-way but the {type(self).__name__} head has {self.ways} outputs; give "
                f"the model and every stage of the datamodule the same ways (--model.ways, --data.episodes.train_ways, "
                f"--data.episodes.eval_ways)."
            )
        if tuple(episode.support_x.shape[-3:]) != self.image_shape:
            raise ValueError(
                f"episodes hold images of shape {tuple(episode.support_x.shape[-3:])} but the head was sized for "
                f"image_shape {self.image_shape}; set model image_shape to the datamodule's (C, H, W)."
            )

    def task_logits(self, episode: Episode, i: int, stage: str) -> Tensor:
        """Query logits of task ``i`` after adapting on its support set."""
        train = stage == "train"
        adapted = self.adapt(episode.support_x[i], episode.support_y[i],
                             self.inner_steps if train else self.eval_inner_steps, stage,
                             create_graph=train and not self.first_order)
        return self(episode.query_x[i], adapted.params)  # (ways * queries, ways)

    #: how the tasks of a meta-batch are adapted: ``"loop"`` one after another, ``"vmap"`` all at once with
    #: ``torch.func.vmap`` over ``torch.func.grad_and_value``, ``"auto"`` vmap on CUDA and the loop elsewhere (on CPU
    #: vmap was slower; docs/history.md). Second-order training always loops: through BatchNorm's batch
    #: statistics the meta-gradient of the vmapped inner loop differed from the loop's (by 0.39 to 3.9 on a Conv-4
    #: test meta-gradient, where the loop matches learn2learn and finite differences), while first-order training and
    #: evaluation agree with the loop to 1e-13 (``tests/meta/test_gradient_based.py``). Reptile's in-place inner
    #: optimizer loops too.
    vectorize: str = "auto"

    def _vectorized(self, x: Tensor, stage: str) -> bool:
        mode = self.vectorize
        if mode not in ("auto", "loop", "vmap"):
            raise ValueError(f"vectorize must be 'auto', 'loop' or 'vmap', got {mode!r}")
        exact = stage != "train" or self.first_order  # see `vectorize`
        return exact and (mode == "vmap" or (mode == "auto" and x.device.type == "cuda"))

    def batched_task_logits(self, episode: Episode, stage: str) -> Tensor:
        """Query logits ``(B, Q, ways)`` of every task of the meta-batch adapted at once: the inner loop of
        :meth:`adapt` (the method's own :meth:`update`) under ``torch.func.vmap``; BatchNorm batch statistics stay
        per task (transductive), so the logits equal the loop's (``tests/meta/test_gradient_based.py``). Used for
        first-order training and evaluation (see :attr:`vectorize`)."""
        train = stage == "train"
        steps = self.inner_steps if train else self.eval_inner_steps
        first_order = not train or self.first_order
        start = self.fast_parameters()

        def one_task(params: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
            logits_of = self.inner_logits(sx, not first_order)
            state = self.init_state(params, stage)
            for _ in range(steps):
                grads, loss = torch.func.grad_and_value(lambda p: self.inner_loss(logits_of(p), sy))(params)
                if first_order:
                    grads = {name: g.detach() for name, g in grads.items()}
                params, state = self.update(params, grads, loss, state, stage, not first_order)
            return self(qx, params)

        sx, qx = self.images(episode.support_x), self.images(episode.query_x)
        return torch.func.vmap(one_task, in_dims=(None, 0, 0, 0), randomness="same")(start, sx, episode.support_y, qx)

    def episode_loss_terms(self, episode: Episode, stage: str) -> tuple[list[Tensor], Tensor]:
        """Per-task losses from tasks adapted one by one (graphs that do not meet, so outer-loop balancing pays one
        task's backward per task gradient, not the meta-batch's); see :meth:`EpisodicModule.episode_loss_terms`."""
        self.check_shapes(episode)
        if self._vectorized(episode.support_x, stage):  # one vmapped computation: its graph is shared anyway
            return super().episode_loss_terms(episode, stage)
        logits = [self.task_logits(episode, i, stage) for i in range(episode.meta_batch_size)]
        terms = [self.episode_loss(z[None], episode.query_y[i : i + 1]) for i, z in enumerate(logits)]
        accs = torch.stack([(z.argmax(-1) == episode.query_y[i]).float().mean() for i, z in enumerate(logits)])
        return terms, accs

    def episode_logits(self, episode: Episode, stage: str) -> Tensor:
        self.check_shapes(episode)
        vectorized = self._vectorized(episode.support_x, stage)
        if stage == "train":
            if vectorized:
                return self.batched_task_logits(episode, stage)
            return torch.stack([self.task_logits(episode, i, stage) for i in range(episode.meta_batch_size)])
        # Evaluation runs under no_grad / inference_mode, but adaptation needs gradients: re-enable them locally and
        # clone the inputs, which may be inference tensors.
        with torch.inference_mode(False), torch.enable_grad():
            episode = Episode(*(t.clone() for t in episode[:4]), episode.ways, episode.family)
            if vectorized:
                return self.batched_task_logits(episode, stage).detach()
            logits = [self.task_logits(episode, i, stage).detach() for i in range(episode.meta_batch_size)]
        return torch.stack(logits)
