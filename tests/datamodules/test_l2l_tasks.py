"""The learn2learn bridge: TaskDataset tasks become Episodes with the right split and labels."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.datamodules.l2l_tasks import TaskDatasetEpisodes, episode_from_task


def _dataset(classes=10, per_class=8):
    # example i of class c is the constant image 100 * c + i, so every episode can be traced back to its sources
    ids = torch.arange(classes * per_class)
    x = (100 * (ids // per_class) + ids % per_class).double().view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    return TensorDataset(x, ids // per_class)


def _check(ep, ways, shots, queries):
    assert ep.support_x.shape == (1, ways * shots, 1, 4, 4) and ep.query_x.shape == (1, ways * queries, 1, 4, 4)
    assert torch.equal(ep.support_y[0], torch.arange(ways).repeat_interleave(shots))
    assert torch.equal(ep.query_y[0], torch.arange(ways).repeat_interleave(queries))
    s_ids, q_ids = ep.support_x[0, :, 0, 0, 0], ep.query_x[0, :, 0, 0, 0]
    assert not set(s_ids.tolist()) & set(q_ids.tolist())  # disjoint
    source = (s_ids // 100).view(ways, shots)  # one source class per label, the same in support and query
    assert (source == source[:, :1]).all() and torch.equal((q_ids // 100).view(ways, queries)[:, 0], source[:, 0])


def test_episode_from_task_remaps_labels_and_splits_per_class():
    x, y = _dataset()[torch.tensor([16, 3, 17, 4, 18, 5])]  # classes 2 and 0, interleaved
    ep = episode_from_task(x, y, ways=2, shots=1, queries=2)
    _check(ep, 2, 1, 2)
    assert ep.support_x[0, :, 0, 0, 0].tolist() == [200.0, 3.0]  # first appearance: class 2 -> label 0


def test_task_dataset_becomes_episodes(l2l):
    dataset = l2l.data.MetaDataset(_dataset())
    transforms = [l2l.data.transforms.NWays(dataset, 5), l2l.data.transforms.KShots(dataset, 3),
                  l2l.data.transforms.LoadData(dataset)]
    tasks = l2l.data.TaskDataset(dataset, task_transforms=transforms, num_tasks=6)
    episodes = TaskDatasetEpisodes(tasks, ways=5, shots=1, queries=2)
    first = list(episodes)
    assert len(first) == len(episodes) == 6
    for ep in first:
        _check(ep, 5, 1, 2)
    again = list(DataLoader(episodes, batch_size=None, num_workers=2))
    assert sorted(e.support_x.sum().item() for e in again) == sorted(e.support_x.sum().item() for e in first)
    sampled = TaskDatasetEpisodes(l2l.data.TaskDataset(dataset, task_transforms=transforms, num_tasks=-1), 5, 1, 2,
                                  num_episodes=3)
    assert len(list(sampled)) == 3


def test_bad_tasks_are_named():
    x, y = _dataset()[torch.arange(0, 24)]  # 3 classes x 8
    with pytest.raises(ValueError, match=r"must hold 5 classes x 3 examples .* got 3 classes with counts \[8, 8, 8\]"):
        episode_from_task(x, y, ways=5, shots=1, queries=2)
    with pytest.raises(ValueError, match="pass num_episodes"):
        TaskDatasetEpisodes(iter([]), 5, 1, 2)
    with pytest.raises(ValueError, match="ways, shots and queries must be >= 1"):
        TaskDatasetEpisodes([(x, y)], 5, 0, 2)
