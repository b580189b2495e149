"""TR-MAML: task-robust MAML, a min-max over a finite set of task families.

Collins, Mokhtari & Shakkottai, "Task-Robust Model-Agnostic Meta-Learning", NeurIPS 2020, arXiv:2002.04766.

MAML minimises the average meta-loss over tasks; TR-MAML minimises the worst one over ``m`` task families (for
Omniglot, the alphabets):

    min_theta max_{p in simplex} sum_f p_f F_f(theta),      F_f = the MAML meta-loss of family f.

Its Algorithm 1 is a stochastic gradient descent-ascent. Each step draws a meta-batch of episodes ``i`` with families
``f_i`` (uniformly, as ``data.family_episodes`` does) and, with the meta-losses ``L_i`` at the current ``theta``:

    theta <- theta - alpha * (m / B) sum_i p_{f_i} grad L_i                 (the outer optimizer; here its loss)
    p     <- Proj_simplex(p + beta * (m / B) sum_i L_i e_{f_i})              (projected ascent on the weights)

With uniform weights ``p = 1/m`` the first line is MAML's update. ``p`` is a buffer (checkpointed, identical on every
rank: under DDP the ascent uses the losses of the global meta-batch). Validation and test log each family's accuracy
and the worst one's (``val/worst_family_acc``; :class:`~lightning_mtl.meta.EpisodicModule`), the quantity TR-MAML
improves.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl.batches import Episode
from lightning_mtl.checkpointing import save_hyperparameters
from lightning_mtl.meta.maml import MAML
from lightning_mtl.mtl import gradients as G
from lightning_mtl.mtl.balancing import BalancerCallable


def project_to_simplex(v: Tensor) -> Tensor:
    """The Euclidean projection of ``v`` ``(m,)`` onto the probability simplex ``{p >= 0, sum p = 1}``:
    ``max(v - tau, 0)`` with the threshold ``tau`` found by sorting (Held, Wolfe & Crowder 1974; Duchi et al., ICML
    2008)."""
    u = torch.sort(v, descending=True).values
    cumulative = u.cumsum(0) - 1
    k = torch.arange(1, v.numel() + 1, device=v.device, dtype=v.dtype)
    rho = int((u - cumulative / k > 0).nonzero().max())
    return (v - cumulative[rho] / (rho + 1)).clamp_min(0)


def family_weighted_loss(weights: Tensor, families: Tensor, losses: Tensor) -> Tensor:
    """TR-MAML's outer loss of a meta-batch: ``(m / B) sum_i p_{f_i} L_i`` (MAML's mean when ``p`` is uniform)."""
    return (weights.detach()[families] * weights.numel() * losses).mean()


def family_ascent(weights: Tensor, families: Tensor, losses: Tensor, lr: float) -> Tensor:
    """The projected ascent step on the family weights: ``Proj(p + lr (m / B) sum_i L_i e_{f_i})``.

    Under DDP the per-family loss sums and ``B`` are those of the global meta-batch (one all-reduce), so that every
    rank takes the same step and keeps the same weights; in one process this is the local meta-batch.
    """
    m = weights.numel()
    sums = torch.zeros(m + 1, dtype=weights.dtype, device=weights.device)  # per-family sums, then B
    sums[:m].index_add_(0, families, losses.detach().to(weights.dtype))
    sums[m] = losses.numel()
    G.all_reduce_(sums, op="sum")
    return project_to_simplex(weights + lr * m * sums[:m] / sums[m])


class TRMAML(MAML):
    """TR-MAML classifier: MAML whose outer loss weights the task families by adversarial simplex weights.

    Trains on episodes that carry their family (``Episode.family``: ``--data.family_episodes true``).

    Args:
        ways: classes per episode (size of the head); taken from the data by the recipes.
        backbone: feature extractor; default Conv-4 with transductive BatchNorm.
        image_shape: ``(C, H, W)`` of the inputs; taken from the data by the recipes.
        families: number of training families ``m``; ``None`` takes the training sampler's number of families
            (``configure_model``).
        family_lr: step size ``beta`` of the projected ascent on the family weights.
        inner_lr: MAML's inner step size (training).
        inner_steps: MAML's inner steps (training).
        eval_inner_lr: inner step size at validation / test; ``None`` uses ``inner_lr``.
        eval_inner_steps: inner steps at validation / test.
        first_order: first-order MAML inside.
        optimizer: outer optimizer factory; default Adam, lr 1e-3.
        lr_scheduler: outer scheduler factory.
        meta_balancer: refused: TR-MAML's weighting is its own outer-loop balancing.
        diagnostics_every: unused (see ``meta_balancer``).

    Raises:
        ValueError: ``families < 2``, ``family_lr <= 0``, or a ``meta_balancer``.
    """

    def __init__(
        self,
        ways: int = 5,
        backbone: nn.Module | None = None,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        families: int | None = None,
        family_lr: float = 0.01,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        eval_inner_lr: float | None = None,
        eval_inner_steps: int = 10,
        first_order: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        meta_balancer: str | BalancerCallable | None = None,
        diagnostics_every: int = 100,
    ) -> None:
        if families is not None and families < 2:
            raise ValueError(f"TRMAML needs at least 2 task families, got families={families}")
        if family_lr <= 0:
            raise ValueError(f"family_lr must be > 0, got {family_lr}")
        if meta_balancer is not None:
            raise ValueError("TRMAML weights the task families itself; drop meta_balancer (or use MAML with it).")
        super().__init__(ways=ways, backbone=backbone, image_shape=image_shape, inner_lr=inner_lr,
                         inner_steps=inner_steps, eval_inner_lr=eval_inner_lr, eval_inner_steps=eval_inner_steps,
                         first_order=first_order, optimizer=optimizer, lr_scheduler=lr_scheduler)
        save_hyperparameters(self, ["backbone", "optimizer", "lr_scheduler"])
        self.register_buffer("family_weights", None if families is None else torch.full((families,), 1.0 / families))

    def configure_model(self) -> None:
        """With ``families=None``, one weight per family of the datamodule's training sampler."""
        if self.family_weights is not None:
            return
        sampler = getattr(getattr(self.trainer, "datamodule", None), "samplers", {}).get("train")
        families = getattr(sampler, "num_families", 0)
        if families < 2:
            raise ValueError("TRMAML draws its weights over task families, but the training episodes carry none; set "
                             "--data.family_episodes true (or pass model families).")
        self.family_weights = torch.full((families,), 1.0 / families, device=self.device)
        self.hparams["families"] = families  # so that checkpoints rebuild the buffer at load time

    def on_fit_start(self) -> None:
        """Refuse, before the first step, training data whose families the weights do not cover."""
        super().on_fit_start()
        sampler = getattr(getattr(self.trainer, "datamodule", None), "samplers", {}).get("train")
        families = getattr(sampler, "num_families", None)
        if families is not None and families > self.family_weights.numel():
            raise ValueError(f"the training data has {families} task families but the model weighs "
                             f"{self.family_weights.numel()}; set model families to {families} (or leave it unset).")

    def training_step(self, episode: Episode, batch_idx: int) -> Tensor:
        self.validate_episode(episode)
        if episode.family is None:
            raise ValueError("TRMAML trains on episodes labelled with their family; set --data.family_episodes true.")
        losses, accs = self.episode_losses(episode, "train")
        loss = family_weighted_loss(self.family_weights, episode.family, losses)
        with torch.no_grad():
            self.family_weights.copy_(family_ascent(self.family_weights, episode.family, losses,
                                                    self.hparams.family_lr))
        if self.logs_this_step():
            b = episode.meta_batch_size
            self.log("train/loss", loss, prog_bar=True, batch_size=b)
            self.log("train/mean_loss", losses.detach().mean(), batch_size=b)
            self.log("train/acc", accs.mean(), prog_bar=True, batch_size=b)
            self.log("train/max_family_weight", self.family_weights.max())
        return loss
