"""The episodic base class shared by every meta-learner."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import CatMetric

from lightning_mtl.batches import Episode
from lightning_mtl.checkpointing import WeightsOnlyLoading
from lightning_mtl.loggers import logs_at
from lightning_mtl.meta._checks import check_episode


class EpisodicModule(WeightsOnlyLoading, L.LightningModule):
    """Base class of meta-learners trained and evaluated on :class:`~lightning_mtl.batches.Episode` batches.

    Subclasses implement :meth:`episode_logits`; this class turns the query logits into the loss (:meth:`episode_loss`,
    cross-entropy unless overridden) and logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``,
    ``val/acc_ci95``, ``test/acc``, ``test/acc_ci95`` (1.96 · std / sqrt(n) over the test episodes) and
    ``test/episodes``. Per-episode accuracies are gathered across processes (uneven counts allowed), so under DDP the
    metrics cover exactly the fixed evaluation set.

    Args:
        optimizer: optimizer factory called with the parameters; default Adam with lr 1e-3.
        lr_scheduler: optional scheduler factory called with the optimizer; it steps every training step (meta-batch).
    """

    def __init__(self, optimizer: OptimizerCallable | None = None, lr_scheduler: LRSchedulerCallable | None = None):
        super().__init__()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.episode_accs = torch.nn.ModuleDict({"val": CatMetric(), "test": CatMetric()})

    #: fewest classes per episode the method works with.
    min_ways: int = 2
    #: ways the model is built for (a head sized for them, as MAML's and Reptile's), or None if any number works.
    fixed_ways: int | None = None

    def _check_episode_ways(self, stages: tuple[str, ...]) -> None:
        """Refuse, before the first step, a datamodule whose episodes of ``stages`` have other ways than
        :attr:`fixed_ways` (otherwise a MAML run trains, then fails at its first validation)."""
        ways = self.fixed_ways
        episodes = getattr(getattr(self.trainer, "datamodule", None), "episodes", None)
        if ways is None or not callable(getattr(episodes, "shape", None)):
            return
        for stage in stages:
            if stage == "train" and getattr(episodes, "train_mode", "episodes") != "episodes":
                continue
            data_ways = episodes.shape(stage)[0]
            if data_ways != ways:
                key = "train_ways" if stage == "train" else "eval_ways"
                other = (f", or train for {data_ways}-way episodes with --model.ways {data_ways} --data.train_ways "
                         f"{data_ways} --data.eval_ways {data_ways}" if data_ways >= 2 else "")
                raise ValueError(f"data.{key}={data_ways} but {type(self).__name__}'s head has model.ways={ways} "
                                 f"outputs, and one head serves every stage: set --data.{key} {ways}{other}.")

    def on_fit_start(self) -> None:
        self._check_episode_ways(("train", "val"))

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == TrainerFn.VALIDATING:  # `validate`; a fit was checked in on_fit_start
            self._check_episode_ways(("val",))

    def on_test_start(self) -> None:
        self._check_episode_ways(("test",))

    # ---------------------------------------------------------------- to implement
    def episode_logits(self, episode: Episode, stage: str) -> Tensor:
        """Query logits ``(B, ways * queries, ways)`` of a meta-batch; ``stage`` is "train", "val" or "test"."""
        raise NotImplementedError(f"{type(self).__name__} must implement episode_logits(episode, stage)")

    def episode_loss(self, logits: Tensor, query_y: Tensor) -> Tensor:
        """Loss of a meta-batch from its query ``logits`` ``(B, ways * queries, ways)`` and labels ``query_y``.

        The default is the mean cross-entropy over all queries. Override it for methods trained with another loss
        (e.g. the MSE of Relation Networks); the value is what training minimises and what ``*/loss`` logs.
        """
        return F.cross_entropy(logits.flatten(0, 1).float(), query_y.flatten())

    # ---------------------------------------------------------------- shared machinery
    @staticmethod
    def images(x: Tensor) -> Tensor:
        """uint8 images in [0, 255] → float in [0, 1]; floating inputs pass through."""
        # the default dtype is the model's under Lightning's "*-true" precisions (float32 otherwise)
        return x.to(torch.get_default_dtype()).div_(255) if x.dtype == torch.uint8 else x

    def validate_episode(self, episode: Episode) -> None:
        """Refuse, with a message that names the fix, what is not a well-formed meta-batch of episodes (shapes only:
        no device synchronisation); every learner's episodes pass here before the method sees them.

        Raises:
            TypeError: ``episode`` is not an :class:`~lightning_mtl.batches.Episode`.
            ValueError: see :func:`~lightning_mtl.meta._checks.check_episode` (``min_ways``: :attr:`min_ways`).
        """
        if not isinstance(episode, Episode):  # else an AttributeError deep inside episode_logits
            raise TypeError(f"{type(self).__name__} expected an Episode, got {type(episode).__name__}; yield "
                            f"lightning_mtl.Episode batches from the datamodule (an episodic one, e.g. "
                            f"OmniglotEpisodes).")
        check_episode(episode, type(self).__name__, self.min_ways)

    def _step(self, episode: Episode, stage: str) -> tuple[Tensor, Tensor]:
        self.validate_episode(episode)
        logits = self.episode_logits(episode, stage)  # (B, ways * queries, ways)
        loss = self.episode_loss(logits, episode.query_y)
        accs = (logits.argmax(-1) == episode.query_y).float().mean(1)  # (B,) one accuracy per episode
        return loss, accs

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if isinstance(batch, Episode):  # direct, skipping the generic collection traversal
            return Episode(*(t.to(device, non_blocking=True) for t in batch[:4]), batch.ways)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def logs_this_step(self) -> bool:
        """Whether the trainer writes step metrics after this training step (:func:`~lightning_mtl.loggers.logs_at`,
        asked before the optimizer step advances ``global_step``); ``train/*`` values are those of the step at which
        they are written."""
        return logs_at(self._trainer, self.global_step + 1)

    def training_step(self, episode: Episode, batch_idx: int) -> Tensor:
        loss, accs = self._step(episode, "train")
        if self.logs_this_step():
            b = episode.meta_batch_size
            self.log("train/loss", loss, prog_bar=True, batch_size=b)
            self.log("train/acc", accs.mean(), prog_bar=True, batch_size=b)
        return loss

    def _eval_step(self, episode: Episode, stage: str) -> None:
        loss, accs = self._step(episode, stage)
        self.episode_accs[stage].update(accs)
        self.log(f"{stage}/loss", loss, batch_size=episode.meta_batch_size, sync_dist=True)

    def validation_step(self, episode: Episode, batch_idx: int) -> None:
        self._eval_step(episode, "val")

    def test_step(self, episode: Episode, batch_idx: int) -> None:
        self._eval_step(episode, "test")

    def _eval_epoch_end(self, stage: str) -> tuple[Tensor, Tensor, int]:
        metric = self.episode_accs[stage]
        # an empty update keeps compute() (a collective under DDP) valid on a rank that evaluated no episode
        metric.update(torch.zeros(0, device=self.device))
        accs = metric.compute()  # per-episode accuracies of all ranks
        metric.reset()
        n = accs.numel()
        mean = accs.mean() if n else torch.tensor(float("nan"), device=self.device)
        ci95 = 1.96 * accs.std(unbiased=False) / math.sqrt(n) if n > 1 else torch.zeros((), device=self.device)
        # already identical on every rank; sync_dist only silences Lightning's epoch-level DDP warning
        self.log(f"{stage}/acc", mean, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc_ci95", ci95, prog_bar=True, sync_dist=True)  # the bar shows "acc ± ci95"
        return mean, ci95, n

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        mean, ci95, n = self._eval_epoch_end("test")
        self.log("test/episodes", float(n), sync_dist=True)
        rank_zero_info(f"test accuracy: {100 * mean.item():.2f}% ± {100 * ci95.item():.2f}% (95% CI over {n} episodes)")

    def configure_optimizers(self):
        optimizer = (
            self.optimizer_factory(self.parameters())
            if self.optimizer_factory is not None
            else torch.optim.Adam(self.parameters(), lr=1e-3)
        )
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
