"""The soak benchmark (recipes/benchmarks/soak.py) runs end to end on real Omniglot with 2 workers, and its duplicate
and memory-growth measures mean what they say."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lightning_mtl import Episode

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "recipes" / "benchmarks" / "soak.py"


def load_script():
    spec = importlib.util.spec_from_file_location("soak_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


soak = load_script()


def _episode(images: torch.Tensor, ways: int, shots: int) -> Episode:
    """A one-episode meta-batch from ``(ways, shots + queries, 1, H, W)`` class-major images."""
    queries = images.shape[1] - shots
    support = images[:, :shots].reshape(1, ways * shots, *images.shape[2:])
    query = images[:, shots:].reshape(1, ways * queries, *images.shape[2:])
    return Episode(support, torch.arange(ways).repeat_interleave(shots)[None], query,
                   torch.arange(ways).repeat_interleave(queries)[None], ways)


def test_episode_key_identifies_the_task_not_its_order():
    images = torch.randint(0, 256, (5, 4, 1, 28, 28), dtype=torch.uint8)  # 5 classes, 1 shot + 3 queries
    (key,) = soak.episode_keys(_episode(images, ways=5, shots=1))
    relabelled = images[torch.tensor([3, 0, 4, 1, 2])]  # the same classes under other labels
    reordered = torch.cat([images[:, :1], images[:, 1:].flip(1)], dim=1)  # the queries in another order
    assert soak.episode_keys(_episode(relabelled, 5, 1)) == soak.episode_keys(_episode(reordered, 5, 1)) == [key]
    swapped = images[:, [1, 0, 2, 3]]  # one support image becomes a query: another task
    one_pixel = images.clone()
    one_pixel[2, 3, 0, 0, 0] ^= 1  # one pixel of one query image differs
    assert key not in soak.episode_keys(_episode(swapped, 5, 1)) + soak.episode_keys(_episode(one_pixel, 5, 1))
    assert soak.duplicates([key, 7, key, key]) == 2


def test_growth_is_measured_from_the_end_of_warmup():
    def sample(episodes, main, workers):
        return {"episodes": episodes, "rss_main": main, "rss_workers": workers, "pss_main": main, "pss_workers": 0.0}

    samples = [sample(0, 50.0, 0.0), sample(10, 100.0, 100.0), sample(20, 100.0, 112.0), sample(30, 100.0, 104.0)]
    memory = soak.growth(samples, warmup=0.1, total=100)  # the baseline is the sample at episode 10
    assert memory["baseline_at_episode"] == 10
    assert memory["rss_total"] == {"baseline_mib": 200.0, "max_mib": 212.0, "end_mib": 204.0, "growth_max": 0.06,
                                   "growth_end": 0.02}
    assert memory["rss_main"]["growth_max"] == 0.0 and memory["pss_total"]["growth_max"] == 0.0


def test_soak_smoke_two_workers(omniglot_root, cache_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LIGHTNING_MTL_DATA", str(omniglot_root))
    monkeypatch.setenv("LIGHTNING_MTL_CACHE", str(cache_dir))
    out = tmp_path / "soak.json"
    threads = torch.get_num_threads()
    try:
        summary = soak.main(["--episodes", "200", "--workers", "2", "--ways", "20", "--val-episodes", "40",
                             "--test-episodes", "40", "--sample-every", "10", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))
    assert json.loads(capsys.readouterr().out)["checks"] == summary["checks"]
    assert summary["passed"] and all(summary["checks"].values()), summary["checks"]
    assert summary["evaluation"]["val"] == {"episodes": 40, "expected": 40, "duplicates": 0,
                                            "identical_on_reread": True}
    assert summary["evaluation"]["test"]["episodes"] == 40
    assert summary["training_stream"]["episodes"] == 200
    assert summary["memory"]["samples_after_warmup"] >= 18
    memory, checks = summary["tables"]  # what docs/benchmarks.md shows
    assert [r[0] for r in memory["rows"]] == ["rss_total", "rss_main", "rss_workers", "pss_total"]
    assert checks["rows"] == [[name, True] for name in summary["checks"]]
    assert summary["record"]["command"].startswith("python recipes/benchmarks/soak.py --episodes 200")
    assert max(s["processes"] for s in summary["samples"]) == 3  # the main process and its 2 workers were sampled
    assert all(s["rss_workers"] > 0 for s in summary["samples"][1:])


def test_too_few_samples_after_warmup_is_an_error():
    with pytest.raises(ValueError, match="memory samples after warm-up"):
        soak.growth([{"episodes": 0, "rss_main": 1.0, "rss_workers": 0.0, "pss_main": 1.0, "pss_workers": 0.0}],
                    warmup=0.1, total=10)
