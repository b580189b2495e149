"""Checkpoints that resume exactly: atomic writes, weights-only loads, a ``last.ckpt`` every N steps, RNG states.

What Lightning restores by itself on ``fit(ckpt_path=...)``: weights and buffers (hence the balancers' state, which
lives in buffers and parameters), optimizers, LR schedulers, the loops' progress (global step, epoch, batch index),
callback and datamodule ``state_dict`` s. What it does not, and this module adds:

* the global random states (python, numpy, torch, CUDA), per rank: :class:`RNGStates`;
* a ``last.ckpt`` refreshed every ``every_n_train_steps`` optimizer steps whose metrics and random states are those
  of the step it holds: :class:`RecipeCheckpoint`;
* writes that a kill cannot truncate: :class:`AtomicCheckpointIO`; Lightning's local save renames a temporary file
  from the system temp folder, which becomes a plain copy into ``last.ckpt`` when that folder is another file system
  (a tmpfs ``/tmp``), leaves the temporary behind when killed, and never calls ``fsync``.

The position of the training data is the datamodules' part (their ``state_dict``, see
:func:`lightning_mtl.datamodules._resume.train_position`).
"""

from __future__ import annotations

import inspect
import io
import os
import random
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_warn


def save_hyperparameters(module: L.LightningModule, objects: list[str]) -> None:
    """``module.save_hyperparameters()`` from the calling ``__init__``, with ``objects`` (arguments that are module
    instances or factories: backbones, optimizers, schedulers) handled so that ``load_from_checkpoint`` rebuilds them.

    Built by LightningCLI (the recipes), the module receives its configuration, in which those arguments are plain
    ``class_path`` / ``init_args`` dicts: it is kept whole, and ``<Class>.load_from_checkpoint(path)`` re-creates the
    backbone it was trained with through Lightning's CLI instantiator (``_instantiator`` in the hyper-parameters).
    Built in Python, the objects themselves cannot be saved as hyper-parameters (their weights are in the state
    dict): they are left out, and loading needs them passed again (``load_from_checkpoint(path, backbone=...)``).
    """
    given = _given_hyperparameters.get() is not None  # set by LightningCLI while it instantiates the model
    frame = inspect.currentframe().f_back
    objects = list(objects)
    balancer = frame.f_locals.get("meta_balancer")
    if balancer is not None and not isinstance(balancer, str):  # a class path's callable, not a registered name
        objects.append("meta_balancer")
    module.save_hyperparameters(ignore=[] if given else objects, frame=frame)


