"""Properties of the episode sampler and the train / eval episode datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_mtl.datamodules.episodes import EpisodeSampler, EpisodeStream, FixedEpisodes


def tagged_images(classes: int = 30, samples: int = 20) -> np.ndarray:
    """(classes, samples, 1, 2, 2) uint8 images whose pixels spell their own class and sample index."""
    images = np.zeros((classes, samples, 1, 2, 2), dtype=np.uint8)
    images[:, :, 0, 0, 0] = np.arange(classes)[:, None]
    images[:, :, 0, 0, 1] = np.arange(samples)[None, :]
    return images


def ids(x: torch.Tensor) -> list[tuple[int, int]]:
    """(class, sample) of each image of a (N, 1, 2, 2) tensor."""
    return [(int(a), int(b)) for a, b in x[:, 0, 0, :2].tolist()]


def drawn(sampler: EpisodeSampler, seed: int) -> torch.Tensor:
    return sampler.episode([np.random.default_rng(seed)]).support_x


@pytest.mark.parametrize("ways,shots,queries", [(5, 1, 15), (20, 5, 5), (30, 1, 19)])
def test_episode_shapes_labels_and_disjointness(ways, shots, queries):
    sampler = EpisodeSampler(tagged_images(), ways, shots, queries, meta_batch_size=3)
    ep = sampler.episode([np.random.default_rng(i) for i in range(3)])
    assert ep.support_x.shape == (3, ways * shots, 1, 2, 2) and ep.query_x.shape == (3, ways * queries, 1, 2, 2)
    assert ep.support_x.dtype == torch.uint8 and ep.ways == ways and ep.shots == shots and ep.queries == queries
    for b in range(3):
        assert ep.support_y[b].tolist() == [c for c in range(ways) for _ in range(shots)]
        assert ep.query_y[b].tolist() == [c for c in range(ways) for _ in range(queries)]
        support, query = ids(ep.support_x[b]), ids(ep.query_x[b])
        assert not set(support) & set(query), "support and query share an image"
        assert len(set(support)) == len(support) and len(set(query)) == len(query)
        # every label maps to exactly one source class, the same one in support and query, distinct across labels
        label_class = {}
        for (cls, _), y in zip(support + query, ep.support_y[b].tolist() + ep.query_y[b].tolist(), strict=True):
            assert label_class.setdefault(y, cls) == cls
        assert len(set(label_class.values())) == ways


def test_sampler_rejects_impossible_episodes():
    with pytest.raises(ValueError, match="10-way episodes need 10 classes but the split has only 5; lower the ways"):
        EpisodeSampler(tagged_images(classes=5), 10, 1, 1)
    with pytest.raises(ValueError, match=r"shots \+ queries = 5 \+ 16 = 21 exceeds the 20 examples per class"):
        EpisodeSampler(tagged_images(), 5, 5, 16)
    with pytest.raises(ValueError, match="shots must be >= 1"):
        EpisodeSampler(tagged_images(), 5, 0, 1)


def test_fixed_episodes_are_deterministic_and_model_independent():
    sampler = EpisodeSampler(tagged_images(), 5, 1, 3, meta_batch_size=4)
    a = [ids(e.support_x.flatten(0, 1)) for e in FixedEpisodes(sampler, 10, seed=0, stream="test")]
    b = [ids(e.support_x.flatten(0, 1)) for e in FixedEpisodes(sampler, 10, seed=0, stream="test")]
    torch.manual_seed(123)
    np.random.seed(123)  # global RNG state must not matter
    c = [ids(e.support_x.flatten(0, 1)) for e in FixedEpisodes(sampler, 10, seed=0, stream="test")]
    assert a == b == c
    assert [len(x) for x in a] == [20, 20, 10]  # 10 episodes in meta-batches of 4: 4, 4, 2
    val = [ids(e.support_x.flatten(0, 1)) for e in FixedEpisodes(sampler, 10, seed=0, stream="val")]
    assert val != a, "validation and test streams must differ"


def _episode_keys(dataset, loader_workers: int = 0, limit: int | None = None) -> list[tuple]:
    loader = DataLoader(dataset, batch_size=None, num_workers=loader_workers)
    keys = []
    for i, ep in enumerate(loader):
        if limit is not None and i == limit:
            break
        keys += [tuple(ids(ep.support_x[b]) + ids(ep.query_x[b])) for b in range(ep.meta_batch_size)]
    return keys


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_set_split_across_ranks_exactly_once(world_size):
    sampler = EpisodeSampler(tagged_images(), 5, 1, 2, meta_batch_size=3)
    full = _episode_keys(FixedEpisodes(sampler, 25, seed=7, stream="val"))
    per_rank = [_episode_keys(FixedEpisodes(sampler, 25, 7, "val", rank=r, world_size=world_size))
                for r in range(world_size)]
    union = [k for keys in per_rank for k in keys]
    assert len(union) == 25 and sorted(union) == sorted(full)
    assert sum(len(FixedEpisodes(sampler, 25, 7, "val", r, world_size)) for r in range(world_size)) == 9


def test_eval_set_identical_with_workers():
    sampler = EpisodeSampler(tagged_images(), 5, 1, 2, meta_batch_size=2)
    single = _episode_keys(FixedEpisodes(sampler, 11, 0, "test"))
    workers = _episode_keys(FixedEpisodes(sampler, 11, 0, "test"), loader_workers=2)
    assert sorted(single) == sorted(workers) and len(workers) == 11


def test_train_stream_reproducible_and_worker_count_independent():
    sampler = EpisodeSampler(tagged_images(), 5, 1, 2, meta_batch_size=2)
    zero = _episode_keys(EpisodeStream(sampler, seed=3), limit=8)
    again = _episode_keys(EpisodeStream(sampler, seed=3), limit=8)
    two = _episode_keys(EpisodeStream(sampler, seed=3), loader_workers=2, limit=8)
    assert zero == again == two
    assert len(set(zero)) == len(zero), "workers or steps repeated an episode"
    other_seed = _episode_keys(EpisodeStream(sampler, seed=4), limit=8)
    assert not set(zero) & set(other_seed)


def test_train_streams_differ_per_rank_and_resume_from_start():
    sampler = EpisodeSampler(tagged_images(), 5, 1, 2)
    rank0 = _episode_keys(EpisodeStream(sampler, seed=3, rank=0), limit=20)
    rank1 = _episode_keys(EpisodeStream(sampler, seed=3, rank=1), limit=20)
    assert not set(rank0) & set(rank1)
    assert _episode_keys(EpisodeStream(sampler, seed=3, rank=0, start=5), limit=15) == rank0[5:]


def test_sampler_throughput_smoke():
    """Not a timing gate (see recipes/benchmarks/fewshot_throughput.py): just that a batch draw is cheap."""
    sampler = EpisodeSampler(np.zeros((4112, 20, 1, 28, 28), np.uint8), 5, 1, 15)
    stream = iter(EpisodeStream(sampler, seed=0))
    for _ in range(200):
        next(stream)


def test_episodes_drawn_on_the_device_are_the_host_samplers():
    """`to_device`: the images stay on the device and only indices cross; the same generators give exactly the
    same episodes (and families) as the host path."""
    from lightning_mtl.datamodules.episodes import EpisodeSampler, episode_rng

    images = np.random.default_rng(0).integers(0, 256, (12, 6, 1, 5, 5), dtype=np.uint8)
    for families in (None, np.repeat(np.arange(3), 4)):
        host = EpisodeSampler(images, 3, 2, 1, 4, families=families)
        device = EpisodeSampler(images, 3, 2, 1, 4, families=families).to_device("cpu")
        for index in range(3):
            a = host.episode([episode_rng(0, "train", 0, index * 4 + i) for i in range(4)])
            b = device.episode([episode_rng(0, "train", 0, index * 4 + i) for i in range(4)])
            for x, y in zip(a[:4], b[:4], strict=True):
                assert torch.equal(x, y)
            assert (a.family is None and b.family is None) or torch.equal(a.family, b.family)
