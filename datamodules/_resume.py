"""Where the training data stands, for exact resumption.

A datamodule's ``state_dict`` (saved by Lightning in every checkpoint) records :func:`train_position`; after a
restore, its ``train_dataloader`` rebuilds its streams and samplers at that position. The position counts the
batches the fit loop has *taken*, read from the loop: the loaders themselves run ahead of it (Lightning's fetcher holds
one batch of an infinite loader in advance, DataLoader workers prefetch several), so counters kept by a dataset, a
sampler or a worker would overshoot.
"""

from __future__ import annotations

import lightning as L


def train_position(trainer: L.Trainer | None) -> dict[str, int]:
    """``{"epoch": e, "batches": b}``: the training epoch (as given to the samplers' ``set_epoch``) and the number of
    its batches the fit loop has trained on (Lightning's ``processed`` count, which a resumed loop continues from);
    ``{}`` outside a fit.

    A checkpoint written once an epoch's last batch is taken (``on_train_epoch_end``, or a step or validation that
    ends the epoch) points at the start of the next epoch.
    """
    if trainer is None or trainer.state.fn != "fit":
        return {}
    epoch, batches = trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if batches >= trainer.num_training_batches:
        epoch, batches = epoch + 1, 0
    return {"epoch": epoch, "batches": batches}