class WeightsOnlyLoading:
    """Mixin: ``load_from_checkpoint`` defaults to ``weights_only=True``: our checkpoints hold only tensors and plain
    values (see :class:`AtomicCheckpointIO`), so loading needs no unpickling of code and Lightning's warning about the
    default does not apply. Pass ``weights_only=False`` only for a trusted checkpoint that pickles other objects."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only: bool | None = True, **kwargs: Any):
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, weights_only=weights_only, **kwargs)


#: bytes per ``os.write`` call of :class:`AtomicCheckpointIO`.
CHUNK = 1 << 24


def write_atomic(data: bytes | memoryview, path: str | Path) -> None:
    """Write ``data`` to ``path`` so that ``path`` is at every moment absent, the old file or the new one.

    The bytes go to ``path.tmp`` in the same folder (so the rename never crosses file systems), are flushed to disk
    (``fsync``), then ``os.replace`` swaps the file in and the folder entry is flushed too.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view[:CHUNK]):]  # os.write may write less than asked
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if os.name == "posix":  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.fabric.plugins.io.torch_io.TorchCheckpointIO` that writes local checkpoints with
    :func:`write_atomic` and loads with ``weights_only=True`` unless told otherwise.

    Remote paths (``s3://`` ...) keep Lightning's fsspec transaction. A checkpoint that pickles arbitrary objects
    loads only with an explicit ``weights_only=False`` (``--weights_only false`` in the recipes), for trusted files.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(buffer.getbuffer(), path)

    def load_checkpoint(
        self, path, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location, True if weights_only is None else weights_only)


class RecipeCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` whose ``every_n_train_steps`` refreshes ``last.ckpt``.

    The best ``save_top_k`` checkpoints by ``monitor`` are still chosen after each validation (``every_n_epochs``
    validations), where the metric belongs to the weights being saved: with Lightning's own ``every_n_train_steps``
    they would be chosen at training steps, by the metric of an earlier validation, and nothing would be written before
    the first validation. A ``last.ckpt`` due at a step followed by a validation is written after that validation, so
    that a resumed run neither skips nor repeats it and starts from the random state it left; one due at the last step
    of an epoch (not followed by a validation) is written after the next step, as Lightning does not resume exactly
    from there. The arguments are those of ``ModelCheckpoint`` but ``every_n_train_steps``.
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | Literal["link"] | None = None,
        save_top_k: int = 1,
        save_on_exception: bool = False,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
    ) -> None:
        """
        Args:
            every_n_train_steps: write ``last.ckpt`` every this many optimizer steps (None or 0, only when Lightning
                writes it, e.g. with a new best); needs ``save_last``. The best checkpoints are still chosen after
                validations.
        """
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        super().__init__(dirpath, filename, monitor, verbose, save_last, save_top_k, save_on_exception,
                         save_weights_only, mode, auto_insert_metric_name, None, train_time_interval, every_n_epochs,
                         save_on_train_epoch_end, enable_version_counter)
        self.every_n_train_steps = every_n_train_steps or 0
        self._last_due_after_validation = self._last_due_next_step = False
        self._last_written_at = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        every = self.every_n_train_steps
        due = self._last_due_next_step or (every and trainer.global_step % every == 0)
        if not due or self._should_skip_saving_checkpoint(trainer):
            return
        self._last_due_next_step = False
        if _validation_follows(trainer):
            self._last_due_after_validation = True
        elif (trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
              and not 0 <= trainer.max_steps <= trainer.global_step):
            # Lightning resumes such a checkpoint with the right weights but skips the next on_train_epoch_start
            # and miscounts the epochs: write it after the next step instead
            self._last_due_next_step = True
        else:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)  # the top-k, and last.ckpt with a new best
        if self._last_due_after_validation and not trainer.sanity_checking:
            self._last_due_after_validation = False
            if self._last_written_at != trainer.global_step:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        if trainer.fast_dev_run:
            # a debugging run leaves a previous run's checkpoints alone: Lightning skips its other saves under
            # fast_dev_run, but (2.6) still writes last.ckpt in on_train_end, orphaning the previous best
            return
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_at = trainer.global_step


def _validation_follows(trainer: L.Trainer) -> bool:
    """Whether the fit loop validates right after the current training batch (Lightning's own decision)."""
    loop = trainer.fit_loop
    return loop.epoch_loop._should_check_val_fx(loop._data_fetcher)


def _rng_states() -> dict[str, Any]:
    """This process's global random states, as tensors and plain Python values (``weights_only``-loadable)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        if len(states["cuda"]) != torch.cuda.device_count():
            rank_zero_warn(f"the checkpoint holds the CUDA random states of {len(states['cuda'])} devices, this "
                           f"machine has {torch.cuda.device_count()}: CUDA random states not restored.")
        else:
            torch.cuda.set_rng_state_all(states["cuda"])


class RNGStates(Callback):
    """Saves the global random states of every rank (python ``random``, numpy, torch, CUDA) in checkpoints and
    restores them when a fit resumes.

    Restored in ``on_train_start``, after the training dataloader has been iterated (creating a DataLoader iterator
    draws its workers' base seed from torch's global generator unless the loader has its own ``generator``).
    Dataloader workers need no saved state: torch seeds each worker from its loader's base seed and worker id, and the
    datasets of :mod:`lightning_mtl.datamodules` draw from generators seeded by ``(seed, stream, rank, index)``.
    """

    def __init__(self) -> None:
        self._to_restore: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        states = [_rng_states()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states[0])  # every rank dumps the checkpoint
            states = gathered
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict["ranks"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ranks, self._to_restore = self._to_restore, None
        if ranks is None:
            return
        if len(ranks) != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds the random states of {len(ranks)} ranks, this run has "
                           f"{trainer.world_size}: random states not restored, the run continues from other ones.")
            return
        _set_rng_states(ranks[trainer.global_rank])
