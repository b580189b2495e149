"""Episodes from learn2learn task datasets: a bridge for users with existing learn2learn data pipelines.

Any ``learn2learn.data.TaskDataset`` (or anything that returns ``(x, y)`` tasks when indexed or sampled) becomes a
stream of :class:`~lightning_mtl.batches.Episode` batches that every meta-learner here consumes. Each task must hold
``ways`` classes with exactly ``shots + queries`` examples each, as learn2learn's ``NWays`` + ``KShots(shots +
queries)`` transforms produce; labels may be any values (learn2learn's ``RemapLabels`` is not required) and are
remapped to ``0 .. ways - 1`` in order of first appearance. Within each class, the first ``shots`` examples (in
task order) form the support set and the rest the query set, as learn2learn's ``partition_task`` does.

learn2learn itself is optional: ``make learn2learn`` builds it on Python 3.11+ (see ``.ci/learn2learn.sh``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from lightning_mtl.batches import Episode


def episode_from_task(x: Tensor, y: Tensor, ways: int, shots: int, queries: int) -> Episode:
    """Split one task ``(x, y)`` into a single-episode :class:`Episode` (meta-batch size 1).

    Raises:
        ValueError: if the task does not hold ``ways`` classes of ``shots + queries`` examples each.
    """
    y = torch.as_tensor(y).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"task has {len(x)} inputs but {len(y)} labels")
    classes, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    if len(classes) != ways or bool((counts != shots + queries).any()):
        raise ValueError(
            f"a learn2learn task must hold {ways} classes x {shots + queries} examples (shots {shots} + queries "
            f"{queries}); got {len(classes)} classes with counts {counts.tolist()}. Sample tasks with "
            f"NWays(dataset, {ways}) and KShots(dataset, {shots + queries}).")
    first_seen = torch.full((len(classes),), len(y), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(y)), reduce="amin")
    label = torch.empty_like(inverse)
    label[torch.argsort(first_seen)] = torch.arange(ways)  # class -> 0 .. ways - 1, in order of first appearance
    labels = label[inverse]  # (N,)
    # rank of each example within its class, in task order: the first `shots` go to the support set
    rank = torch.zeros_like(labels)
    for c in range(ways):
        members = (labels == c).nonzero(as_tuple=True)[0]
        rank[members] = torch.arange(len(members))
    support = (rank < shots).nonzero(as_tuple=True)[0]
    query = (rank >= shots).nonzero(as_tuple=True)[0]
    support = support[torch.argsort(labels[support], stable=True)]  # class-major, as our samplers emit
    query = query[torch.argsort(labels[query], stable=True)]
    return Episode(x[support].unsqueeze(0), labels[support].unsqueeze(0), x[query].unsqueeze(0),
                   labels[query].unsqueeze(0), ways)


class TaskDatasetEpisodes(IterableDataset):
    """An iterable of :class:`Episode` from a learn2learn ``TaskDataset``.

    Args:
        tasks: a ``learn2learn.data.TaskDataset`` or any sequence of ``(x, y)`` tasks. Task ``i`` of a finite set is
            read by index (the same episodes every pass, split over DataLoader workers); an infinite learn2learn
            set (``num_tasks=-1``) is sampled with its ``sample()``.
        ways: classes per task.
        shots: support examples per class.
        queries: query examples per class.
        num_episodes: episodes per pass; ``None`` takes ``len(tasks)``.
    """

    def __init__(self, tasks: Any, ways: int, shots: int, queries: int, num_episodes: int | None = None) -> None:
        super().__init__()
        if min(ways, shots, queries) < 1:
            raise ValueError(f"ways, shots and queries must be >= 1, got {ways}, {shots}, {queries}")
        try:
            length = len(tasks)
        except TypeError:
            length = -1
        if num_episodes is None:
            if length <= 0:
                raise ValueError("the task dataset has no finite length (e.g. num_tasks=-1): pass num_episodes")
            num_episodes = length
        self.indexed = 0 < num_episodes <= length
        if not self.indexed and not callable(getattr(tasks, "sample", None)):
            raise ValueError(f"{num_episodes} episodes asked from {length} tasks that cannot be sampled")
        self.tasks, self.ways, self.shots, self.queries = tasks, ways, shots, queries
        self.num_episodes = num_episodes

    def __len__(self) -> int:
        return self.num_episodes

    def __iter__(self) -> Iterator[Episode]:
        info = get_worker_info()  # each worker yields its share of the episode indices, never the same one twice
        start, step = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(start, self.num_episodes, step):
            # a finite task set is indexed (the same task i every pass); otherwise a task is drawn
            x, y = self.tasks[i] if self.indexed else self.tasks.sample()
            yield episode_from_task(torch.as_tensor(x), torch.as_tensor(y), self.ways, self.shots, self.queries)
