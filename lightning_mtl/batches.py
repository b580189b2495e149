"""Typed batches passed from datamodules to modules."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class MultiTaskBatch(NamedTuple):
    """A multi-task batch.

    Attributes:
        x: one input batch shared by every task (one dataset with several targets per sample), or a dict of
            per-task input batches keyed by task name (several datasets combined).
        targets: per-task targets keyed by task name; ``targets[name]`` has the batch size of that task's inputs.
    """

    x: Tensor | dict[str, Tensor]
    targets: dict[str, Tensor]


class Episode(NamedTuple):
    """A meta-batch of N-way K-shot Q-query classification episodes.

    All tensors carry a leading meta-batch dimension ``B`` (``B == 1`` for a single episode). Images are stored as
    ``uint8`` by the datamodules (modules convert them on the device) but any floating dtype is accepted.

    Attributes:
        support_x: ``(B, ways * shots, C, H, W)`` support images.
        support_y: ``(B, ways * shots)`` labels in ``0 .. ways - 1``.
        query_x: ``(B, ways * queries, C, H, W)`` query images, disjoint from the support images.
        query_y: ``(B, ways * queries)`` labels in ``0 .. ways - 1``.
        ways: number of classes per episode, as a Python int so that no device synchronisation is needed to read it.
        family: ``(B,)`` index of each episode's task family (e.g. its Omniglot alphabet) when the datamodule draws
            every episode from one family (``family_episodes``); ``None`` otherwise. TR-MAML reads it.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    ways: int
    family: Tensor | None = None

    @property
    def meta_batch_size(self) -> int:
        return self.support_x.shape[0]

    @property
    def shots(self) -> int:
        return self.support_x.shape[1] // self.ways

    @property
    def queries(self) -> int:
        return self.query_x.shape[1] // self.ways


class LabelledBatch(NamedTuple):
    """A batch of single-label examples, e.g. images labelled with their class among all the training classes.

    Attributes:
        x: ``(N, ...)`` inputs; images are ``uint8`` ``(N, C, H, W)`` from the episodic datamodules.
        y: ``(N,)`` int64 class indices.
    """

    x: Tensor
    y: Tensor
