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
from lightning_mtl.mtl import gradients as G
from lightning_mtl.mtl.balancing import BalancerCallable, GradientAggregator, balancer_class, resolve_balancer
from lightning_mtl.mtl.diagnostics import gradient_diagnostics


class EpisodicModule(WeightsOnlyLoading, L.LightningModule):
    """Base class of meta-learners trained and evaluated on :class:`~lightning_mtl.batches.Episode` batches.

    Subclasses implement :meth:`episode_logits`; this class turns the query logits into the loss (:meth:`episode_loss`,
    cross-entropy unless overridden) and logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``,
    ``val/acc_ci95``, ``test/acc``, ``test/acc_ci95`` (1.96 · std / sqrt(n) over the test episodes) and
    ``test/episodes``. Per-episode accuracies are gathered across processes (uneven counts allowed), so under DDP the
    metrics cover exactly the fixed evaluation set.

    The episodes of a training meta-batch are tasks whose outer gradients can conflict, as multi-task gradients do.
    With ``meta_balancer`` (any multi-task gradient aggregator: ``pcgrad``, ``mgda``, ``upgrad``, ``cagrad``,
    ``nash_mtl``, ... by name or class path) the per-episode outer gradients form a ``(episodes, parameters)`` matrix,
    gathered over processes in rank order, that the aggregator turns into the update; ``diag/*`` logs their conflict
    (cosines, norm ratios) every ``diagnostics_every`` steps. Without one (the default) the update is the gradient of
    the mean loss, exactly as before, at no extra cost.

    Args:
        optimizer: optimizer factory called with the parameters; default Adam with lr 1e-3.
        lr_scheduler: optional scheduler factory called with the optimizer; it steps every training step (meta-batch).
        meta_balancer: gradient aggregator of the per-episode outer gradients of a training meta-batch; ``None``:
            their mean (the usual meta-gradient).
        diagnostics_every: with a ``meta_balancer``, log the episode-gradient diagnostics every this many steps.
    """

    def __init__(self, optimizer: OptimizerCallable | None = None, lr_scheduler: LRSchedulerCallable | None = None,
                 meta_balancer: str | BalancerCallable | None = None, diagnostics_every: int = 100):
        super().__init__()
        if diagnostics_every < 0:
            raise ValueError(f"diagnostics_every must be >= 0, got {diagnostics_every}")
        if isinstance(meta_balancer, str):
            balancer_class(meta_balancer)  # an unknown name fails here, listing the valid ones
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.episode_accs = torch.nn.ModuleDict({"val": CatMetric(), "test": CatMetric()})
        self.episode_families = torch.nn.ModuleDict({"val": CatMetric(), "test": CatMetric()})
        self.meta_balancer_spec, self.diagnostics_every = meta_balancer, diagnostics_every
        self.meta_balancer: GradientAggregator | None = None  # built for the global meta-batch size (setup)

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
                other = (f", or train for {data_ways}-way episodes with --model.ways {data_ways} "
                         f"--data.episodes.train_ways {data_ways} --data.episodes.eval_ways {data_ways}"
                         if data_ways >= 2 else "")
                raise ValueError(f"data.episodes.{key}={data_ways} but {type(self).__name__}'s head has "
                                 f"model.ways={ways} outputs, and one head serves every stage: set "
                                 f"--data.episodes.{key} {ways}{other}.")

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

    def embed_episode(self, episode: Episode) -> tuple[Tensor, Tensor]:
        """Support and query embeddings ``(B, ways * shots, *F)`` and ``(B, ways * queries, *F)`` of a meta-batch from
        one forward pass of ``self`` over all its images (so BatchNorm sees support and query together, as in the
        papers' code); ``*F`` is whatever the embedding's output shape is (a vector, a feature map)."""
        b, n_support = episode.support_y.shape
        z = self(torch.cat([episode.support_x.flatten(0, 1), episode.query_x.flatten(0, 1)]))
        return z[: b * n_support].unflatten(0, (b, n_support)), z[b * n_support :].unflatten(0, (b, -1))

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
            family = None if batch.family is None else batch.family.to(device, non_blocking=True)
            return Episode(*(t.to(device, non_blocking=True) for t in batch[:4]), batch.ways, family)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def logs_this_step(self) -> bool:
        """Whether the trainer writes step metrics after this training step (:func:`~lightning_mtl.loggers.logs_at`,
        asked before the optimizer step advances ``global_step``); ``train/*`` values are those of the step at which
        they are written."""
        return logs_at(self._trainer, self.global_step + 1)

    # ---------------------------------------------------------------- outer-loop balancing
    def build_meta_balancer(self, episodes: int) -> None:
        """Build :attr:`meta_balancer` for a global meta-batch of ``episodes`` (rows ``episode0 ...``).

        Raises:
            ValueError: the balancer is not a gradient aggregator (loss weightings weight fixed tasks, not the
                episodes of a meta-batch, which change every step).
        """
        if self.meta_balancer_spec is None or self.meta_balancer is not None:
            return
        balancer = resolve_balancer(self.meta_balancer_spec, [f"episode{i}" for i in range(episodes)])
        if not isinstance(balancer, GradientAggregator):
            raise ValueError(f"meta_balancer must be a gradient aggregator (e.g. pcgrad, mgda, upgrad, cagrad, "
                             f"nash_mtl), got the loss weighting {type(balancer).__name__}: a loss weighting weights "
                             f"fixed tasks, and the episodes of a meta-batch change every step.")
        self.meta_balancer = balancer.to(self.device)

    def setup(self, stage: str) -> None:
        """Build :attr:`meta_balancer` before training when an episodic datamodule gives the meta-batch size (so a
        wrong balancer fails before the first step); otherwise it is built from the first training batch."""
        episodes = getattr(getattr(self.trainer, "datamodule", None), "episodes", None)
        if stage == "fit" and self.meta_balancer_spec is not None and callable(getattr(episodes, "shape", None)):
            self.build_meta_balancer(episodes.shape("train")[3] * self.trainer.world_size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.meta_balancer is not None:  # rebuilt from it before the state dict loads (its buffers are in it)
            checkpoint["meta_balancer_episodes"] = len(self.meta_balancer.tasks)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "meta_balancer_episodes" in checkpoint:
            self.build_meta_balancer(int(checkpoint["meta_balancer_episodes"]))

    def episode_losses(self, episode: Episode, stage: str) -> tuple[Tensor, Tensor]:
        """Per-episode losses ``(B,)`` and accuracies ``(B,)`` of a meta-batch (:meth:`episode_loss` of each episode
        alone); a method whose training loss is not that (Siamese networks) overrides it."""
        logits = self.episode_logits(episode, stage)
        losses = torch.stack([self.episode_loss(logits[i : i + 1], episode.query_y[i : i + 1])
                              for i in range(episode.meta_batch_size)])
        return losses, (logits.argmax(-1) == episode.query_y).float().mean(1)

    def episode_loss_terms(self, episode: Episode, stage: str) -> tuple[list[Tensor], Tensor]:
        """The per-episode losses as ``B`` scalars, and the accuracies ``(B,)``: what outer-loop balancing
        differentiates episode by episode. The default unbinds :meth:`episode_losses` (episodes that share one forward
        pass share its backward too, so each episode's gradient costs a whole meta-batch's backward); a method that
        computes its episodes apart returns losses whose graphs do not meet (the gradient-based learners), so that
        each episode's gradient costs one episode's backward."""
        losses, accs = self.episode_losses(episode, stage)
        return list(losses.unbind()), accs

    def aggregate_outer(self, rows: Tensor, losses: Tensor | None = None) -> Tensor:
        """The update direction of this process's ``(B, P)`` per-episode outer gradients: the rows of every process
        (rank order) aggregated by :attr:`meta_balancer`, identical on every rank; diagnostics when due."""
        matrix = rows
        if G.distributed():
            parts = [torch.empty_like(rows) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(parts, rows.contiguous())
            matrix = torch.cat(parts)
            if losses is not None:
                gathered = [torch.empty_like(losses) for _ in parts]
                torch.distributed.all_gather(gathered, losses.contiguous())
                losses = torch.cat(gathered)
        if matrix.shape[0] != len(self.meta_balancer.tasks):
            raise ValueError(f"a training meta-batch of {matrix.shape[0]} episodes (all processes) but meta_balancer "
                             f"was built for {len(self.meta_balancer.tasks)}; keep data.episodes.meta_batch_size "
                             f"fixed.")
        with torch.autocast(self.device.type, enabled=False):
            if matrix.dtype in (torch.float16, torch.bfloat16):  # aggregated in float32 at least
                matrix, losses = matrix.float(), None if losses is None else losses.float()
            direction = (self.meta_balancer(matrix, losses.to(matrix.dtype)) if self.meta_balancer.needs_losses
                         else self.meta_balancer(matrix))
            every = self.diagnostics_every
            if every and (self.global_step + 1) % every == 0:  # a logging step when every is a multiple of it
                for key, value in gradient_diagnostics(matrix, self.meta_balancer.tasks).items():
                    self.log(f"diag/{key}", value)
        return direction

    def _balanced_training_step(self, episode: Episode) -> Tensor:
        """One training step whose update is :meth:`aggregate_outer` of the per-episode outer gradients: returns a
        surrogate loss whose gradient is that update (Lightning then does the backward pass, scaling and step)."""
        self.validate_episode(episode)
        terms, accs = self.episode_loss_terms(episode, "train")
        params = [p for p in self.parameters() if p.requires_grad]
        rows = []
        for i, term in enumerate(terms):
            grads = torch.autograd.grad(term, params, retain_graph=i + 1 < len(terms), allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                   for g, p in zip(grads, params, strict=True)]))
        losses = torch.stack([term.detach() for term in terms])
        direction = self.aggregate_outer(torch.stack(rows), losses)
        offsets = torch.tensor([0, *(p.numel() for p in params)]).cumsum(0).tolist()
        surrogate = sum((p * direction[a:b].view_as(p).to(p.dtype)).sum()
                        for p, a, b in zip(params, offsets[:-1], offsets[1:], strict=True))
        # the surrogate's value is meaningless; the logged loss is the meta-batch's mean loss
        if self.logs_this_step():
            b = episode.meta_batch_size
            self.log("train/loss", losses.detach().mean(), prog_bar=True, batch_size=b)
            self.log("train/acc", accs.mean(), prog_bar=True, batch_size=b)
        return surrogate

    def training_step(self, episode: Episode, batch_idx: int) -> Tensor:
        if self.meta_balancer_spec is not None:
            if self.meta_balancer is None:  # trained outside a Trainer.fit setup (tests): size from this batch
                self.build_meta_balancer(episode.meta_batch_size * (self.trainer.world_size if self._trainer else 1))
            return self._balanced_training_step(episode)
        loss, accs = self._step(episode, "train")
        if self.logs_this_step():
            b = episode.meta_batch_size
            self.log("train/loss", loss, prog_bar=True, batch_size=b)
            self.log("train/acc", accs.mean(), prog_bar=True, batch_size=b)
        return loss

    def _eval_step(self, episode: Episode, stage: str) -> None:
        loss, accs = self._step(episode, stage)
        self.episode_accs[stage].update(accs)
        if episode.family is not None:  # per-family accuracy (TR-MAML's alphabets, multi-domain episodes)
            self.episode_families[stage].update(episode.family.float())
        self.log(f"{stage}/loss", loss, batch_size=episode.meta_batch_size, sync_dist=True)

    def validation_step(self, episode: Episode, batch_idx: int) -> None:
        self._eval_step(episode, "val")

    def test_step(self, episode: Episode, batch_idx: int) -> None:
        self._eval_step(episode, "test")

    def _family_accuracies(self, stage: str, accs: Tensor) -> None:
        """``<stage>/<family>/acc`` ± ``_ci95`` of every episode family (names from the datamodule's
        ``family_names(stage)`` when it has them) and ``<stage>/worst_family_acc``, when the episodes carry families."""
        metric = self.episode_families[stage]
        metric.update(torch.zeros(0, device=self.device))
        families = metric.compute()
        metric.reset()
        if not isinstance(families, Tensor) or not families.numel() or families.numel() != accs.numel():
            return  # episodes without families (torchmetrics gives an empty list when nothing was gathered)
        families = families.long()
        names_of = getattr(getattr(self._trainer, "datamodule", None), "family_names", None)
        names = names_of(stage) if callable(names_of) else []
        worst = None
        for k in families.unique().tolist():
            values = accs[families == k].float()
            name = names[k] if k < len(names) else f"family{k}"
            mean = values.mean()
            ci = 1.96 * values.std(unbiased=False) / math.sqrt(values.numel()) if values.numel() > 1 else mean * 0
            self.log(f"{stage}/{name}/acc", mean, sync_dist=True)
            self.log(f"{stage}/{name}/acc_ci95", ci, sync_dist=True)
            worst = mean if worst is None else torch.minimum(worst, mean)
        self.log(f"{stage}/worst_family_acc", worst, sync_dist=True)

    def _eval_epoch_end(self, stage: str) -> tuple[Tensor, Tensor, int]:
        metric = self.episode_accs[stage]
        # an empty update keeps compute() (a collective under DDP) valid on a rank that evaluated no episode
        metric.update(torch.zeros(0, device=self.device))
        accs = metric.compute()  # per-episode accuracies of all ranks
        metric.reset()
        self._family_accuracies(stage, accs)
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
