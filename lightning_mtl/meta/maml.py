"""Model-Agnostic Meta-Learning (MAML) and first-order MAML.

Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017,
arXiv:1703.03400.

For each task: theta'_i = theta - alpha * grad_theta L_support(theta) (repeated ``inner_steps`` times), then the meta
loss is the mean over the meta-batch of L_query(theta'_i), minimised over theta by the outer optimizer. The second-
order meta-gradient differentiates through the inner updates; first-order MAML (``first_order=True``) treats the
inner gradients as constants, so the meta-gradient is grad L_query evaluated at theta'_i.

Implemented with ``torch.func.functional_call`` on a parameter dictionary: module parameters are never rewritten in
place. BatchNorm is transductive as in the paper's code: batch statistics of the current support or query set are
always used (the default backbone keeps no running statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call

from lightning_mtl.batches import Episode
from lightning_mtl.checkpointing import save_hyperparameters
from lightning_mtl.meta.base import EpisodicModule
from lightning_mtl.nn import Conv4
from lightning_mtl.nn.probe import feature_dim


class MAML(EpisodicModule):
    """MAML / FOMAML classifier: ``backbone`` followed by a linear head of ``ways`` outputs, all adapted per task.

    Args:
        ways: classes per episode (size of the head); must match the datamodule's ways.
        backbone: feature extractor ``(N, C, H, W) → (N, D)``; default :class:`Conv4` without running BatchNorm
            statistics (transductive).
        image_shape: ``(C, H, W)`` of the inputs, used once to size the head.
        inner_lr: step size alpha of the inner updates during training.
        inner_steps: inner updates during training.
        eval_inner_lr: step size at validation / test; ``None`` uses ``inner_lr``.
        eval_inner_steps: inner updates at validation / test (the paper's code uses 10 for Omniglot).
        first_order: FOMAML: do not differentiate through the inner updates.
        optimizer: outer optimizer factory; default Adam, lr 1e-3.
        lr_scheduler: outer scheduler factory, stepped every meta-batch.
    """

    @property
    def fixed_ways(self) -> int:
        return self.hparams.ways

    def __init__(
        self,
        ways: int = 5,
        backbone: nn.Module | None = None,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        eval_inner_lr: float | None = None,
        eval_inner_steps: int = 10,
        first_order: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        if ways < 2:
            raise ValueError(f"{type(self).__name__} needs ways >= 2, got {ways}")
        if inner_steps < 0 or eval_inner_steps < 0:
            raise ValueError(f"inner steps must be >= 0, got {inner_steps} (train) and {eval_inner_steps} (eval)")
        save_hyperparameters(self, ["backbone", "optimizer", "lr_scheduler"])
        backbone = backbone if backbone is not None else Conv4(in_channels=image_shape[0], track_running_stats=False)
        self.net = nn.Sequential(backbone, nn.Flatten(), nn.Linear(feature_dim(backbone, image_shape), ways))

    def forward(self, x: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        """Logits of images ``x`` under ``params`` (the module's own parameters if ``None``)."""
        x = self.images(x)
        if params is None:
            return self.net(x)
        return functional_call(self.net, params, (x,), strict=False)

    def adapt(self, x: Tensor, y: Tensor, steps: int, lr: float, create_graph: bool) -> dict[str, Tensor]:
        """Parameters after ``steps`` gradient steps on the support set ``(x, y)``.

        With ``create_graph=True`` the result is differentiable (second order) with respect to the module's
        parameters; otherwise the inner gradients are treated as constants (first order).
        """
        params = dict(self.net.named_parameters())
        for _ in range(steps):
            loss = F.cross_entropy(self(x, params), y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
            params = {name: p - lr * g for (name, p), g in zip(params.items(), grads, strict=True)}
        return params

    def inner_lr(self, stage: str) -> float:
        """The inner step size at ``stage`` ("train", "val" or "test")."""
        hp = self.hparams
        return hp.eval_inner_lr if stage != "train" and hp.eval_inner_lr is not None else hp.inner_lr

    def _task_logits(self, episode: Episode, i: int, steps: int, lr: float, create_graph: bool) -> Tensor:
        params = self.adapt(episode.support_x[i], episode.support_y[i], steps, lr, create_graph)
        return self(episode.query_x[i], params)  # (ways * queries, ways)

    def episode_logits(self, episode: Episode, stage: str) -> Tensor:
        if episode.ways != self.hparams.ways:
            raise ValueError(
                f"episodes are {episode.ways}-way but the {type(self).__name__} head has {self.hparams.ways} outputs; "
                f"give the model and every stage of the datamodule the same ways (--model.ways, --data.train_ways, "
                f"--data.eval_ways)."
            )
        hp = self.hparams
        if tuple(episode.support_x.shape[-3:]) != tuple(hp.image_shape):
            raise ValueError(
                f"episodes hold images of shape {tuple(episode.support_x.shape[-3:])} but the head was sized for "
                f"image_shape {tuple(hp.image_shape)}; set model image_shape to the datamodule's (C, H, W)."
            )
        if stage == "train":
            create_graph = not hp.first_order
            return torch.stack(
                [self._task_logits(episode, i, hp.inner_steps, self.inner_lr(stage), create_graph)
                 for i in range(episode.meta_batch_size)]
            )
        lr = self.inner_lr(stage)
        # Evaluation runs under no_grad / inference_mode, but adaptation needs gradients: re-enable them locally and
        # clone the inputs, which may be inference tensors.
        with torch.inference_mode(False), torch.enable_grad():
            episode = Episode(*(t.clone() for t in episode[:4]), episode.ways)
            logits = [self._task_logits(episode, i, hp.eval_inner_steps, lr, False).detach()
                      for i in range(episode.meta_batch_size)]
        return torch.stack(logits)
