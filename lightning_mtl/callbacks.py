"""Callbacks used by the recipes."""

from __future__ import annotations

import time
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn


class EpisodeThroughput(Callback):
    """Shows training episodes per second on the progress bar (``train/episodes_per_s``).

    Measured on the host between consecutive batch ends (so it includes data loading), smoothed with an exponential
    moving average; it adds no device synchronisation.

    Args:
        smoothing: weight of the newest measurement in the moving average.
    """

    def __init__(self, smoothing: float = 0.1) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.smoothing = smoothing
        self._last: float | None = None
        self._rate: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None and now > self._last:
            episodes = getattr(batch, "meta_batch_size", 1) * trainer.world_size
            rate = episodes / (now - self._last)
            self._rate = rate if self._rate is None else self.smoothing * rate + (1 - self.smoothing) * self._rate
        self._last = now
        every = trainer.log_every_n_steps
        if self._rate is not None and every > 0 and trainer.global_step % every == 0:  # when step metrics flush
            pl_module.log("train/episodes_per_s", self._rate, prog_bar=True, on_step=True, on_epoch=False,
                          batch_size=1, rank_zero_only=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last = None  # validation time is not training time


class StepTimer(Callback):
    """Wall time of the training steps after ``warmup`` batches (device-synchronised), for benchmarks.

    After ``fit``, :attr:`seconds_per_step` is the mean time of the timed steps.

    Args:
        warmup: batches excluded from the timing.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, 0.0, 0.0, 0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self._sync(pl_module)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.end = time.perf_counter()
        self.steps = trainer.global_step - self.warmup

    @property
    def seconds_per_step(self) -> float:
        return (self.end - self.start) / self.steps


class NonFiniteGuard(Callback):
    """Stops a NaN or Inf loss from reaching the weights: the optimizer step is skipped with a warning, or training
    stops with an error naming the step and the parameters.

    Checked in ``on_before_optimizer_step`` on the gradients the optimizer is about to apply (one reduction and one
    host synchronisation per step), so it covers automatic and manual optimisation (e.g. Reptile's outer update) and,
    under DDP, sees the already averaged gradients: every rank makes the same decision. A skip drops the gradients
    (``grad = None``), which optimizers treat as "no update" for those parameters. With 16-bit mixed precision
    GradScaler already skips overflowing steps and backs off its scale, so the guard stands aside.

    The check costs one host synchronisation per step, which can show in GPU throughput of launch-bound steps:
    ``"off"`` removes it (and the protection).

    It is the one non-finite policy of both halves (``--nonfinite.mode`` in both recipes). A module that computes
    its gradients itself and knows before assigning them whether they are finite (``handles_nonfinite = True``:
    :class:`~lightning_mtl.mtl.MultiTaskModule`) applies the same policy, read with :meth:`policy`, and the guard
    stands aside, sparing a second check.

    Args:
        mode: ``"skip"`` the step with a warning, ``"raise"`` a ``FloatingPointError``, or ``"off"``.
    """

    @staticmethod
    def policy(trainer: L.Trainer | None) -> str:
        """The mode of ``trainer``'s guard; ``"skip"`` (the default) when it has none."""
        callbacks = getattr(trainer, "callbacks", None) or []
        return next((c.mode for c in callbacks if isinstance(c, NonFiniteGuard)), "skip")

    def __init__(self, mode: Literal["skip", "raise", "off"] = "skip") -> None:
        if mode not in ("skip", "raise", "off"):
            raise ValueError(f"NonFiniteGuard mode must be 'skip', 'raise' or 'off', got {mode!r}")
        self.mode = mode
        self.skipped = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if (self.mode == "off" or getattr(trainer.precision_plugin, "scaler", None) is not None
                or getattr(pl_module, "handles_nonfinite", False)):
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        if bool(torch.isfinite(torch.stack([p.grad.float().sum() for p in params]).sum())):
            return  # a sum is finite only if every element is (a huge finite sum may overflow: checked below)
        names = {id(p): n for n, p in pl_module.named_parameters()}
        bad = [names.get(id(p), "?") for p in params if not bool(torch.isfinite(p.grad).all())]
        if not bad:
            return
        where = f"{bad[0]}" + (f" and {len(bad) - 1} other parameter(s)" if len(bad) > 1 else "")
        message = (f"step {trainer.global_step}: non-finite gradient in {where} (a NaN/Inf loss or an overflow)")
        if self.mode == "raise":
            raise FloatingPointError(f"{message}; stopping (nonfinite.mode='raise'). Lower the learning rate, check "
                                     f"the inputs, or use 32-bit precision.")
        self.skipped += 1
        rank_zero_warn(f"{message}; optimizer step skipped ({self.skipped} so far, nonfinite.mode='skip').")
        for p in params:
            p.grad = None


class CompileModules(Callback):
    """Compile a model's feature extractor with ``torch.compile`` (``--trainer.callbacks+=
    lightning_mtl.callbacks.CompileModules``): fewer, fused kernels for the small, launch-bound steps of few-shot and
    multi-task training on a GPU. Off by default: on CPUs, and for the first minutes of any run (compilation), it does
    not pay; measure with ``recipes/benchmarks`` first.

    Compiled in place (``nn.Module.compile``), so parameter names, checkpoints and optimizers are unchanged. Applies
    to the ``backbone`` of the metric-based learners (ProtoNet, Matching, Relation, Siamese, R2D2, MetaOptNet, the
    embedding baseline) and to the ``architecture`` of a multi-task model. The MAML family and Reptile run their
    backbone under ``torch.func.functional_call`` with per-task weights, which this does not cover: they are refused
    rather than silently left eager.

    Args:
        backend: ``torch.compile``'s backend (``"inductor"``; ``"aot_eager"`` traces without code generation, as the
            equality tests do on CPU).
        mode: ``torch.compile``'s mode (``None``, ``"reduce-overhead"`` for CUDA graphs, ``"max-autotune"``).
        dynamic: compile for dynamic shapes (``None``: PyTorch decides).
    """

    def __init__(self, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = None) -> None:
        self.backend, self.mode, self.dynamic = backend, mode, dynamic
        self.compiled: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.compiled:
            return
        from lightning_mtl.meta.gradient_based import GradientLearner

        if isinstance(pl_module, GradientLearner):
            raise ValueError(f"CompileModules does not cover {type(pl_module).__name__}: its inner loop calls the "
                             f"backbone with per-task weights (torch.func.functional_call); remove the callback.")
        for name in ("backbone", "architecture"):
            module = getattr(pl_module, name, None)
            if isinstance(module, torch.nn.Module):
                module.compile(backend=self.backend, mode=self.mode, dynamic=self.dynamic)
                self.compiled.append(name)
        if not self.compiled:
            raise ValueError(f"CompileModules found no `backbone` or `architecture` in {type(pl_module).__name__}")
